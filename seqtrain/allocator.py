"""Host memory policy: freed tensor memory goes back to the system at once, so that a CPU run's resident set
follows its live tensors instead of its largest step so far.

glibc's malloc serves a request of at least its mmap threshold (128 KiB) with a fresh mapping, which `free`
unmaps at once; but each time such a block is freed it raises the threshold to that block's size (up to
32 MiB on 64-bit). After the first training step every activation is below the raised threshold, comes from
the heap, and what the heap frees stays resident: on the quick preset of benchmarks/memory.py a stage's
resident set above its imports was 3.0x its tensors and input (rss_floor_ratio), against 1.46x with the
threshold held at 128 KiB. Holding it there (mallopt(M_MMAP_THRESHOLD), which also turns the adaptation off)
costs a fresh mapping, and a page fault per page, for every large tensor of every step: a CPU training step
of ResNet-20 (width 16, batch 64) took 2.4x as long (docs/memory.md). So it is opt-in (--release-memory),
for CPU runs whose resident set must stay small; a GPU run gains nothing from it.

Nothing here changes a result, and CUDA tensors are not affected (their memory is the caching allocator's).
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # <malloc.h>
MMAP_THRESHOLD = 128 * 1024  # glibc's own default, kept fixed


def release_freed_memory() -> bool:
    """Hold glibc's mmap threshold at 128 KiB in this process; False where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # musl and other C libraries: their own policy stands
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
