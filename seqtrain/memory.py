"""Memory of a piece of work: measured (tensor peaks, process resident set) and analytic (bytes held for a step).

Used by the pipeline, `--plan` (plan.py), the memory-balanced split (balance.py) and benchmarks/memory.py
(docs/design.md, "Memory figures"):

- `PeakMemory`: the peaks of one phase of a stage inside a long-lived process: the tensor-level peak (the
  CUDA allocator's, or on CPU MemTracker's count of live tensors over a few watched steps), its breakdown
  by kind, and the resident set beside it.
- `ProcessPeak`: the exact peak of a fresh process's work after its imports (its peak resident set minus
  that after the imports; `import torch` alone is about 0.5 GB of RSS here), or the CUDA allocator's peak.
  The benchmark runs each configuration in its own process to use it.
- `analytic_step`: the device-independent bytes of one training step: tensors saved for backward plus
  weights, gradients, optimizer state and the batch. On the "meta" device it computes nothing, so
  `--plan` predicts a ResNet-18 stage at batch 128 in a fraction of a second, and the prediction equals
  the figure measured on a real step (tests/test_memory_benchmark.py).
"""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import sys
import threading
import weakref
from dataclasses import asdict, dataclass

import psutil
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mem_tracker import _MemRefType as MEM_KIND

from seqtrain.errors import UserError
from seqtrain.report import MB
from seqtrain.train import train_step, without_cuda_query

# --------------------------------------------------------------------------------------------------------
# The CUDA allocator's peak over one window of work


class CudaPeak:
    """The CUDA allocator's peak (allocated and reserved bytes) over one window of work, right when windows nest.

    torch keeps one peak counter per device, and resetting it is the only way to start a window, so a window
    opened inside another (benchmarks/memory.py's `ProcessPeak.reset()` inside a `PeakMemory`) would erase the
    outer one's peak: its "tensor" figure covered only the timed steps. Every window therefore starts through
    `start()`, which first folds the counter's peak so far into every open window of the device; each then
    reports the most of what it folded and of the counter at its end: the peak of exactly its own span.
    `at_start`: the bytes already allocated when it began (tensors of earlier work still alive, and library
    workspaces such as cuBLAS's), which are part of every peak the allocator reports.
    """

    _open: weakref.WeakSet[CudaPeak] = weakref.WeakSet()  # windows started and not stopped, on any device

    def __init__(self, device: torch.device):
        self.device = device
        self.index = device.index if device.index is not None else torch.cuda.current_device()
        self.allocated = self.reserved = self.at_start = 0

    def start(self) -> CudaPeak:
        fold_cuda_peak(self.index)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.at_start = torch.cuda.memory_allocated(self.device)
        self.allocated, self.reserved = self.at_start, torch.cuda.memory_reserved(self.device)
        CudaPeak._open.add(self)
        return self

    def read(self) -> tuple[int, int]:
        """(allocated, reserved) peak bytes from `start()` to now."""
        torch.cuda.synchronize(self.device)
        return (max(self.allocated, torch.cuda.max_memory_allocated(self.device)),
                max(self.reserved, torch.cuda.max_memory_reserved(self.device)))

    def stop(self) -> tuple[int, int]:
        self.allocated, self.reserved = self.read()
        CudaPeak._open.discard(self)
        return self.allocated, self.reserved


def fold_cuda_peak(index: int) -> None:
    """Before device `index`'s peak counter is reset: keep its peak so far in every window open on it."""
    windows = [w for w in CudaPeak._open if w.index == index]
    if windows:
        torch.cuda.synchronize(index)
        allocated, reserved = torch.cuda.max_memory_allocated(index), torch.cuda.max_memory_reserved(index)
        for w in windows:
            w.allocated, w.reserved = max(w.allocated, allocated), max(w.reserved, reserved)


# --------------------------------------------------------------------------------------------------------
# The peaks of one phase of a stage


