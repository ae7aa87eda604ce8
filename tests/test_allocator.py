"""allocator.py: with seqtrain's host memory policy, memory a step frees leaves the resident set at once; under
glibc's adaptive threshold (the policy off) the same tensors stay resident. Each case in a fresh process, as
the threshold adapts once per process."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# One large tensor (24 MB) freed, which raises glibc's adaptive threshold, then a step's worth of 4 MB activations
# (below it) allocated, touched and freed: how much of them is still resident?
CHILD = """
import json, sys, psutil, torch
from seqtrain.allocator import release_freed_memory
if sys.argv[1] == "release":
    assert release_freed_memory()
rss = lambda: psutil.Process().memory_info().rss
big = torch.ones(24 * 2**20 // 4); del big  # at most 32 MB: larger blocks do not move the threshold
before = rss()
step = [torch.ones(2**20) for _ in range(12)]  # 12 x 4 MB
pinned = torch.ones(16)  # allocated after them, as the next step's small tensors are
del step
print(json.dumps({"kept_mb": (rss() - before) / 2**20}))
"""


def kept_mb(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["kept_mb"]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only: other C libraries keep their own policy")
def test_freed_activations_leave_the_resident_set():
    assert kept_mb("release") < 4  # 48 MB were allocated and freed
    assert kept_mb("adaptive") > 40  # glibc's default keeps them: the policy is what makes the difference
