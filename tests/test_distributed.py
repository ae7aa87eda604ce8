"""Two gloo ranks on the CPU under torchrun, as a user launches them: the whole pipeline completes, each
rank caches its own contiguous slice, and the cache holds every sample exactly once; Ctrl-C stops both
ranks after the same step, rank 0 alone says so, and the rerun ends with the weights of an uninterrupted run."""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch
import torch.distributed as dist

from seqtrain import distributed
from seqtrain.config import Config
from seqtrain.data import load_raw
from seqtrain.errors import UserError
from seqtrain.files import load_torch
from seqtrain.run import build_parser
from seqtrain.streams import cached_train_order

from conftest import ROOT, tiny_flags

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


# One thread per rank: two ranks on two cores, as `torchrun` itself would advise.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def torchrun_command(args: list[str], ranks: int = 2) -> list[str]:
    # --device cpu first (a later --device in args wins): gloo ranks, also on a machine with GPUs, where
    # --device auto would make NCCL ranks and a 1-GPU machine would stop at local rank 1.
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m",
            "seqtrain.run", "--device", "cpu", *args]


def test_every_launch_that_means_the_cpu_says_so(tmp_path):
    """On a GPU machine --device auto is CUDA: each launch of a CPU test or script must name the CPU."""
    spec = importlib.util.spec_from_file_location("killtest", ROOT / "scripts" / "killtest.py")
    killtest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(killtest)
    commands = {"torchrun": torchrun_command(tiny_flags(tmp_path)), "killtest --ranks 2": killtest.command(tmp_path, 2)}
    for name, argv in commands.items():
        args = build_parser().parse_args(argv[argv.index("seqtrain.run") + 1:])  # seqtrain's flags
        assert getattr(args, "device", None) == "cpu", name


def torchrun(args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(torchrun_command(args, ranks), capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=600)


@pytest.mark.slow
def test_two_ranks_complete_the_pipeline_and_cache_every_sample_once(tmp_path):
    flags = tiny_flags(tmp_path, "--augment", "crop", "--cache-views", "2")
    proc = torchrun(["--stage", "all", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout and proc.stdout.count("final network: test acc") == 1  # rank 0 speaks
    run = tmp_path / "run"
    cfg = Config.from_dict(json.loads((run / "config.json").read_text()))
    raw = load_raw(cfg)
    # the train split is cached in a random order of --data-seed's (pipeline.frozen_image_batches)
    shuffled = cached_train_order(cfg, len(raw.train))
    order = {"train": raw.train.ids[shuffled].numpy(), "val": raw.val.ids.numpy(), "test": raw.test.ids.numpy()}
    for k in (0, 1):
        cache = run / f"stage_{k:02d}" / "cache"
        manifest = json.loads((cache / "manifest.json").read_text())
        for split in ("train", "val", "test"):
            files = [s["file"] for s in manifest["splits"][split]["shards"]]
            assert {f.split("-")[1] for f in files} == {"rank0", "rank1"}  # each rank wrote its own shards
            ids = np.concatenate([h5py.File(cache / f)["ids"][...] for f in files])
            # Every sample exactly once, in order: rank 0's contiguous slice, then rank 1's.
            assert np.array_equal(ids, order[split])
        assert h5py.File(cache / files[0])["features"].ndim == 4
        train_file = manifest["splits"]["train"]["shards"][0]["file"]
        assert h5py.File(cache / train_file)["features"].shape[1] == 2  # both views of every sample
    assert (run / "final" / "model.pt").exists() and not list(run.rglob("*.tmp"))

    # A second launch finds every stage complete and trains nothing.
    again = torchrun(["--stage", "all", *flags])
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 3


@pytest.mark.slow
def test_ctrl_c_under_torchrun_stops_both_ranks_at_one_step_and_resumes_identically(tmp_path):
    flags = ["--stage", "0", "--n-train", "1000", "--patience", "10"]
    straight = torchrun([*flags, *tiny_flags(tmp_path / "straight")])
    assert straight.returncode == 0, straight.stderr[-3000:]

    # Ctrl-C in a terminal reaches torchrun alone (each rank has a session of its own); torchrun forwards it.
    d = tmp_path / "interrupted"
    proc = subprocess.Popen(torchrun_command([*flags, *tiny_flags(d)]), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    metrics = d / "run" / "stage_00" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    ours = [line for line in err.splitlines() if line.startswith("seqtrain:")]
    assert len(ours) == 1 and ": interrupted " in ours[0], err[-3000:]  # rank 0 alone speaks
    # torchrun itself reports the signal with its own traceback and exits 1 (docs/distributed.md).
    assert proc.returncode == 1 and "SignalException" in err
    assert load_torch(d / "run" / "stage_00" / "checkpoint.pt")["epoch"] >= 1

    again = torchrun([*flags, *tiny_flags(d)])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {ours[0].split(' interrupted ')[1].split(';')[0]}" in again.stdout
    a, b = (load_torch(x / "run" / "stage_00" / "block.pt") for x in (tmp_path / "straight", d))
    for part in ("block", "head"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), f"{part} differs after the resume"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_the_process_group_waits_long_enough_for_rank_0_to_prepare_the_data(monkeypatch, device):
    # Rank 0 alone decodes the dataset while the others wait at a barrier: torch's default timeouts
    # (NCCL 10 minutes, gloo 30) would abort an ImageNet run there.
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append((backend, kw)))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.init(device).type == device
    backend = {"cpu": "gloo", "cuda": "nccl"}[device]
    assert joined == [(backend, {"timeout": datetime.timedelta(minutes=distributed.DEFAULT_TIMEOUT_MIN)})]
    assert distributed.DEFAULT_TIMEOUT_MIN >= 120
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "7.5")
    distributed.init(device)
    assert joined[-1][1]["timeout"] == datetime.timedelta(minutes=7.5)


@pytest.mark.parametrize("value", ["soon", "0", "-5", "inf", "nan"])
def test_a_bad_timeout_is_a_one_line_error_naming_the_variable(monkeypatch, value):
    monkeypatch.setattr(dist, "init_process_group", lambda *a, **kw: pytest.fail("joined with a bad timeout"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(distributed.TIMEOUT_ENV, value)
    with pytest.raises(UserError, match=f"^{distributed.TIMEOUT_ENV}=.* is not a number of minutes above 0"):
        distributed.init("cpu")
