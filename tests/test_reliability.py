"""Nothing lost, nothing torn: disk budgeting, running out of space, the run lock, --verify, --rebuild,
and the kill-anywhere trial (a small version of scripts/killtest.py)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from collections import namedtuple

import pytest

import seqtrain.cache
import seqtrain.pipeline
import seqtrain.plan
from seqtrain.config import Config
from seqtrain.rundir import RunDir, RunLock

from conftest import ROOT


def test_cache_that_cannot_fit_is_refused_before_training(tiny, monkeypatch, capsys):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(seqtrain.plan.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))
    assert tiny("--stage", "all") == 2
    err = capsys.readouterr().err
    assert "stage 0's cache needs 4 MB but" in err and "has 1 MB free" in err
    assert not (tiny.run_dir / "stage_00" / "checkpoint.pt").exists()  # refused before any training


def test_running_out_of_space_mid_write_is_clear_and_leaves_no_temp_files(tiny, monkeypatch, capsys):
    def full(tmp, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(seqtrain.cache, "publish", full)
    assert tiny("--stage", "0") == 2
    err = capsys.readouterr().err
    assert err.startswith("seqtrain: error: no space left on device writing ") and err.count("\n") == 1
    assert list(tiny.run_dir.rglob("*.tmp")) == []
    assert not (tiny.run_dir / "stage_00" / "cache" / "manifest.json").exists()
    monkeypatch.undo()
    assert tiny("--stage", "0") == 0  # once there is space, the same command finishes the stage


def test_second_process_on_the_same_run_dir_is_refused(tiny, capsys):
    assert tiny("--stage", "0") == 0
    cfg = Config.from_dict(json.loads((tiny.run_dir / "config.json").read_text()))
    with RunLock(RunDir(cfg.run_dir)):
        capsys.readouterr()
        assert tiny("--stage", "1") == 2
        assert "is in use by another seqtrain process (pid " in capsys.readouterr().err
    assert tiny("--stage", "1") == 0  # released with its holder


def test_verify_reports_a_healthy_run_and_names_a_damaged_shard(tiny, capsys):
    assert tiny("--stage", "all") == 0
    capsys.readouterr()
    assert tiny("--verify") == 0
    out = capsys.readouterr().out
    assert "stage 0: complete" in out and "stage 1: complete" in out and "final: complete" in out
    results = tiny.run_dir / "final" / "results.json"
    kept = results.read_bytes()
    results.unlink()  # an incomplete run is not a verified one: exit 2, and the command that completes it
    assert tiny("--verify") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "incomplete (the final network)" in err and "--stage all --run-dir" in err
    results.write_bytes(kept)
    shard = sorted((tiny.run_dir / "stage_01" / "cache").glob("val-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[-10] ^= 1
    shard.write_bytes(bytes(data))
    assert tiny("--verify") == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "--stage 1 --run-dir" in err


def test_rebuild_accepts_a_new_configuration_and_retrains(tiny, capsys):
    assert tiny("--stage", "all") == 0
    capsys.readouterr()
    assert tiny("--stage", "all", "--lr", "0.02", "--rebuild") == 0
    out = capsys.readouterr().out
    assert "made with another configuration; training it" in out and "complete, skipped" not in out
    assert json.loads((tiny.run_dir / "config.json").read_text())["lr"] == 0.02


@pytest.mark.slow
def test_killed_at_random_moments_the_run_completes_identically():
    result = subprocess.run([sys.executable, "scripts/killtest.py", "--kills", "2"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["identical"] is True


def test_non_finite_loss_stops_the_stage_and_keeps_the_last_good_checkpoint(tiny, monkeypatch, capsys):
    import torch

    import seqtrain.train

    real_step, calls = seqtrain.train.train_step, []

    def step(model, x, y, optimizer, autocast):
        calls.append(1)
        loss, logits = real_step(model, x, y, optimizer, autocast)
        return (loss * float("nan") if len(calls) > 15 else loss), logits  # epoch 1 has 11 steps

    monkeypatch.setattr(seqtrain.train, "train_step", step)
    assert tiny("--stage", "0") == 2
    err = capsys.readouterr().err
    assert "the loss is nan at step 5" in err and "lower --lr" in err and err.count("\n") == 1
    ckpt = torch.load(tiny.run_dir / "stage_00" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1  # the last good checkpoint, from the end of epoch 1


def test_training_waits_for_the_device_once_per_32_steps_not_at_every_step(monkeypatch):
    import contextlib
    import threading

    import torch

    from seqtrain import train
    from seqtrain.config import Config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), None) for _ in range(40)]
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):  # every way the host reads a tensor
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda t, *a, _real=real, **k: reads.append(1) or _real(t, *a, **k))
    progress = train.EpochProgress()
    assert train.train_one_epoch(model, batches, torch.optim.SGD(model.parameters(), lr=0.1), Config(), 0, progress,
                                 autocast=contextlib.nullcontext, channels_last=False, stop=threading.Event(),
                                 desc="test")
    # On a GPU each read stalls the queue of kernels: 40 steps read twice (after step 32 and at the end).
    assert len(reads) == 2
    assert (progress.step, progress.seen) == (40, 160) and progress.loss_sum > 0 and 0 <= progress.correct <= 160


def test_a_stop_between_two_reads_resumes_at_the_step_it_stopped_after():
    import contextlib
    import copy
    import threading

    import torch

    from seqtrain import train
    from seqtrain.config import Config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,)), None) for _ in range(40)]
    stopped = copy.deepcopy(model)

    class Batches:  # Ctrl-C while batch 35 is loaded: 3 steps after the read at step 32
        def __init__(self, stop=None):
            self.stop = stop

        def __len__(self):
            return len(batches)

        def __iter__(self):
            for i, batch in enumerate(batches):
                if i == 35 and self.stop:
                    self.stop.set()
                yield batch

    def epoch(model, progress, stop):
        return train.train_one_epoch(model, Batches(stop), torch.optim.SGD(model.parameters(), lr=0.1), Config(), 0,
                                     progress, autocast=contextlib.nullcontext, channels_last=False,
                                     stop=stop or threading.Event(), desc="test")

    whole = train.EpochProgress()
    assert epoch(model, whole, None)
    progress = train.EpochProgress()
    assert not epoch(stopped, progress, threading.Event())
    assert (progress.step, progress.seen) == (35, 140)  # every step taken is counted, and no other
    # Resumed (SGD without momentum carries no state), the epoch ends as the one never stopped.
    assert epoch(stopped, progress, None)
    assert (progress.step, progress.seen, progress.correct) == (whole.step, whole.seen, whole.correct)
    assert progress.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(stopped.state_dict().values(), model.state_dict().values()))
