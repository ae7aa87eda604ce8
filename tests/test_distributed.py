"""Two gloo ranks on the CPU under torchrun, as a user launches them: the whole pipeline completes, each
rank caches its own contiguous slice, and the cache holds every sample exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch.distributed as dist

from seqtrain.config import Config
from seqtrain.data import load_raw

from conftest import ROOT, tiny_flags

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(args: list[str], ranks: int = 2) -> subprocess.CompletedProcess:
    # One thread per rank: two ranks on two cores, as `torchrun` itself would advise.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", "-m", "seqtrain.run", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_two_ranks_complete_the_pipeline_and_cache_every_sample_once(tmp_path):
    flags = tiny_flags(tmp_path, "--augment", "crop", "--cache-views", "2")
    proc = torchrun(["--stage", "all", *flags])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 ranks" in proc.stdout and proc.stdout.count("final network: test acc") == 1  # rank 0 speaks
    run = tmp_path / "run"
    raw = load_raw(Config.from_dict(json.loads((run / "config.json").read_text())))
    for k in (0, 1):
        cache = run / f"stage_{k:02d}" / "cache"
        manifest = json.loads((cache / "manifest.json").read_text())
        for split in ("train", "val", "test"):
            files = [s["file"] for s in manifest["splits"][split]["shards"]]
            assert {f.split("-")[1] for f in files} == {"rank0", "rank1"}  # each rank wrote its own shards
            ids = np.concatenate([h5py.File(cache / f)["ids"][...] for f in files])
            # Every sample exactly once, in order: rank 0's contiguous slice, then rank 1's.
            assert np.array_equal(ids, getattr(raw, split).ids.numpy())
        assert h5py.File(cache / files[0])["features"].ndim == 4
        train_file = manifest["splits"]["train"]["shards"][0]["file"]
        assert h5py.File(cache / train_file)["features"].shape[1] == 2  # both views of every sample
    assert (run / "final" / "model.pt").exists() and not list(run.rglob("*.tmp"))

    # A second launch finds every stage complete and trains nothing.
    again = torchrun(["--stage", "all", *flags])
    assert again.returncode == 0 and again.stdout.count("complete, skipped") == 3
