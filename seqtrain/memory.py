"""Peak memory of a piece of work: the CUDA allocator's peak on a GPU, the process's resident set on a CPU.

On CPU the resident set is sampled by a background thread (psutil, every 20 ms): within one process,
ru_maxrss only ever grows, so it cannot tell one stage's peak from an earlier stage's. The benchmark
(benchmarks/memory.py) runs each configuration in a fresh process instead, for exact figures.
"""

from __future__ import annotations

import threading

import psutil
import torch

MB = 2**20


class PeakMemory:
    """Context manager; afterwards `.rss_mb` is the peak resident set and `.cuda_mb` the CUDA peak (or None)."""

    def __init__(self, device: torch.device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.rss_mb: float = 0.0
        self.cuda_mb: float | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        process = psutil.Process()
        self._peak = process.memory_info().rss

        def sample():
            while not self._stop.wait(self.interval):
                self._peak = max(self._peak, process.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True, name="rss-sampler")
        self._thread.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.rss_mb = round(self._peak / MB, 1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_mb = round(torch.cuda.max_memory_allocated(self.device) / MB, 1)

    def as_dict(self) -> dict:
        return {"peak_rss_mb": self.rss_mb, "peak_cuda_mb": self.cuda_mb}