class PeakMemory:
    """Context manager over one phase of a stage (its training, or its caching pass): the phase's peaks.

    - `tensor_mb`, the figure users compare: on CUDA the allocator's peak over the whole phase
      (`max_memory_allocated` through a `CudaPeak` window, so that a window opened inside it cannot cut it
      short; `cuda_reserved_mb` beside it, and `cuda_at_start_mb`, what was allocated when the phase began
      and is part of its peak); on CPU the largest total of live tensors
      over the steps wrapped in `watch()`, counted by PyTorch's MemTracker (a TorchDispatchMode that sees
      every tensor an op allocates and frees: exact on CPU, where no allocator keeps statistics).
    - `breakdown_mb`: the watched steps' peak by kind (parameters, gradients, optimizer state, activations,
      temporaries, the batch), on every device.
    - `rss_mb`: the process's resident set, sampled by a thread every 20 ms (within one process ru_maxrss only
      ever grows, so it cannot tell one stage from an earlier one). It includes `import torch`, the raw data,
      the loader's shards and freed memory glibc keeps: a second figure, never the headline.

    Only the first `watch_steps` calls of `watch()` are tracked: MemTracker slows the ops it sees, and the
    steps of a phase are alike once the optimizer state exists (after the first step).
    """

    def __init__(self, device: torch.device, watch_steps: int = 3, interval: float = 0.02):
        self.device, self.watch_steps, self.interval = device, watch_steps, interval
        self.watched = 0
        self.tracked_peak = 0
        self.breakdown: dict[str, int] = {}
        self.rss_mb: float = 0.0
        self.cuda_allocated: int | None = None
        self.cuda_reserved: int | None = None
        self.cuda_at_start: int | None = None
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
            self._cuda = CudaPeak(self.device).start()
            self.cuda_at_start = self._cuda.at_start
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, psutil.Process().memory_info().rss)
        self.rss_mb = round(self._peak / MB, 1)
        if self.device.type == "cuda":
            self.cuda_allocated, self.cuda_reserved = self._cuda.stop()

    @contextlib.contextmanager
    def watch(self, *external: torch.nn.Module | torch.optim.Optimizer | torch.Tensor):
        """Track the tensors of the enclosed step (one of the first `watch_steps`); `external`: the model,
        optimizer and batch, which exist before the step and are part of what it holds."""
        if self.watched >= self.watch_steps:
            yield
            return
        self.watched += 1
        tracker = MemTracker()
        tracker.track_external(*external)
        with tracker:
            yield
        snaps = tracker.get_tracker_snapshot("peak")
        snap = next((v for d, v in snaps.items() if d.type == self.device.type), {})
        if snap.get("Total", 0) > self.tracked_peak:
            self.tracked_peak = snap["Total"]
            self.breakdown = {KINDS[k.name]: v for k, v in snap.items() if k != "Total" and k.name in KINDS}
            self.breakdown["parameters"] = snap.get(MEM_KIND.PARAM, 0) + snap.get(MEM_KIND.BUFFER, 0)

    @property
    def tensor_bytes(self) -> int:
        return self.cuda_allocated if self.cuda_allocated is not None else self.tracked_peak

    def as_dict(self) -> dict:
        """The phase's figures in MB, as results.json and the manifests carry them."""
        return {"peak_tensor_mb": round(self.tensor_bytes / MB, 1), "peak_rss_mb": self.rss_mb,
                "cuda_reserved_mb": None if self.cuda_reserved is None else round(self.cuda_reserved / MB, 1),
                "cuda_at_start_mb": None if self.cuda_at_start is None else round(self.cuda_at_start / MB, 1),
                "tensor_breakdown_mb": {k: round(v / MB, 2) for k, v in self.breakdown.items()},
                "tensor_source": "cuda allocator" if self.cuda_allocated is not None
                else f"MemTracker, {self.watched} step(s)"}


# Backward's transient gradients at their largest: an activation's gradient and its input's, alive at once
# (MemTracker's "temporaries" at the peak of a step). plan.py and balance.py add this many activations.
TRANSIENT_ACTIVATIONS = 2

# MemTracker's kinds of tensor, by the names a user reads in results.json (parameters = PARAM + BUFFER).
KINDS = {"GRAD": "gradients", "OPT": "optimizer", "ACT": "activations", "TEMP": "temporaries", "OTH": "batch"}


# --------------------------------------------------------------------------------------------------------
# The peak of a whole process


