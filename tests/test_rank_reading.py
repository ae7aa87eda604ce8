"""Rank-strided reading (docs/design.md, "Distributed"): under torchrun each rank reads from the previous cache
only the rows it trains on, and every rank takes the same number of steps; one rank's order is the order
of before; the cache check is split across the ranks and agrees on a damaged shard.

The loader is checked with explicit ranks in one process; the pipeline with two gloo processes started as
torchrun starts them (RANK, WORLD_SIZE and a rendezvous address in the environment), so that each rank's
own output and exit status can be seen.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile

import h5py
import pytest
import torch
import torch.distributed as dist

from seqtrain.cache import ShardWriter
from seqtrain.loader import CachedBatches
from seqtrain.run import main

from conftest import ROOT, tiny_flags, train_manifest

N = 1000  # samples in the loader's cache, shards of 64


def make_cache(d, views: int = 2, dtype: str = "float16"):
    """N samples of [views, 2, 16, 16] whose features encode their id and view: rows of 2 KiB (float16, 2
    views), so that --shuffle-mb 0.5 pools hold 3 shards and batches cross pool boundaries."""
    d.mkdir()
    writer = ShardWriter(d, "train", samples_per_shard=64, dtype=dtype, compression="none")
    ids = torch.arange(N)
    x = ids.float().view(-1, 1, 1, 1, 1).expand(N, views, 2, 16, 16) / 8
    x = x + torch.arange(views).view(1, -1, 1, 1, 1) / 1024
    writer.add(x if views > 1 else x[:, 0], ids % 10, ids)
    return d, train_manifest(writer.close(), (2, 16, 16), dtype=dtype, views=views)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    d = tmp_path_factory.mktemp("caches")
    return {"views": make_cache(d / "views"), "int8": make_cache(d / "int8", views=1, dtype="int8")}


def digest(loader: CachedBatches, epochs=(0, 1)) -> str:
    h = hashlib.sha256()
    for epoch in epochs:
        loader.set_epoch(epoch)
        for x, _, ids in loader:
            h.update(ids.numpy().tobytes())
            h.update(x.numpy().tobytes())
    return h.hexdigest()[:16]


# Digests of epochs 0 and 1 (ids and features, so the drawn views too) from the loader before rank-strided
# reading (commit 65dbbb3, torch 2.14.1): (cache, batch size, workers, drop_last, --loader-mb,
# twice --shuffle-mb) -> batches, digest: the 128 MB cases keep the split in memory, the 1 MB cases stream it.
BEFORE = {
    ("views", 50, 0, True, 128): (20, "62a0bd02ceaac0b4"),
    ("views", 96, 2, True, 128): (10, "c84410c74779ba52"),
    ("views", 64, 0, False, 1): (16, "3a07445c7744b02f"),
    ("views", 32, 2, False, 1): (32, "0b0d5d761e267d33"),
    ("int8", 64, 0, False, 1): (16, "db931db0e7702128"),
}


@pytest.mark.parametrize("case", BEFORE)
def test_one_rank_reads_in_the_order_of_before(caches, case):
    name, batch_size, workers, drop_last, loader_mb = case
    loader = CachedBatches(*caches[name], "train", batch_size, shuffle=True, seed=3, drop_last=drop_last,
                           workers=workers, shuffle_mb=loader_mb / 2)
    assert (len(loader), digest(loader)) == BEFORE[case]


def rank_epochs(cache, world: int, batch_size: int, workers: int, epochs=(0, 1, 2)):
    """Per epoch, each rank's (length, batches of ids) (rank r of `world`, all in this process); the loaders."""
    loaders = [CachedBatches(*cache, "train", batch_size, shuffle=True, seed=5, drop_last=True, workers=workers,
                             shuffle_mb=0.5, rank=r, world=world) for r in range(world)]
    out = []
    for epoch in epochs:
        for loader in loaders:
            loader.set_epoch(epoch)
        out.append([(len(loader), [ids for _, _, ids in loader]) for loader in loaders])
    return out, loaders


