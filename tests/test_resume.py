"""A stage killed mid-training resumes from its last epoch and ends with the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from seqtrain.files import load_torch

from conftest import ROOT, tiny_flags


def test_killed_stage_resumes_at_the_right_epoch_with_identical_weights(tmp_path):
    flags = ["--stage", "0", "--n-train", "2000", "--max-epochs", "5", "--patience", "10"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "seqtrain.run"]

    subprocess.run([*cmd, *tiny_flags(straight), *flags], check=True, capture_output=True, env=env)

    proc = subprocess.Popen([*cmd, *tiny_flags(killed), *flags], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)
    metrics = killed / "run" / "stage_00" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    ckpt = load_torch(killed / "run" / "stage_00" / "checkpoint.pt")
    assert 1 <= ckpt["epoch"] < 5, "the kill should land mid-training"
    assert not (killed / "run" / "stage_00" / "cache" / "manifest.json").exists()

    resumed = subprocess.run([*cmd, *tiny_flags(killed), *flags], check=True, capture_output=True, text=True,
                             env=env)
    assert f"resuming after epoch {ckpt['epoch']}" in resumed.stdout
    assert f"epoch {ckpt['epoch']:3d} |" not in resumed.stdout  # finished epochs are not redone
    lines = (killed / "run" / "stage_00" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 5  # one line per epoch, none duplicated by the resume

    a = load_torch(straight / "run" / "stage_00" / "block.pt")
    b = load_torch(killed / "run" / "stage_00" / "block.pt")
    for part in ("block", "head"):
        assert a[part].keys() == b[part].keys()
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), f"{part}.{name} differs after resume"
