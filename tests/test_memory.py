"""Tensor-level memory: the peak of a known step equals its hand-computed bytes, every stage's reported
peak covers both its training and its caching pass, each CUDA peak covers exactly its own window when
windows nest (the CUDA allocator's counter is simulated: no GPU here), and a step on the meta device
creates no CUDA context."""

from __future__ import annotations

import pytest
import torch

from seqtrain.cache import read_manifest
from seqtrain.memory import CudaPeak, PeakMemory, ProcessPeak, analytic_step
from seqtrain.report import MB
from seqtrain.train import without_cuda_query


def test_tensor_peak_of_a_known_step_equals_the_hand_computed_bytes():
    lin = torch.nn.Linear(1024, 1024, bias=False)  # W: 4 MiB
    opt = torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(256, 1024)  # 1 MiB
    with PeakMemory(torch.device("cpu")) as mem:
        for _ in range(3):
            with mem.watch(lin, opt, x):
                out = lin(x)  # 1 MiB, saved by square() for backward
                loss = out.square().sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                del out, loss
    # The peak comes while backward forms dL/dW (4 MiB) from dL/dout (1 MiB), with W, its momentum
    # buffer (4 MiB, from the second step on), x and out alive: 15 MiB, plus a few scalars.
    assert 15 * MB <= mem.tensor_bytes < 15 * MB + 1024
    kinds = mem.as_dict()["tensor_breakdown_mb"]
    assert kinds["parameters"] == 4 and kinds["optimizer"] == 4 and kinds["batch"] == 1
    assert kinds["activations"] == 1 and kinds["temporaries"] == 5
    assert mem.watched == 3


def test_only_the_first_steps_are_watched():
    lin = torch.nn.Linear(8, 8)
    with PeakMemory(torch.device("cpu"), watch_steps=2) as mem:
        for _ in range(2):
            with mem.watch(lin):
                lin(torch.randn(4, 8))
        with mem.watch(lin):
            big = lin(torch.randn(100_000, 8))  # after the watched steps: not counted
    assert mem.watched == 2 and mem.tensor_bytes < big.nbytes


def test_a_stage_peak_covers_its_caching_pass(tiny):
    # Caching 8 views of every training sample pushes batches 8x the training batch through the block:
    # the stage's peak is then its caching pass, which the summary must not leave out.
    assert tiny("--cache-views", "8", "--augment", "crop", "--max-epochs", "1") == 0
    result = read_manifest(tiny.run_dir / "stage_00" / "cache").result
    train, cache = result.train_memory["peak_tensor_mb"], result.cache_memory["peak_tensor_mb"]
    assert cache > train > 0
    assert result.peak_tensor_mb == cache


class Allocator:
    """The CUDA caching allocator's counters as torch.cuda reports them: bytes allocated now, and their peak
    since the last reset_peak_memory_stats (which restarts it at the bytes allocated now); reserved = 2x."""

    def __init__(self, monkeypatch):
        self.now = self.peak = 0
        for name, fn in {"memory_allocated": lambda d=None: self.now, "max_memory_allocated": lambda d=None: self.peak,
                         "memory_reserved": lambda d=None: 2 * self.now,
                         "max_memory_reserved": lambda d=None: 2 * self.peak,
                         "reset_peak_memory_stats": self.reset, "synchronize": lambda d=None: None,
                         "current_device": lambda: 0}.items():
            monkeypatch.setattr(torch.cuda, name, fn)

    def reset(self, device=None) -> None:
        self.peak = self.now

    def alloc(self, n: int) -> None:
        self.now += n
        self.peak = max(self.peak, self.now)


@pytest.fixture
def cuda(monkeypatch):
    return Allocator(monkeypatch)


def test_a_reset_inside_a_phase_leaves_the_phase_its_whole_peak(cuda):
    # benchmarks/memory.py: PeakMemory over a whole configuration, ProcessPeak.reset() after its warm-up
    # steps. The warm-up's 100 MB peak is the phase's; the timed steps' 60 MB is the process peak's.
    cuda.alloc(10 * MB)  # alive before either begins: a library workspace, earlier tensors
    peak = ProcessPeak(torch.device("cuda"))
    with PeakMemory(torch.device("cuda", 0)) as mem:
        cuda.alloc(90 * MB)  # warm-up
        cuda.alloc(-60 * MB)
        peak.reset()
        cuda.alloc(30 * MB)  # timed steps: 70 MB at most
        cuda.alloc(-30 * MB)
    assert mem.cuda_allocated == 100 * MB and mem.cuda_reserved == 200 * MB
    assert mem.as_dict()["peak_tensor_mb"] == 100 and mem.as_dict()["cuda_at_start_mb"] == 10
    assert peak.read()["cuda_allocated"] == 70 * MB and peak.read()["cuda_reserved"] == 140 * MB


def test_nested_phases_each_report_their_own_peak(cuda):
    # A phase opened inside another (the caching pass in a process whose ProcessPeak is open) reports its
    # own span only; the outer one keeps what came before and after it.
    peak = ProcessPeak(torch.device("cuda"))
    cuda.alloc(80 * MB)
    cuda.alloc(-80 * MB)
    with PeakMemory(torch.device("cuda")) as inner:
        cuda.alloc(20 * MB)  # still alive when the next phase begins: part of its peak, and shown as such
    with PeakMemory(torch.device("cuda")) as later:
        cuda.alloc(5 * MB)
    assert inner.cuda_allocated == 20 * MB and later.cuda_allocated == 25 * MB and later.cuda_at_start == 20 * MB
    assert peak.read()["cuda_allocated"] == 80 * MB


def test_a_window_does_not_take_a_peak_from_before_it_began(cuda):
    outer = CudaPeak(torch.device("cuda")).start()
    cuda.alloc(50 * MB)
    cuda.alloc(-50 * MB)
    CudaPeak(torch.device("cuda")).start()  # folds 50 MB into `outer`, then resets the counter
    inner = CudaPeak(torch.device("cuda")).start()  # folds again: `outer` still 50, `inner` begins at 0
    cuda.alloc(MB)
    assert inner.stop() == (MB, 2 * MB) and outer.stop() == (50 * MB, 100 * MB)


@pytest.fixture
def cuda_context_forbidden(monkeypatch):
    """A machine whose GPU would get a CUDA context from the first query of its current stream."""
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))

    def create_context(*a, **k):
        raise AssertionError("a CUDA context was created")

    monkeypatch.setattr(torch.accelerator, "current_stream", create_context)


def meta_step_parts():
    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(8, 4))
        x, y = torch.empty(2, 8), torch.zeros(2, dtype=torch.long)
    return model, torch.optim.AdamW(model.parameters()), x, y


def test_a_step_on_the_meta_device_creates_no_cuda_context(cuda_context_forbidden):
    model, opt, x, y = meta_step_parts()
    with pytest.raises(AssertionError, match="CUDA context"):
        opt.step()  # AdamW's own step creates one, even with every tensor on the meta device
    model, opt, x, y = meta_step_parts()
    # --plan's step: two moments of the 36 weights and a step count for each of the 2 parameters, in bytes
    assert analytic_step(model, opt, x, y).optimizer == 2 * 36 * 4 + 2 * 4
    lin = torch.nn.Linear(2, 2)  # a real device's optimizer keeps the check
    assert without_cuda_query(torch.optim.AdamW(lin.parameters())).__dict__.get(
        "_accelerator_graph_capture_health_check") is None
