"""Tiny configurations: two stages of a 4-channel ResNet-20 on a few hundred synthetic images, ~1 s a stage.

They say `--device cpu`: the tests mean the CPU, and `--device auto` would make them CUDA on a machine with a
GPU (under torchrun, NCCL with one rank per GPU, so 2 ranks on a 1-GPU machine stop at local rank 1). A test
that means CUDA appends its own `--device cuda` (the last flag wins); tests/test_fake_cuda.py does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from seqtrain.contract import Identity, Manifest, ShardInfo, SplitInfo
from seqtrain.run import main

ROOT = Path(__file__).resolve().parents[1]


def tiny_flags(tmp_path: Path, *extra: str) -> list[str]:
    return ["--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--n-train", "400",
            "--n-test", "100", "--width", "4", "--head-width", "8", "--stages", "2", "--max-epochs", "3",
            "--batch-size", "32", "--shard-mb", "1", "--device", "cpu", *extra]


@pytest.fixture
def tiny(tmp_path):
    """Run the CLI in-process on the tiny configuration; returns its exit status (output via capsys)."""

    def run(*args: str) -> int:
        return main(tiny_flags(tmp_path, *args))

    run.run_dir = tmp_path / "run"
    run.data_dir = tmp_path / "data"
    return run


def run_cli(args: list[str], **kw) -> subprocess.CompletedProcess:
    """The real command line in a fresh process, as a user types it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "seqtrain.run", *args], capture_output=True, text=True, env=env,
                          cwd=kw.pop("cwd", ROOT), **kw)


def train_manifest(shards: list[ShardInfo], feature_shape: tuple[int, ...], dtype: str = "float16",
                   views: int = 1) -> Manifest:
    """The manifest of a cache whose train split is `shards` (val and test empty), for reading them with
    loader.CachedBatches without a stage having made them."""
    empty = SplitInfo(0, ())
    train = SplitInfo(sum(s.count for s in shards), tuple(shards))
    return Manifest(identity=Identity("test", None, 0), weights_hash="", num_classes=10, feature_shape=feature_shape,
                    views=views, dtype=dtype, compression="none", splits={"train": train, "val": empty, "test": empty},
                    result=None, fingerprint="")
