"""The cached-feature loader: every sample once per epoch, a new order each epoch, the same order on resume,
with and without DataLoader worker processes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seqtrain import loader as loader_module
from seqtrain.cache import ShardWriter
from seqtrain.loader import CachedBatches

from conftest import train_manifest

N = 1000


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """1000 samples of shape (2, 3, 3) whose features encode their id, in shards of 64."""
    d = tmp_path_factory.mktemp("cache")
    writer = ShardWriter(d, "train", samples_per_shard=64, dtype="float16", compression="none")
    ids = torch.arange(N)
    writer.add(ids.float().view(-1, 1, 1, 1).expand(N, 2, 3, 3) / 8, ids % 10, ids)
    shards = writer.close()
    return d, train_manifest(shards, (2, 3, 3))


def epoch_ids(loader, epoch):
    loader.set_epoch(epoch)
    batches = list(loader)
    for x, y, ids in batches:
        assert x.dtype == torch.float32 and x.shape[1:] == (2, 3, 3)
        assert torch.equal(x[:, 0, 0, 0], ids.float() / 8) and torch.equal(y, ids % 10)  # rows stay aligned
    return torch.cat([ids for _, _, ids in batches]).numpy()


def test_unshuffled_reads_every_sample_in_order(cache):
    loader = CachedBatches(*cache, "train", batch_size=100)
    assert len(loader) == 10
    assert (epoch_ids(loader, 0) == np.arange(N)).all()


@pytest.mark.parametrize("workers", [0, 2])
def test_shuffled_epochs_cover_every_sample_once_in_a_new_order(cache, workers):
    loader = CachedBatches(*cache, "train", batch_size=50, shuffle=True, seed=3, workers=workers)
    first, second = epoch_ids(loader, 0), epoch_ids(loader, 1)
    assert sorted(first) == list(range(N)) and sorted(second) == list(range(N))
    assert (first != second).any()
    assert (epoch_ids(loader, 0) == first).all()  # the order depends on (seed, epoch) only: resumes match


def test_drop_last_drops_only_the_final_partial_batch(cache):
    loader = CachedBatches(*cache, "train", batch_size=96, shuffle=True, drop_last=True)
    ids = epoch_ids(loader, 0)
    assert len(loader) == N // 96 and len(ids) == N // 96 * 96 and len(set(ids)) == len(ids)


def test_pools_stay_within_the_loader_budget_and_mix_shards(tmp_path, monkeypatch):
    # 1,000 rows of 2 KiB in shards of 64 (128 KiB): a 1 MiB budget gives two pools of two shards each.
    writer = ShardWriter(tmp_path, "train", samples_per_shard=64, dtype="float16", compression="none")
    ids = torch.arange(N)
    writer.add(ids.float().view(-1, 1, 1, 1).expand(N, 1, 32, 32) / 8, ids % 10, ids)
    manifest = train_manifest(writer.close(), (1, 32, 32))
    pools = []
    monkeypatch.setattr(loader_module.Pool, "__init__", record(loader_module.Pool.__init__, pools))
    loader = CachedBatches(tmp_path, manifest, "train", batch_size=64, shuffle=True, shuffle_mb=0.5)
    batches = list(loader)
    assert len(pools) == 2 and sum(p.x.nbytes + p.y.nbytes + p.ids.nbytes for p in pools) <= 2**20
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(N))
    assert all(len(set((b[2] // 64).tolist())) >= 2 for b in batches)  # every batch spans shards


def record(init, pools):
    def wrapped(self, *args, **kw):
        init(self, *args, **kw)
        pools.append(self)
    return wrapped


@pytest.mark.parametrize("drop_last", [True, False])
def test_length_counts_the_batches_that_arrive_with_workers(cache, drop_last):
    # Each worker streams its own shards and keeps or drops its own leftover rows: len() must count that,
    # or the learning-rate schedule counts the wrong steps (and a batch no worker can fill divides by zero).
    for batch_size in (50, 300, 900):
        loader = CachedBatches(*cache, "train", batch_size=batch_size, shuffle=True, drop_last=drop_last, workers=2)
        for epoch in range(2):
            loader.set_epoch(epoch)
            assert len(loader) == sum(1 for _ in loader), (batch_size, epoch)


def mb_of_rows(cache, rows: int) -> float:
    """The --shuffle-mb of a window of `rows` rows, with the loader's measure of a row (shard bytes / rows)."""
    shards = cache[1].splits["train"].shards
    return rows * (sum(s.bytes for s in shards) // N) / 2**20


def all_batches(loader, epochs):
    out = []
    for epoch in epochs:
        loader.set_epoch(epoch)
        out += [tuple(t.clone() for t in batch) for batch in loader]
    return out


@pytest.mark.parametrize("batch_size, drop_last", [(64, True), (50, False)])
def test_a_split_that_fits_is_read_once_and_batched_as_streaming_would(cache, batch_size, drop_last, monkeypatch):
    # Windows of 600 rows: two hold the split of 1,000, which is kept; the same loader without `keep`
    # streams it in two pools. Both yield identical batches, every epoch.
    kw = {"batch_size": batch_size, "shuffle": True, "seed": 7, "drop_last": drop_last,
          "shuffle_mb": mb_of_rows(cache, 600 + batch_size)}
    streamed = CachedBatches(*cache, "train", keep=False, **kw)
    kept = CachedBatches(*cache, "train", **kw)
    assert kept.stream.keep and not streamed.stream.keep
    pools = []
    monkeypatch.setattr(loader_module.Pool, "__init__", record(loader_module.Pool.__init__, pools))
    epochs = range(3)
    want, got = all_batches(streamed, epochs), all_batches(kept, epochs)
    assert len(want) == len(got) == 3 * len(kept) and all(
        all(torch.equal(a, b) for a, b in zip(w, g)) for w, g in zip(want, got))
    assert kept.bytes_read == N * 36 and streamed.bytes_read == 3 * N * 36  # read once, against every epoch
    assert len(pools) == 3 * 2 + 1  # two pools per streamed epoch, one for the kept split
    # a fresh loader starting at epoch 2 (a resumed run) draws the same batches
    again = all_batches(CachedBatches(*cache, "train", **kw), [2])
    assert all(torch.equal(a, b) for w, g in zip(want[-len(again):], again) for a, b in zip(w, g))
    kept.release()
    assert kept.stream.resident is None and len(all_batches(kept, [0])) == len(kept)


def test_a_split_larger_than_two_windows_streams(cache):
    loader = CachedBatches(*cache, "train", batch_size=64, shuffle=True, shuffle_mb=mb_of_rows(cache, 300 + 64))
    assert not loader.stream.keep  # two windows of 300 rows < 1,000 rows: streamed, in bounded memory
    epoch_ids(loader, 0)
    assert loader.stream.resident is None and loader.bytes_read == N * 36
