"""Interrupted stages resume where they stopped and end with the weights of an uninterrupted run.

SIGKILL loses at most the unfinished epoch (checkpoints are per epoch); Ctrl-C (SIGINT) finishes the
current step, checkpoints mid-epoch and exits 130, and the rerun carries on from that very step.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import seqtrain.train
from seqtrain.files import load_torch

from conftest import ROOT, tiny_flags

FLAGS = ["--stage", "0", "--n-train", "2000", "--max-epochs", "4", "--patience", "10"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
CMD = [sys.executable, "-m", "seqtrain.run"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Stage 0 trained without interruption: the weights every resumed run must reproduce."""
    d = tmp_path_factory.mktemp("straight")
    subprocess.run([*CMD, *tiny_flags(d), *FLAGS], check=True, capture_output=True, env=ENV)
    return load_torch(d / "run" / "stage_00" / "block.pt")


def interrupt_when(d, sig: int, ready) -> tuple[int, str]:
    """Start stage 0 in `d`, send `sig` once `ready(stage_dir)` holds; returns (exit status, stderr)."""
    proc = subprocess.Popen([*CMD, *tiny_flags(d), *FLAGS], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ENV)
    stage_dir = d / "run" / "stage_00"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not ready(stage_dir):
        time.sleep(0.01)
    proc.send_signal(sig)
    _, err = proc.communicate()
    return proc.returncode, err


def assert_same_weights(a: dict, b: dict) -> None:
    for part in ("block", "head"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs after resume"


def rerun(d) -> str:
    return subprocess.run([*CMD, *tiny_flags(d), *FLAGS], check=True, capture_output=True, text=True,
                          env=ENV).stdout


def epochs_logged(stage_dir) -> int:
    metrics = stage_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def test_sigkill_mid_training_resumes_at_the_right_epoch_with_identical_weights(tmp_path, straight):
    interrupt_when(tmp_path, signal.SIGKILL, lambda stage_dir: epochs_logged(stage_dir) >= 2)
    stage_dir = tmp_path / "run" / "stage_00"
    ckpt = load_torch(stage_dir / "checkpoint.pt")
    # The kill may land between an epoch's metrics line and its checkpoint: then that epoch is redone.
    assert 1 <= ckpt["epoch"] < 4, "the kill should land mid-training"
    assert not (stage_dir / "cache" / "manifest.json").exists()

    out = rerun(tmp_path)
    assert f"resuming after epoch {ckpt['epoch']}" in out
    assert f"epoch {ckpt['epoch']:3d} |" not in out  # finished epochs are not redone
    assert epochs_logged(stage_dir) == 4  # one metrics line per epoch, none duplicated by the resume
    assert_same_weights(straight, load_torch(stage_dir / "block.pt"))


def test_ctrl_c_finishes_the_step_checkpoints_mid_epoch_and_exits_130(tmp_path, straight):
    status, err = interrupt_when(tmp_path, signal.SIGINT, lambda stage_dir: epochs_logged(stage_dir) >= 1)
    assert status == 130
    err = err.strip()
    assert "\n" not in err and "rerun the same command to resume" in err and "Traceback" not in err, err
    stage_dir = tmp_path / "run" / "stage_00"
    ckpt = load_torch(stage_dir / "checkpoint.pt")
    assert ckpt["epoch"] >= 1
    where = err.split(": interrupted ")[1].split(";")[0]  # "in epoch 3 after step 7 of 56"

    out = rerun(tmp_path)
    assert f"resuming {where} (best val acc" in out  # the interrupt and the resume name one place alike
    assert_same_weights(straight, load_torch(stage_dir / "block.pt"))


def test_interrupt_and_resume_lines_agree_and_show_no_placeholder(tiny, monkeypatch, capsys):
    real_step, calls = seqtrain.train.train_step, []

    def step(model, x, *rest):
        calls.append(x.device.type != "meta")  # the memory-balanced cut steps on the meta device first
        if sum(calls) == 3:  # Ctrl-C during the third step of the first epoch
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(model, x, *rest)

    monkeypatch.setattr(seqtrain.train, "train_step", step)
    assert tiny("--stage", "0", "--max-epochs", "1") == 130
    err = capsys.readouterr().err
    assert err == ("seqtrain: stage 0/1: interrupted in epoch 1 after step 3 of 11; progress is saved: rerun the "
                   "same command to resume\n")
    monkeypatch.undo()
    assert tiny("--stage", "0", "--max-epochs", "1") == 0
    out = capsys.readouterr().out
    assert "stage 0/1: resuming in epoch 1 after step 3 of 11 (no epoch finished yet)" in out
