"""--compression lz4 and zstd (hdf5plugin's filters): shards are smaller and read back exactly, the next stage
trains from them, and without hdf5plugin both values are refused in one line before anything is written,
as is a cache written with them."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from seqtrain import cache
from seqtrain.cache import ShardWriter, read_shard
from seqtrain.run import main

from conftest import tiny_flags

pytest.importorskip("hdf5plugin")


@pytest.mark.parametrize("compression", ["lz4", "zstd"])
def test_a_compressed_shard_is_smaller_and_reads_back_exactly(tmp_path, compression):
    rng = np.random.default_rng(0)
    # ReLU-like features: a third zeros, the rest smooth; compressible as real features are
    x = np.maximum(rng.normal(size=(64, 8, 16, 16)).cumsum(axis=-1), 0).astype(np.float32)
    shards = {}
    for c in ("none", compression):
        (tmp_path / c).mkdir()
        w = ShardWriter(tmp_path / c, "train", samples_per_shard=64, dtype="float16", compression=c)
        w.add(torch.from_numpy(x), torch.zeros(64, dtype=torch.int64), torch.arange(64))
        shards[c] = w.close()[0]
    assert shards[compression].bytes < 0.9 * shards["none"].bytes
    a, b = (read_shard(tmp_path / c / shards[c].file)[0] for c in ("none", compression))
    assert torch.equal(a, b)


def without_hdf5plugin(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(cache.importlib.util, "find_spec", lambda name, *a: None if name == "hdf5plugin"
                        else real(name, *a))


def test_stage_one_trains_from_an_lz4_cache_which_needs_hdf5plugin_to_read(tmp_path, monkeypatch, capsys):
    assert main(tiny_flags(tmp_path, "--stage", "0", "--compression", "lz4")) == 0
    manifest = json.loads((tmp_path / "run" / "stage_00" / "cache" / "manifest.json").read_text())
    assert manifest["compression"] == "lz4"
    with monkeypatch.context() as m:
        without_hdf5plugin(m)
        capsys.readouterr()
        assert main(tiny_flags(tmp_path, "--stage", "1")) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "needs the hdf5plugin package" in err, err
    assert main(tiny_flags(tmp_path, "--stage", "all")) == 0 and main(tiny_flags(tmp_path, "--verify")) == 0


def test_without_hdf5plugin_zstd_is_refused_in_one_line_and_nothing_is_written(tmp_path, monkeypatch, capsys):
    without_hdf5plugin(monkeypatch)
    assert main(tiny_flags(tmp_path, "--stage", "all", "--compression", "zstd")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--compression zstd needs the hdf5plugin package: pip install hdf5plugin" in err
    assert not (tmp_path / "run").exists()