@pytest.mark.parametrize("workers", [0, 2])
def test_ranks_read_disjoint_rows_take_equal_steps_and_cover_the_split(caches, workers):
    B = 96
    epochs, _ = rank_epochs(caches["views"], 2, B, workers)
    orders = []
    for (n0, first), (n1, second) in epochs:
        assert n0 == n1 == len(first) == len(second) > 0  # DDP's lockstep: the length every rank is told
        ranks = [first, second]
        assert all(len(ids) == B // 2 for batches in ranks for ids in batches)  # each rank's half of B
        mine = [set(torch.cat(batches).tolist()) for batches in ranks]
        assert not mine[0] & mine[1]  # no sample read, or trained on, by both ranks
        seen = torch.cat([torch.cat(batches) for batches in ranks]).tolist()
        assert len(seen) == len(set(seen)) == len(ranks[0]) * B  # each sample at most once per epoch
        if not workers:  # only the global batch's leftover is dropped
            assert N - len(seen) < B
        orders.append(seen)
    assert orders[0] != orders[1]  # a new order each epoch, and with it a new choice of dropped rows
    # The dropped rows rotate with the epochs' orders: over three epochs (almost) every sample is trained on.
    assert len(set().union(*orders)) > N - 5
    again, _ = rank_epochs(caches["views"], 2, B, workers, epochs=(1,))
    assert all(torch.equal(a, b) for r in range(2) for a, b in zip(again[0][r][1], epochs[1][r][1]))  # resumable


def test_step_counts_agree_whatever_each_rank_could_do(caches):
    # Ranks' shares differ by a row (1000 rows in 333, 333, 334: 1, 1 and 2 batches of 167) and, with
    # workers, each worker drops its own leftover: every rank is told, and gets, the fewest any rank has.
    for world, B, workers in ((3, 501, 0), (3, 96, 2)):
        loaders = [CachedBatches(*caches["views"], "train", B, shuffle=True, seed=1, drop_last=True,
                                 workers=workers, shuffle_mb=0.5, rank=r, world=world) for r in range(world)]
        could = set()
        for epoch in range(2):
            for loader in loaders:
                loader.set_epoch(epoch)
            each = [loaders[0].stream.rank_batches(r, max(1, workers)) for r in range(world)]
            could.add(len(set(each)) > 1)
            assert [len(loader) for loader in loaders] == [min(each)] * world
            assert [sum(1 for _ in loader) for loader in loaders] == [min(each)] * world, (world, B, workers)
        assert could == {True}  # the ranks could have taken different numbers of steps


def test_each_rank_reads_about_half_the_bytes_of_one(caches):
    _, (alone,) = rank_epochs(caches["views"], 1, 96, 0, epochs=(0, 1))
    _, pair = rank_epochs(caches["views"], 2, 96, 2, epochs=(0, 1))
    row = 2 * 2 * 16 * 16 * 2  # views x C x H x W x float16
    assert alone.bytes_read == 2 * N * row  # the whole split once per epoch, nothing twice
    for rank in pair:
        assert rank.bytes_read / rank.passes < 0.6 * alone.bytes_read / alone.passes
    # The shares, counted where worker processes read them (a rank that stops early may leave rows unread).
    assert 0.9 * alone.bytes_read < sum(rank.bytes_read for rank in pair) <= alone.bytes_read


# --------------------------------------------------------------------------------------------------------
# Two gloo processes


gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def launch(args: list[str], ranks: int = 2, timeout: int = 300) -> list[subprocess.CompletedProcess]:
    """`python ARGS` as each of `ranks` ranks of one job, as torchrun starts them; every rank's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "WORLD_SIZE": str(ranks)}
    # Output to files, not pipes: a rank blocked on a full pipe would hold up the other at a collective.
    with contextlib.ExitStack() as stack:
        files = [[stack.enter_context(tempfile.TemporaryFile("w+")) for _ in "oe"] for _ in range(ranks)]
        procs = [subprocess.Popen([sys.executable, *args], stdout=out, stderr=err, text=True, cwd=ROOT,
                                  env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
                 for r, (out, err) in enumerate(files)]
        try:
            codes = [p.wait(timeout) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        for pair in files:
            for f in pair:
                f.seek(0)
        return [subprocess.CompletedProcess(p.args, code, out.read(), err.read())
                for p, code, (out, err) in zip(procs, codes, files)]


ONE_EPOCH = ("--max-epochs", "1")  # what is read, not what is learnt, matters here


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """A run directory whose stage 0 is complete (one process): stage 1's input."""
    d = tmp_path_factory.mktemp("stage0")
    assert main(tiny_flags(d, "--stage", "0", *ONE_EPOCH)) == 0
    return d


def copy_run(stage0, d) -> list[str]:
    shutil.copytree(stage0 / "run", d / "run")
    shutil.copytree(stage0 / "data", d / "data")
    return tiny_flags(d, *ONE_EPOCH)


READER = """
import dataclasses, json, sys
from seqtrain import distributed
from seqtrain.config import Config
from seqtrain.job import resolve
from seqtrain.rundir import RunDir, require_input_cache
from seqtrain.streams import cached_batches
run = RunDir(sys.argv[1])
cfg = Config.from_dict(json.loads(run.config.read_text())).validate()
device = distributed.init("cpu")
prev = require_input_cache(cfg, resolve(cfg), run, 1)
out = {}
for workers in (0, 2):
    train = cached_batches(dataclasses.replace(cfg, workers=workers), run.cache(0), prev, "train", device, True)
    out[f"steps {workers}"] = len(train)
    for epoch in (0, 1):
        train.set_epoch(epoch)
        out[f"train {workers} {epoch}"] = [ids.tolist() for _, _, ids in train]
for split in ("val", "test"):
    out[split] = [ids.tolist() for _, _, ids in cached_batches(cfg, run.cache(0), prev, split, device, False)]
distributed.shutdown()
print(json.dumps(out))
"""


@gloo
def test_two_gloo_ranks_train_and_evaluate_on_disjoint_shares(stage0, tmp_path):
    copy_run(stage0, tmp_path)
    procs = launch(["-c", READER, str(tmp_path / "run")])
    assert all(p.returncode == 0 for p in procs), procs[0].stderr[-3000:] + procs[1].stderr[-3000:]
    ranks = [json.loads(p.stdout) for p in procs]
    manifest = json.loads((tmp_path / "run" / "stage_00" / "cache" / "manifest.json").read_text())
    B = 32  # tiny_flags' --batch-size: the global batch
    for workers in (0, 2):
        assert ranks[0][f"steps {workers}"] == ranks[1][f"steps {workers}"] > 0
        for epoch in (0, 1):
            mine = [r[f"train {workers} {epoch}"] for r in ranks]
            assert len(mine[0]) == len(mine[1]) == ranks[0][f"steps {workers}"]
            assert all(len(ids) == B // 2 for batches in mine for ids in batches)
            seen = [i for batches in mine for ids in batches for i in ids]
            assert len(seen) == len(set(seen))  # trained on once at most, by one rank
            if not workers:
                assert manifest["splits"]["train"]["count"] - len(seen) < B
    cache = tmp_path / "run" / "stage_00" / "cache"
    for split in ("val", "test"):  # contiguous parts: together the whole split, in order
        ids = [i for r in ranks for batch in r[split] for i in batch]
        assert ids == [i for s in manifest["splits"][split]["shards"] for i in h5py.File(cache / s["file"])["ids"]]
        assert 0 < len(ranks[0][split][0]) <= B // 2  # batches of a rank's share of the global batch


@gloo
@pytest.mark.slow
def test_two_ranks_record_half_the_reading_of_one(stage0, tmp_path):
    alone = copy_run(stage0, tmp_path / "alone")
    assert main([*alone, "--stage", "1"]) == 0
    pair = copy_run(stage0, tmp_path / "pair")
    procs = launch(["-m", "seqtrain.run", *pair, "--stage", "1"])
    assert all(p.returncode == 0 for p in procs), procs[0].stderr[-3000:] + procs[1].stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "run" / "stage_01" / "cache" / "manifest.json").read_text())["result"]
                ["read_mb_per_rank_epoch"] for d in ("alone", "pair"))
    cache = json.loads((tmp_path / "alone" / "run" / "stage_00" / "cache" / "manifest.json").read_text())
    shards = cache["splits"]["train"]["shards"]
    assert one["rank0"] == one["max"] <= sum(s["bytes"] for s in shards) / 2**20  # features: the split, once
    assert one["rank0"] > 0.9 * sum(s["bytes"] for s in shards) / 2**20
    assert 0 < two["rank0"] <= two["max"] < 0.6 * one["max"]
    assert "MB per rank and epoch" in procs[0].stdout