def peak_rss_bytes() -> int:
    """This address space's peak resident set: VmHWM on Linux, ru_maxrss elsewhere.

    Not ru_maxrss on Linux: a child started by fork or vfork + exec inherits the pre-exec high-water mark,
    i.e. its parent's (measured here: the child of a 1.5 GB parent reports 1.5 GB before its first import).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def reset_peak_rss() -> None:
    """Restart the peak resident set at the current one (Linux 4.0+); elsewhere the peak runs on."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class ProcessPeak:
    """The peak memory of what a fresh process does after its imports: create it right after them.

    `rss` is exact only in a process that does nothing else. `reset()` (after warm-up) restarts both peaks
    at the current usage, so that they are those of steady training, as benchmarks usually report. The CUDA
    peak is a `CudaPeak` window of its own: a reset leaves a `PeakMemory` around it whole, and the other way round.
    """

    def __init__(self, device: torch.device):
        self.device = device
        reset_peak_rss()  # drops a transient peak of the imports, where the kernel allows
        self.imports_rss = peak_rss_bytes()
        self._cuda = CudaPeak(device).start() if device.type == "cuda" else None

    def reset(self) -> None:
        reset_peak_rss()
        if self._cuda is not None:
            self._cuda.start()

    def read(self) -> dict:
        """Peak bytes: `rss` above the imports, and the CUDA allocator's allocated and reserved (None on CPU)."""
        out = {"rss": peak_rss_bytes() - self.imports_rss, "cuda_allocated": None, "cuda_reserved": None}
        if self._cuda is not None:
            out["cuda_allocated"], out["cuda_reserved"] = self._cuda.read()
        return out


# --------------------------------------------------------------------------------------------------------
# Analytic bytes of a training step


@dataclass
class StepBytes:
    """What one training step holds at its peak, by construction rather than by measurement."""

    saved: int  # tensors saved for backward (activations), each storage once; weights and batch excluded
    weights: int  # parameters and buffers
    grads: int  # parameter gradients
    optimizer: int  # optimizer state after the step (SGD momentum: 1x the parameters, AdamW: 2x)
    batch: int  # the input batch and its labels

    @property
    def total(self) -> int:
        return self.saved + self.weights + self.grads + self.optimizer + self.batch

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def storage_key(t: torch.Tensor) -> int:
    # The address of the storage object: one key per storage on every device. data_ptr() would not do:
    # it is 0 for every tensor on the meta device.
    return t.untyped_storage()._cdata


class SavedTensorBytes:
    """Context manager that adds up the storages autograd saves for backward, each counted once.

    In-place ops, views and tensors saved by several ops (a block input feeding both a conv and the
    shortcut) share one storage, so counting storages rather than saved tensors counts what is held.
    """

    def __init__(self, exclude: list[torch.Tensor]):
        self.skip = {storage_key(t) for t in exclude}
        self.storages: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self.skip:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensorBytes:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def tensor_bytes(tensors) -> int:
    return sum(t.nbytes for t in tensors)


def analytic_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  autocast=contextlib.nullcontext) -> StepBytes:
    """Run one real `train_step` and account for the bytes it holds; works on "meta" tensors (no compute).

    Not counted: the transient gradients of activations during backward, allocator rounding and caches,
    and on CPU the libraries' workspaces; the benchmark's `floor_ratio` (measured peak / this) shows them.
    """
    without_cuda_query(optimizer)
    weights = [*model.parameters(), *model.buffers()]
    with SavedTensorBytes(exclude=[*weights, x, y]) as saved:
        train_step(model, x, y, optimizer, autocast)
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return StepBytes(saved=saved.bytes, weights=tensor_bytes(weights), grads=tensor_bytes(grads),
                     optimizer=tensor_bytes(state), batch=tensor_bytes([x, y]))


def measured_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                   steps: int = 2) -> PeakMemory:
    """The tensor peak of `steps` training steps (MemTracker on a CPU, the allocator on CUDA); from the second
    step the optimizer state exists, so 2 is enough for the steady peak."""
    memory = PeakMemory(x.device, watch_steps=steps)
    with memory:
        for _ in range(steps):
            with memory.watch(model, optimizer, x, y):
                train_step(model, x, y, optimizer)
    return memory


@contextlib.contextmanager
def out_of_memory_as(what: str, fixes: list[str], predicted: int | None = None):
    """A CUDA out-of-memory error inside as the user's one line (exit 2): what ran out, its predicted peak when
    known, and `fixes`; an interrupted training keeps every finished epoch, so rerunning resumes."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        peak = f" (predicted peak {predicted / MB:,.0f} MB; python -m seqtrain.run --plan shows every stage)" \
            if predicted else ""
        options = fixes[0] if len(fixes) == 1 else f"{', '.join(fixes[:-1])} or {fixes[-1]}"
        raise UserError(f"{what} ran out of GPU memory{peak}: use {options}; every finished epoch is saved, so "
                        "rerunning resumes") from None


def device_description(device: torch.device | str) -> str:
    """A human name for the device a benchmark ran on, for its JSON summary."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.machine()
    return f"{model}, {os.cpu_count()} CPU cores (no GPU)"
