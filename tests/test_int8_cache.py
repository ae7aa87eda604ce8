"""int8 caches (--cache-dtype int8): per-channel quantization within half a step, the loader's dequantized
batches equal to read_shard's, refusals of what int8 cannot hold, exact plan bytes, and a tiny run that
resumes, verifies and composes as a float16 one does."""

from __future__ import annotations

import json
import os
import shutil
import signal

import h5py
import numpy as np
import pytest
import torch

import seqtrain.stage
import seqtrain.train
from seqtrain import load_model
from seqtrain.batches import ImageBatches
from seqtrain.cache import FeatureOverflow, ShardWriter, dequantize, quantize, read_manifest, read_shard
from seqtrain.config import Config
from seqtrain.data import load_raw
from seqtrain.files import load_torch
from seqtrain.job import resolve
from seqtrain.loader import CachedBatches, Pool
from seqtrain.models import build_stage_block
from seqtrain.plan import plan, shard_bytes, shard_extra
from seqtrain.run import main
from seqtrain.rundir import RunDir

from conftest import tiny_flags, train_manifest


def within_half_a_step(x: torch.Tensor, back: torch.Tensor, scale: torch.Tensor, slack: float = 1e-30) -> bool:
    """|back - x| <= scale / 2 in every channel of [..., C, H, W], up to float32's rounding of x / scale (and
    `slack`)."""
    step = scale.reshape(-1, 1, 1)
    return bool(((back - x).abs() <= step / 2 * (1 + 1e-5) + slack).all())


# --------------------------------------------------------------------------------------------------------
# Quantization


@pytest.mark.parametrize("shape", [(50, 6, 3, 3), (20, 2, 6, 3, 3)])  # [n, C, H, W] and [n, V, C, H, W]
def test_round_trip_error_is_at_most_half_a_step_per_channel(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g)
    x[..., 1, :, :] = 3.5  # constant, away from 0
    x[..., 2, :, :] = 0.0  # constant 0: a channel ReLU killed; no division by zero
    x[..., 3, :, :] = -5 - torch.rand(x[..., 3, :, :].shape, generator=g)  # negative only
    x[..., 4, :, :] = torch.relu(x[..., 4, :, :]) * 1e4  # post-ReLU, large
    x[..., 5, :, :] *= 1e-30  # a tiny range
    q, scale, zero = quantize(x.numpy())
    assert q.dtype == np.int8 and q.shape == x.shape and scale.shape == zero.shape == (6,)
    assert scale.dtype == np.float32 and zero.dtype == np.int8 and np.isfinite(scale).all() and (scale > 0).all()
    back = dequantize(torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(zero).float())
    assert back.dtype == torch.float32 and torch.isfinite(back).all()
    assert within_half_a_step(x, back, torch.from_numpy(scale))
    assert (back[..., 2, :, :] == 0).all() and (back[x == 0] == 0).all()  # zeros stay exactly 0
    assert torch.allclose(back[..., 1, :, :], torch.tensor(3.5), rtol=1e-6)  # a constant is an end of its range
    assert (back[..., 3, :, :] < 0).all()
    # per channel: channel 0's step follows its own range, not channel 4's (1e4 times larger)
    assert scale[0] < 1e-3 * scale[4]


def test_each_shard_is_scaled_by_its_own_range_and_read_back_as_float32(tmp_path):
    writer = ShardWriter(tmp_path, "train", samples_per_shard=10, dtype="int8", compression="none")
    x = torch.randn(30, 2, 4, 4) * torch.tensor([1.0, 100.0, 0.01]).repeat_interleave(10).view(30, 1, 1, 1)
    writer.add(x, torch.zeros(30, dtype=torch.long), torch.arange(30))
    shards = writer.close()
    scales = []
    for i, shard in enumerate(shards):
        with h5py.File(tmp_path / shard.file) as f:
            assert f["features"].dtype == np.int8 and f["scale"].shape == f["zero_point"].shape == (2,)
            scales.append(torch.from_numpy(f["scale"][...]))
        back, _, ids = read_shard(tmp_path / shard.file)
        assert back.dtype == torch.float32 and torch.equal(ids, torch.arange(10 * i, 10 * i + 10))
        assert within_half_a_step(x[ids], back, scales[-1])
    assert (scales[1] > 50 * scales[0]).all() and (scales[2] < scales[0] / 50).all()


