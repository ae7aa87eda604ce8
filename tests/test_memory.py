"""Tensor-level memory: the peak of a known step equals its hand-computed bytes, and every stage's reported
peak covers both its training and its caching pass."""

from __future__ import annotations

import torch

from seqtrain.cache import read_manifest
from seqtrain.memory import PeakMemory
from seqtrain.report import MB


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
