"""What a new user meets in the first hour: a summary that states the answer, a --plan for any flags, stage
times that count every resumed part, an end-to-end baseline for their own network, real --help choices and
the disk the caches will take, said before they are written."""

from __future__ import annotations

import json
import os
import signal
import time

import torch
import torch.nn as nn

import seqtrain
import seqtrain.job
import seqtrain.stage
import seqtrain.train
from seqtrain.run import build_parser, main

from conftest import tiny_flags


def test_plan_answers_for_the_flags_given_whatever_run_directory_exists(tiny, capsys):
    assert tiny("--max-epochs", "1") == 0  # a run made with resnet20, width 4
    capsys.readouterr()
    assert main(["--plan", "--run-dir", str(tiny.run_dir), "--arch", "resnet32", "--batch-size", "64"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan: resnet32 in 4 stages") and "batch 64" in out
    assert json.loads((tiny.run_dir / "config.json").read_text())["arch"] == "resnet20"  # untouched


def test_help_shows_every_kind_of_arch():
    text = build_parser().format_help()
    assert "resnet<6n+2>" in text and "torchvision:NAME" in text


def test_stage_time_counts_the_part_before_an_interruption(tiny, monkeypatch, capsys):
    real_step, calls = seqtrain.train.train_step, []

    def slow_step(model, x, *rest):
        calls.append(x.device.type != "meta")
        if x.device.type != "meta":
            time.sleep(0.05)  # 11 steps an epoch: at least 0.55 s of training before the interrupt
        if sum(calls) == 12:  # Ctrl-C in the second epoch, after the first was checkpointed
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(model, x, *rest)

    monkeypatch.setattr(seqtrain.train, "train_step", slow_step)
    assert tiny("--stage", "0", "--max-epochs", "2", "--device", "cpu") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert tiny("--stage", "0", "--max-epochs", "2", "--device", "cpu") == 0
    result = json.loads((tiny.run_dir / "stage_00" / "cache" / "manifest.json").read_text())["result"]
    assert result["epochs"] == 2 and result["train_seconds"] >= 0.55 + 0.05


def test_your_own_network_gets_its_end_to_end_baseline(tmp_path, capsys, monkeypatch):
    torch.manual_seed(0)
    loads = []
    real_load = seqtrain.job.load_raw
    monkeypatch.setattr(seqtrain.job, "load_raw", lambda cfg: loads.append(cfg) or real_load(cfg))
    trunk = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
                          nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    stages = seqtrain.split(trunk, at=["1"])
    before = [p.clone() for p in stages[0].parameters()]
    settings = dict(run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), n_train=300, n_test=100,
                    max_epochs=1, batch_size=32, shard_mb=1, device="cpu")
    net = seqtrain.train_stages(stages, e2e=True, **settings)
    e2e = net.results["e2e"]
    assert e2e and e2e["epochs"] == 1 and net.results["versus"]["e2e"]["memory"] > 0
    assert "final vs e2e:" in "".join(capsys.readouterr())
    assert len(loads) == 1  # the baseline trains on the dataset the stages loaded
    assert not torch.equal(before[0], next(stages[0].parameters()))  # the stages trained in place
    saved = torch.load(tmp_path / "run" / "e2e" / "model.pt", weights_only=True)["model"]  # the baseline, a copy
    first = next(k for k in saved if k.startswith("stages.0.") and k.endswith("weight"))
    assert saved[first].shape == before[0].shape and not torch.equal(saved[first], next(stages[0].parameters()))


def test_a_run_says_what_disk_its_caches_take_before_writing_them(tmp_path, capsys):
    assert main(tiny_flags(tmp_path, "--max-epochs", "1", "--device", "cpu")) == 0
    out = "".join(capsys.readouterr())
    announce = next(line for line in out.splitlines() if line.startswith("caches: about"))
    assert out.index(announce) < out.index("stage 0: cached")
    written = sum(f.stat().st_size for f in (tmp_path / "run").glob("stage_*/cache/*.h5"))
    predicted = float(announce.split("about ")[1].split(" MB")[0].replace(",", ""))
    assert abs(predicted - written / 2**20) <= 0.5 + 0.01 * predicted


def fail_with_cuda_oom(model, x, *rest):
    if x.device.type != "meta":
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    return REAL_STEP(model, x, *rest)


REAL_STEP = seqtrain.train.train_step


def test_out_of_memory_is_one_line_with_the_fixes(tiny, monkeypatch, capsys):
    monkeypatch.setattr(seqtrain.train, "train_step", fail_with_cuda_oom)
    assert tiny("--stage", "0", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqtrain: error: stage 0 ran out of GPU memory (predicted peak")
    assert "--checkpoint" in err and "--batch-size" in err and "--stages" in err
    assert tiny("--stage", "e2e", "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "e2e ran out of GPU memory" in err and "--checkpoint" in err


def test_deterministic_switches_every_kernel_to_a_deterministic_algorithm(tiny, monkeypatch):
    seen = []
    real_fit = seqtrain.stage.fit

    def fit(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
                     os.environ.get("CUBLAS_WORKSPACE_CONFIG")))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(seqtrain.stage, "fit", fit)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", False)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert tiny("--stage", "0", "--max-epochs", "1", "--device", "cpu", "--deterministic") == 0
    assert seen == [(True, True, ":4096:8")]
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic  # put back