@gloo
def test_a_damaged_shard_any_rank_checks_is_every_ranks_one_line_error(stage0, tmp_path):
    flags = copy_run(stage0, tmp_path)
    cache = tmp_path / "run" / "stage_00" / "cache"
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = [s["file"] for split in ("train", "val", "test") for s in manifest["splits"][split]["shards"]]
    damaged = cache / shards[1]  # rank 1 checksums shards 1, 3, ...: rank 0 never reads this one's checksum
    data = bytearray(damaged.read_bytes())
    data[-100] ^= 0xFF  # same size: only the checksum can tell
    damaged.write_bytes(bytes(data))
    procs = launch(["-m", "seqtrain.run", *flags, "--stage", "1"])
    for p in procs:
        assert p.returncode == 2, p.stderr[-3000:]
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and f"{damaged} is corrupt" in lines[0] and "--stage 0" in lines[0], p.stderr[-3000:]
    assert procs[0].stderr == procs[1].stderr


@pytest.mark.parametrize("name, shuffle_mb", [("views", 1.2), ("int8", 0.35)])
def test_a_kept_split_yields_the_streamed_batches_views_and_int8_scales_included(caches, name, shuffle_mb):
    # windows of about 600 rows: the 1,000-row split fits in two and is kept, or streams in two pools
    kw = {"batch_size": 64, "shuffle": True, "seed": 3, "shuffle_mb": shuffle_mb}
    kept, streamed = (CachedBatches(*caches[name], "train", keep=k, **kw) for k in (True, False))
    assert kept.stream.keep and not streamed.stream.keep
    assert digest(kept, (0, 1, 2)) == digest(streamed, (0, 1, 2))
    row = {"views": 2 * 2 * 16 * 16 * 2, "int8": 2 * 16 * 16}[name]
    assert kept.bytes_read == N * row and streamed.bytes_read == 3 * N * row  # once, against every epoch
    # evaluation: a rank's contiguous part, unshuffled, kept across epochs
    kw = {"batch_size": 32, "views": "plain", "rows": (500, 1000), "shuffle_mb": shuffle_mb}
    kept, streamed = (CachedBatches(*caches[name], "train", keep=k, **kw) for k in (True, False))
    assert digest(kept, (0, 1)) == digest(streamed, (0, 1)) and kept.bytes_read == 500 * row
