"""Streaming loader for cached features: bounded memory, shuffled every epoch, the next pool read meanwhile.

Each epoch the shard order is permuted and shards are read whole (one contiguous read each, docs/design.md
"Reading") straight into one of two pre-allocated pools (h5py `read_direct`, no intermediate copy): while
the consumer draws shuffled batches from one pool, a background thread fills the other with the next
shards. So the loader's host memory is the two pools, `--loader-mb` in all, never a pool and its parts at
once. Rows left over when a pool runs out (fewer than a batch) move to the front of the next pool and are
shuffled with it. Batches leave in the cache's dtype; float16 becomes float32 on the device (half the
host-to-device bytes on a GPU). int8 rows are dequantized there too: pools hold the int8 codes and, per
row, the index of the shard it came from; the shards' scales and zero points sit in a small table
([shards, C]), and each batch carries the entries of the shards it draws from (cache.dequantize).

With DataLoader worker processes each worker streams a disjoint subset of the shards with its own two
pools; HDF5 files are only ever opened inside the process that reads them (h5py handles cannot cross fork
or spawn).

A train split cached with V augmented views ([n, V, C, H, W]) yields one view per sample, drawn anew each
epoch (`views="draw"`), or all of them for the next stage's caching pass (`views="all"`).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seqtrain.cache import CorruptCache, dequantize, read_quantization

PART_BYTES = 4  # an int8 pool's int32 shard index per row, beside the row itself


def budget_rows(loader_mb: int, row_bytes: int, batch_size: int) -> int:
    """Rows of shards one pool may hold within --loader-mb: two pools, each with room for a batch of leftover
    rows. ShardStream raises it to one whole shard and caps it at the split; plan.py predicts the same."""
    return loader_mb * 2**20 // 2 // row_bytes - batch_size


class ShardStream(IterableDataset):
    """Yields CPU batches (x in the cache's dtype, y, ids) from one split's shards; picklable (holds only paths)."""

    def __init__(self, parts: list[tuple[Path, int, int]], batch_size: int, *, shuffle: bool, seed: int,
                 pool_rows: int, drop_last: bool, views: str = "draw"):
        # parts: (shard path, first row, end row) -- whole shards, or a rank's contiguous slice of them
        self.parts = [(str(p), a, b) for p, a, b in parts]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        # At least one shard, at most the whole split: a small cache gets small pools.
        self.pool_rows = max(min(pool_rows, sum(b - a for _, a, b in self.parts)),
                             max((b - a for _, a, b in self.parts), default=1))
        self.drop_last, self.epoch, self.views = drop_last, 0, views

    def epoch_seed(self) -> int:
        return self.seed * 100_003 + self.epoch  # order depends on (seed, epoch) only: resumes reproduce it

    def worker_parts(self, worker: int, num_workers: int) -> list[tuple[str, int, int]]:
        """This epoch's shard order, and the share of it that worker `worker` of `num_workers` streams."""
        order = self.parts
        if self.shuffle:
            g = torch.Generator().manual_seed(self.epoch_seed())
            order = [order[i] for i in torch.randperm(len(order), generator=g)]
        return order[worker::num_workers]

    def num_batches(self, num_workers: int) -> int:
        """Batches this epoch yields. Each worker batches its own shards and keeps (or drops) its own leftover
        rows, so with workers the count depends on which shards each one streams this epoch."""
        total = 0
        for w in range(max(1, num_workers)):
            rows = sum(b - a for _, a, b in self.worker_parts(w, max(1, num_workers)))
            total += rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)
        return total

    def __iter__(self):
        worker = get_worker_info()
        order = self.worker_parts(worker.id, worker.num_workers) if worker else self.worker_parts(0, 1)
        g = torch.Generator().manual_seed(self.epoch_seed() * 101 + (worker.id if worker else 0))
        if not order:
            return
        front = self.batch_size  # each pool keeps room before its shards for the previous pool's leftover rows
        held = None  # (pool, its leftover rows) while they wait to be moved into the next pool
        with Pools(order, self.pool_rows, front) as pools:
            for pool, n in pools:
                c = 0
                if held is not None:
                    prev, rest = held
                    c = len(rest)
                    for mine, theirs in zip(pool.tensors(), prev.tensors()):
                        mine[front - c:front] = theirs[rest]
                    pools.release(prev)
                perm = torch.randperm(c + n, generator=g) if self.shuffle else torch.arange(c + n)
                perm += front - c
                full = (c + n) // self.batch_size * self.batch_size
                for i in range(0, full, self.batch_size):
                    yield self.batch(pools, pool, perm[i:i + self.batch_size], g)
                held = (pool, perm[full:]) if full < c + n else None
                if held is None:
                    pools.release(pool)
            if held is not None and not self.drop_last:
                yield self.batch(pools, *held, g)

    def batch(self, pools: Pools, pool: Pool, idx: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Rows `idx` of `pool`: (x, y, ids), and for int8 (each row's shard in the batch's own table, the
        table's scales [S, C], its zero points [S, C]) for the few shards the batch draws from."""
        x, y, ids = self.pick(pool.x, idx, g), pool.y[idx], pool.ids[idx]
        if pool.part is None:
            return x, y, ids
        parts, row_part = torch.unique(pool.part[idx], return_inverse=True)
        return x, y, ids, row_part, pools.scale[parts], pools.zero[parts]

    def pick(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Rows `idx` (a copy); of a [n, V, C, H, W] split, one random view each (or all, or view 0)."""
        if x.ndim == 5 and self.views == "draw":
            return x[idx, torch.randint(x.shape[1], (len(idx),), generator=g)]
        if x.ndim == 5 and self.views == "plain":
            return x[idx, 0]
        return x[idx]


class Pool:
    """One pre-allocated buffer of `rows` samples: features, labels, ids (shape and dtype from the shards)."""

    def __init__(self, rows: int, row_shape: tuple[int, ...], dtype: torch.dtype):
        self.x = torch.empty(rows, *row_shape, dtype=dtype)
        self.y = torch.empty(rows, dtype=torch.int64)
        self.ids = torch.empty(rows, dtype=torch.int64)
        # int8: the part (shard) each row was read from, an index into Pools' scale and zero point tables
        self.part = torch.empty(rows, dtype=torch.int32) if dtype == torch.int8 else None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.x, self.y, self.ids) if self.part is None else (self.x, self.y, self.ids, self.part)


class Pools:
    """Two pools; a background thread reads whole shards (rows [a, b) of each) straight into the free one,
    after its first `front` rows, while the consumer draws from the other. Iterating yields (pool, rows
    read); `release` hands a pool back to be filled again. torch and h5py release the GIL while they work,
    so reading the next shards overlaps training on the current ones."""

    def __init__(self, parts: list[tuple[str, int, int]], rows: int, front: int):
        self.parts, self.rows, self.front = parts, rows, front
        self.filled: queue.Queue = queue.Queue(maxsize=1)
        self.free: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    def __enter__(self) -> Pools:
        row_shape, dtype = shard_layout(self.parts[0][0])
        # int8: row i of these is the scale and zero point of part i, filled as the part is read
        self.scale = self.zero = None
        if dtype == torch.int8:
            self.scale, self.zero = (torch.empty(len(self.parts), row_shape[-3]) for _ in range(2))
        for _ in range(2):
            self.free.put(Pool(self.front + self.rows, row_shape, dtype))
        self.thread = threading.Thread(target=self.fill_all, daemon=True, name="shard-prefetch")
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()  # a consumer that stops early (Ctrl-C, an error) must not leave the reader blocked
        self.free.put(None)

    def fill_all(self) -> None:
        try:
            i = 0  # the next part to read
            while i < len(self.parts):
                pool = self.free.get()
                if pool is None or self.stop.is_set():
                    return
                n = 0
                while i < len(self.parts) and n + self.parts[i][2] - self.parts[i][1] <= self.rows:
                    path, a, b = self.parts[i]
                    quant = read_shard_into(Path(path), a, b, pool, self.front + n)
                    if quant is not None:
                        pool.part[self.front + n:self.front + n + b - a] = i
                        self.scale[i], self.zero[i] = quant
                    n, i = n + b - a, i + 1
                self.hand_over((pool, n))
            self.hand_over(None)
        except BaseException as e:  # handed to the consumer, which re-raises it where it is seen
            self.hand_over(e)

    def hand_over(self, item) -> None:
        while not self.stop.is_set():
            try:
                self.filled.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self):
        while (item := self.filled.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def release(self, pool: Pool) -> None:
        self.free.put(pool)


def shard_layout(path: str) -> tuple[tuple[int, ...], torch.dtype]:
    """The row shape and dtype of a shard's features, from its metadata (nothing is read)."""
    try:
        with h5py.File(path, "r") as f:
            d = f["features"]
            return tuple(d.shape[1:]), torch.from_numpy(np.empty(0, dtype=d.dtype)).dtype
    except (OSError, KeyError) as e:
        raise CorruptCache(f"{path} cannot be read ({e})") from None


def read_shard_into(path: Path, a: int, b: int, pool: Pool, at: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Rows [a, b) of a shard into `pool` at row `at`: one contiguous read per dataset, no intermediate copy.
    Returns an int8 shard's (scale, zero point) [C], None for a float shard."""
    try:
        with h5py.File(path, "r") as f:
            for name, dest in (("features", pool.x), ("labels", pool.y), ("ids", pool.ids)):
                f[name].read_direct(dest.numpy(), np.s_[a:b], np.s_[at:at + b - a])
            return read_quantization(f, path)
    except (OSError, KeyError, TypeError) as e:
        raise CorruptCache(f"{path} cannot be read ({e})") from None


class CachedBatches:
    """(x, y, ids) batches of one split of a stage cache, on `device`: a batches.Batches stream."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, loader_mb: int = 128, workers: int = 0,
                 device: str = "cpu", views: str = "draw", rows: tuple[int, int] | None = None):
        """`rows` = (start, end): only that contiguous range of the split's samples, in manifest order;
        `loader_mb`: host memory for the two pools (each holds at least one shard, whatever the bound)."""
        parts, start = [], 0
        lo, hi = rows if rows is not None else (0, manifest["splits"][split]["count"])
        for s in manifest["splits"][split]["shards"]:
            a, b = max(lo, start) - start, min(hi, start + s["count"]) - start
            if a < b:
                parts.append((cache_dir / s["file"], a, b))
            start += s["count"]
        self.num_samples, self.batch_size = hi - lo, batch_size
        self.drop_last = drop_last
        self.workers, self.device = workers, torch.device(device)
        info = manifest["splits"][split]
        row_bytes = max(1, sum(s["bytes"] for s in info["shards"]) // max(1, info["count"]))
        row_bytes += PART_BYTES if manifest.get("dtype") == "int8" else 0
        self.stream = ShardStream(parts, batch_size, shuffle=shuffle, seed=seed,
                                  pool_rows=budget_rows(loader_mb, row_bytes, batch_size),
                                  drop_last=drop_last, views=views)

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def __len__(self) -> int:
        return self.stream.num_batches(self.workers)

    def __iter__(self):
        pin = self.device.type == "cuda"
        if self.workers:
            batches = DataLoader(self.stream, batch_size=None, num_workers=self.workers, pin_memory=pin)
        else:
            batches = (tuple(t.pin_memory() for t in b) if pin else b for b in self.stream)
        for x, y, ids, *quant in batches:  # x goes to the device as it is stored and becomes float32 there
            x = x.to(self.device, non_blocking=True)
            if quant:  # int8: each row's shard in the batch's table, the table's scales and zero points
                part, scale, zero = (t.to(self.device, non_blocking=True) for t in quant)
                x = dequantize(x, scale[part], zero[part])
            yield x.float(), y.to(self.device, non_blocking=True), ids