def test_a_range_too_wide_for_float32_is_refused_and_nothing_is_written(tmp_path):
    writer = ShardWriter(tmp_path, "val", samples_per_shard=8, dtype="int8", compression="none")
    x = torch.zeros(4, 2, 2, 2)
    x[0, 1], x[1, 1] = 3e38, -3e38  # finite, but (max - min) / 255 * 255 is not
    writer.add(x, torch.zeros(4, dtype=torch.long), torch.arange(4))
    with pytest.raises(FeatureOverflow, match=r"^val features of channel 1 span -3e\+38 to 3e\+38.*--cache-dtype "
                                              "float32$"):
        writer.close()
    assert list(tmp_path.iterdir()) == []  # no shard, no temporary file


def test_non_finite_features_are_refused_before_anything_is_written(tmp_path):
    writer = ShardWriter(tmp_path, "train", samples_per_shard=8, dtype="int8", compression="none")
    x = torch.ones(4, 2, 2, 2)
    x[2, 0, 1, 1] = float("nan")
    with pytest.raises(FeatureOverflow, match="train features contain inf or nan"):
        writer.add(x, torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("dtype", ["float16", "int8"])
@pytest.mark.parametrize("shape", [(4, 32, 32), (64, 2, 2), (2, 8, 8, 8)])  # the last: 2 views of [8, 8, 8]
def test_plan_predicts_each_shards_bytes_exactly(tmp_path, dtype, shape):
    writer = ShardWriter(tmp_path, "train", samples_per_shard=96, dtype=dtype, compression="none")
    writer.add(torch.randn(200, *shape), torch.zeros(200, dtype=torch.long), torch.arange(200))
    row = int(np.prod(shape)) * np.dtype(dtype).itemsize
    for shard in writer.close():
        assert shard.bytes == shard_bytes(shard.count, row, shard_extra(shape, dtype))


# --------------------------------------------------------------------------------------------------------
# The loader


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """1000 samples of 2 views of [8, 8, 8] in int8 shards of 64, each shard with its own range; and
    read_shard's dequantized features of every sample, by id."""
    d = tmp_path_factory.mktemp("int8")
    writer = ShardWriter(d, "train", samples_per_shard=64, dtype="int8", compression="none")
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(1000)
    x = torch.randn(1000, 2, 8, 8, 8, generator=g) * (1 + ids // 64).view(-1, 1, 1, 1, 1)  # N, V, C, H, W
    x[:, :, 3] = -x[:, :, 3].abs()  # a negative channel
    writer.add(x, ids % 10, ids)
    manifest = train_manifest(writer.close(), (8, 8, 8), dtype="int8", views=2)
    expected = torch.cat([read_shard(d / s.file)[0] for s in manifest.splits["train"].shards])
    return d, manifest, expected


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_batches_equal_read_shard_and_pools_hold_int8(cache, workers, monkeypatch):
    d, manifest, expected = cache
    pools = []
    real_init = Pool.__init__
    monkeypatch.setattr(Pool, "__init__", lambda self, *a: real_init(self, *a) or pools.append(self))
    # 1 MB: pools of about 6 of the 17 shards, so batches mix shards and leftover rows move between pools
    loader = CachedBatches(d, manifest, "train", batch_size=50, shuffle=True, seed=2, shuffle_mb=0.5, views="all",
                           workers=workers)
    seen = []
    for x, y, ids in loader:
        assert x.dtype == torch.float32 and torch.equal(x, expected[ids]) and torch.equal(y, ids % 10)
        seen.append(ids)
    assert sorted(torch.cat(seen).tolist()) == list(range(1000))
    assert any(len(set((ids // 64).tolist())) > 1 for ids in seen)  # batches that span shards
    if not workers:  # pools in this process: int8 rows and their shard index, within --shuffle-mb
        assert len(pools) == 2 and all(p.x.dtype == torch.int8 for p in pools)
        assert sum(p.x.nbytes + p.y.nbytes + p.ids.nbytes + p.part.nbytes for p in pools) <= 2**20


def test_loader_draws_one_dequantized_view_per_sample(cache):
    d, manifest, expected = cache
    for views in ("draw", "plain"):
        for x, _, ids in CachedBatches(d, manifest, "train", batch_size=64, shuffle=True, views=views):
            same = (x[:, None] == expected[ids]).flatten(2).all(2)  # B, V: which view each row is
            assert (same.sum(1) >= 1).all() and (views == "draw" or same[:, 0].all())


# --------------------------------------------------------------------------------------------------------
# A tiny run


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A tiny two-stage --stage all run with int8 caches: (its flags, its run directory)."""
    d = tmp_path_factory.mktemp("int8-run")
    flags = tiny_flags(d, "--cache-dtype", "int8")
    assert main([*flags, "--stage", "all"]) == 0
    return flags, d / "run"


def test_int8_run_composes_like_float16(int8_run):
    _, run_dir = int8_run
    cfg = Config.from_dict(json.loads((run_dir / "config.json").read_text()))
    raw = load_raw(cfg)
    x, y, _ = next(iter(ImageBatches(raw.test, raw.mean, raw.std, batch_size=100)))
    # Stage 0's cache: int8 on disk, and read back within half a step of each shard's scale of the live pass.
    block = build_stage_block(list(resolve(cfg).specs[0]))
    block.load_state_dict(load_torch(run_dir / "stage_00" / "block.pt")["block"])
    with torch.no_grad():
        live = block.eval()(x)
    shard = run_dir / "stage_00" / "cache" / "test-00000.h5"
    with h5py.File(shard) as f:
        assert f["features"].dtype == np.int8
        scale = torch.from_numpy(f["scale"][...])
    cached, _, ids = read_shard(shard)
    # slack: the caching pass ran batches of 32, this one of 100, and convolutions round by batch size
    assert torch.equal(ids, torch.arange(100)) and within_half_a_step(live, cached, scale, slack=1e-5)
    # The composed network never reads the cache: its accuracy on raw images is the saved model's.
    final = json.loads((run_dir / "final" / "results.json").read_text())["final"]
    net = load_model(run_dir / "final" / "model.pt")
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(final["test_acc"], abs=1e-6)
    assert abs(final["test_acc"] - final["cached_path_test_acc"]) <= 0.02  # pipeline.assemble_final's tolerance
    # --plan counts every stage's int8 cache to the byte.
    p = plan(cfg)
    for k, stage in enumerate(p["stages"]):
        manifest = read_manifest(RunDir(run_dir).cache(k))
        assert manifest.dtype == "int8" and manifest.bytes == stage["cache_bytes"]


def test_int8_run_verifies_and_a_second_run_trains_nothing(int8_run, capsys):
    flags, run_dir = int8_run
    manifests = sorted(run_dir.glob("stage_*/cache/manifest.json"))
    before = [m.read_bytes() for m in manifests]
    capsys.readouterr()
    assert main(["--verify", "--run-dir", str(run_dir)]) == 0
    assert "stage 1: complete" in capsys.readouterr().out
    assert main([*flags, "--stage", "all"]) == 0
    assert capsys.readouterr().out.count("complete, skipped") == 3  # two stages and the final network
    assert [m.read_bytes() for m in manifests] == before


def test_a_stage_reading_an_int8_cache_resumes_to_the_same_cache(int8_run, tmp_path, monkeypatch, capsys):
    flags, original = int8_run
    run_dir = tmp_path / "run"
    shutil.copytree(original, run_dir)
    flags = [*flags[:flags.index("--run-dir")], "--run-dir", str(run_dir), *flags[flags.index("--run-dir") + 2:]]
    shutil.rmtree(run_dir / "stage_01")  # stage 1 must train again, from stage 0's int8 cache
    real_step, calls = seqtrain.train.train_step, []

    def step(model, x, *rest):
        calls.append(x.device.type != "meta")  # the memory-balanced cut steps on the meta device first
        if sum(calls) == 14:  # Ctrl-C in the second epoch (11 steps an epoch)
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(model, x, *rest)

    monkeypatch.setattr(seqtrain.train, "train_step", step)
    assert main([*flags, "--stage", "all"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert main([*flags, "--stage", "all"]) == 0
    out = capsys.readouterr().out
    assert "stage 0/1: complete, skipped" in out and "stage 1/1: resuming in epoch 2 after step 3" in out
    resumed, straight = (read_manifest(RunDir(r).cache(1)) for r in (run_dir, original))
    assert resumed.fingerprint == straight.fingerprint  # the same weights, the same int8 features


def test_non_finite_features_stop_an_int8_stage_with_one_line(tmp_path, monkeypatch, capsys):
    real_write = seqtrain.stage.write_shards

    class Poisoned(torch.nn.Module):
        """The trained block, with one inf in the features of its caching pass."""

        def __init__(self, block):
            super().__init__()
            self.block = block

        def forward(self, x):
            out = self.block(x).clone()
            out[0, 0, 0, 0] = float("inf")
            return out

    monkeypatch.setattr(seqtrain.stage, "write_shards", lambda block, *a, **kw: real_write(Poisoned(block), *a,
                                                                                              **kw))
    assert main(tiny_flags(tmp_path, "--cache-dtype", "int8", "--max-epochs", "1", "--stage", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqtrain: error: train features contain inf or nan") and err.count("\n") == 1
    cache = tmp_path / "run" / "stage_00" / "cache"
    assert not (cache / "manifest.json").exists() and not list(cache.glob("*.tmp"))
