"""Streaming loader for cached features: bounded memory, shuffled every epoch, the next pool read meanwhile.

Each epoch the shard order is permuted and shards are read whole (one contiguous read each, docs/design.md
"Reading") straight into one of two pre-allocated pools (h5py `read_direct`, no intermediate copy): while
the consumer draws shuffled batches from one pool, a background thread fills the other with the next
shards. A pool is the shuffle window, `--shuffle-mb` of rows (at least one shard); the loader's host memory
is the two pools, never a pool and its parts at once. Rows left over when a pool runs out (fewer than a
batch) move to the front of the next pool and are shuffled with it.

A split that fits in the two pools' memory is read once and kept (`Resident`): each later epoch draws the
very batches streaming would (the same windows, permutations and leftovers, as indices into the resident
rows), without reading again or waiting for a read at the epoch's start. This is what makes a small split's
stage as fast as one fed from RAM (docs/design.md, "Reading").

Batches leave in the cache's dtype; float16 becomes float32 on the device (half the host-to-device bytes
on a GPU). int8 rows are dequantized there too: pools hold the int8 codes and, per
row, the index of the shard it came from; the shards' scales and zero points sit in a small table
([shards, C]), and each batch carries the entries of the shards it draws from (cache.dequantize).

Under torchrun each rank reads only the rows it trains on: the epoch's shard order is the same on every
rank, and rank r of W takes the r-th of W contiguous ranges of rows of that sequence (whole shards, and at
most two partial ones: contiguous reads still), which it pools, shuffles and batches alone, in batches of
its share of the global batch. Every rank stops at the fewest batches any rank has (DDP needs the same
number of steps on each), a count every rank computes alike from (seed, epoch, world, workers).

With DataLoader worker processes each worker streams a disjoint subset of the (rank's) shards with its own
two pools; HDF5 files are only ever opened inside the process that reads them (h5py handles cannot cross
fork or spawn). The feature bytes read from HDF5 are counted (`CachedBatches.bytes_read`), in shared memory
when workers read them.

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
from seqtrain.contract import Manifest

PART_BYTES = 4  # an int8 pool's int32 shard index per row, beside the row itself


def window_rows(shuffle_mb: float, row_bytes: int, batch_size: int) -> int:
    """Rows of shards one pool (the shuffle window) may hold within --shuffle-mb, room for a batch of leftover
    rows included. ShardStream raises it to one whole shard and caps it at the (rank's share of the) split;
    plan.py predicts the same for one rank, an upper bound for each of several."""
    return int(shuffle_mb * 2**20) // row_bytes - batch_size


def windows(parts: list[tuple], rows: int) -> list[list[int]]:
    """The indices of `parts` that fill each pool of `rows` rows in turn: whole parts, in order, as many as fit."""
    out, n = [], rows
    for i, (_, a, b) in enumerate(parts):
        if n + b - a > rows:
            out.append([])
            n = 0
        out[-1].append(i)
        n += b - a
    return out


def row_range(parts: list[tuple], lo: int, hi: int) -> list[tuple]:
    """Rows [lo, hi) of the rows of `parts` ((shard, first row, end row) laid end to end), as such parts."""
    out, start = [], 0
    for path, a, b in parts:
        x, y = a + max(lo - start, 0), a + min(hi - start, b - a)
        if x < y:
            out.append((path, x, y))
        start += b - a
    return out


def local_batch(batch_size: int, rank: int, world: int) -> int:
    """Rank `rank`'s rows of a global batch of `batch_size` (rows r, r + W, ...)."""
    return len(range(rank, batch_size, world))


class ShardStream(IterableDataset):
    """Yields CPU batches (x in the cache's dtype, y, ids) from one split's shards; picklable (holds only paths
    and a shared counter)."""

    def __init__(self, parts: list[tuple[Path, int, int]], batch_size: int, *, shuffle: bool, seed: int,
                 pool_rows: int, drop_last: bool, views: str = "draw", rank: int = 0, world: int = 1,
                 workers: int = 0, keep: bool = True):
        # parts: (shard path, first row, end row) -- whole shards, or a contiguous slice of them.
        # batch_size is the global batch: rank `rank` of `world` streams its own rows of it (local_batch).
        self.parts = [(str(p), a, b) for p, a, b in parts]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world = rank, world
        # At least one shard (or a whole rank's share, when that is smaller), at most the rank's share.
        share = -(-sum(b - a for _, a, b in self.parts) // world)
        self.pool_rows = min(max(pool_rows, max((b - a for _, a, b in self.parts), default=1)), max(1, share))
        self.drop_last, self.epoch, self.views = drop_last, 0, views
        # Feature bytes read from HDF5, one slot per worker (each written by its own reader thread alone);
        # in shared memory when worker processes read, so that this process sees their counts.
        self.read_bytes = torch.zeros(max(1, workers), dtype=torch.int64)
        if workers:
            self.read_bytes.share_memory_()
        # Keep the split in memory when it fits in the two pools' rows and every epoch reads the same rows
        # (one rank, or a fixed order): not with worker processes, each of which streams its own shards.
        front = local_batch(batch_size, rank, world)
        self.keep = keep and not workers and (world == 1 or not shuffle) and \
            share + front <= 2 * (self.pool_rows + front)
        self.resident: Resident | None = None

    def epoch_seed(self) -> int:
        return self.seed * 100_003 + self.epoch  # order depends on (seed, epoch) only: resumes reproduce it

    def rank_parts(self, rank: int) -> list[tuple[str, int, int]]:
        """This epoch's shard order (the same on every rank), cut to rank `rank`'s contiguous range of rows."""
        order = self.parts
        if self.shuffle:
            g = torch.Generator().manual_seed(self.epoch_seed())
            order = [order[i] for i in torch.randperm(len(order), generator=g)]
        if self.world == 1:
            return order
        n = sum(b - a for _, a, b in order)
        return row_range(order, rank * n // self.world, (rank + 1) * n // self.world)

    def worker_parts(self, worker: int, num_workers: int, rank: int | None = None) -> list[tuple[str, int, int]]:
        """The share of rank `rank`'s parts (this rank's by default) that worker `worker` of `num_workers` streams."""
        return self.rank_parts(self.rank if rank is None else rank)[worker::num_workers]

    def rank_batches(self, rank: int, num_workers: int) -> int:
        """Batches rank `rank` could yield this epoch. Each worker batches its own shards and keeps (or drops)
        its own leftover rows, so with workers the count depends on which shards each one streams."""
        total, b = 0, local_batch(self.batch_size, rank, self.world)
        for w in range(max(1, num_workers)):
            rows = sum(y - x for _, x, y in self.worker_parts(w, max(1, num_workers), rank))
            total += rows // b if self.drop_last else -(-rows // b)
        return total

    def num_batches(self, num_workers: int) -> int:
        """Batches this epoch yields on every rank: the fewest any rank has, so that all take as many steps."""
        return min(self.rank_batches(r, num_workers) for r in range(self.world))

    def __iter__(self):
        worker = get_worker_info()
        wid = worker.id if worker else 0
        order = self.worker_parts(wid, worker.num_workers) if worker else self.worker_parts(0, 1)
        g = torch.Generator().manual_seed(self.epoch_seed() * 101 + wid + (self.rank << 32))
        if not order:
            return
        if self.keep and worker is None:
            if self.resident is None:
                self.resident = Resident(order, self.read_bytes[0])
            yield from self.resident_batches(order, g)
            return
        # each pool keeps room before its shards for the previous pool's leftover rows
        size = front = local_batch(self.batch_size, self.rank, self.world)
        held = None  # (pool, its leftover rows) while they wait to be moved into the next pool
        with Pools(order, self.pool_rows, front, self.read_bytes[wid]) as pools:
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
                full = (c + n) // size * size
                for i in range(0, full, size):
                    yield self.batch(pools, pool, perm[i:i + size], g)
                held = (pool, perm[full:]) if full < c + n else None
                if held is None:
                    pools.release(pool)
            if held is not None and not self.drop_last:
                yield self.batch(pools, *held, g)

    def resident_batches(self, order: list[tuple[str, int, int]], g: torch.Generator):
        """The batches __iter__ would stream from `order`, drawn from the resident rows: the same windows,
        the same random draws, the leftover rows carried into the next window as indices."""
        size, res = local_batch(self.batch_size, self.rank, self.world), self.resident
        held = torch.empty(0, dtype=torch.int64)
        for window in windows(order, self.pool_rows):
            rows = torch.cat([held] + [res.rows(order[i]) for i in window])
            perm = torch.randperm(len(rows), generator=g) if self.shuffle else torch.arange(len(rows))
            full = len(rows) // size * size
            for i in range(0, full, size):
                yield self.batch(res, res.pool, rows[perm[i:i + size]], g)
            held = rows[perm[full:]]
        if len(held) and not self.drop_last:
            yield self.batch(res, res.pool, held, g)

    def batch(self, pools: Pools | Resident, pool: Pool, idx: torch.Tensor,
              g: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Rows `idx` of `pool`: (x, y, ids), and for int8 (each row's shard in the batch's own table, the
        table's scales [S, C], its zero points [S, C], from `pools`) for the few shards the batch draws from."""
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
    so reading the next shards overlaps training on the current ones. `read_bytes` (a one-element tensor)
    counts the feature bytes read."""

    def __init__(self, parts: list[tuple[str, int, int]], rows: int, front: int, read_bytes: torch.Tensor):
        assert all(b - a <= rows for _, a, b in parts), f"a part exceeds the pool's {rows} rows"
        self.parts, self.rows, self.front, self.read_bytes = parts, rows, front, read_bytes
        self.filled: queue.Queue = queue.Queue(maxsize=1)
        self.free: queue.Queue = queue.Queue()
        self.stop = threading.Event()

    def __enter__(self) -> Pools:
        row_shape, dtype = shard_layout(self.parts[0][0])
        # int8: row i of these is the scale and zero point of part i, filled as the part is read
        self.scale, self.zero = quantization_tables(len(self.parts), row_shape, dtype)
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
            for window in windows(self.parts, self.rows):
                pool = self.free.get()
                if pool is None or self.stop.is_set():
                    return
                n = 0
                for i in window:
                    n += read_part(self.parts[i], i, pool, self.front + n, self, self.read_bytes)
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


class Resident:
    """A whole (rank's share of a) split read once into one pool, rows laid out part after part; each part's
    rows are found by (path, first row, end row). For int8, the parts' scale and zero point tables."""

    def __init__(self, parts: list[tuple[str, int, int]], read_bytes: torch.Tensor):
        row_shape, dtype = shard_layout(parts[0][0])
        self.pool = Pool(sum(b - a for _, a, b in parts), row_shape, dtype)
        self.scale, self.zero = quantization_tables(len(parts), row_shape, dtype)
        self.start, n = {}, 0
        for i, part in enumerate(parts):
            self.start[part] = n
            n += read_part(part, i, self.pool, n, self, read_bytes)

    def rows(self, part: tuple[str, int, int]) -> torch.Tensor:
        """The resident rows of `part`, in order."""
        return torch.arange(self.start[part], self.start[part] + part[2] - part[1])


def quantization_tables(parts: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> tuple:
    """Empty per-part scale and zero point tables [parts, C] for int8 shards; (None, None) for float ones."""
    if dtype != torch.int8:
        return None, None
    return torch.empty(parts, row_shape[-3]), torch.empty(parts, row_shape[-3])


def read_part(part: tuple[str, int, int], i: int, pool: Pool, at: int, tables, read_bytes: torch.Tensor) -> int:
    """Read part `i` (shard path, first row, end row) into `pool` at row `at`; for int8, mark its rows as part i
    and put its scale and zero point in row i of `tables`' scale and zero tables. Returns the rows read."""
    path, a, b = part
    quant = read_shard_into(Path(path), a, b, pool, at)
    read_bytes += (b - a) * pool.x[0].nbytes
    if quant is not None:
        pool.part[at:at + b - a] = i
        tables.scale[i], tables.zero[i] = quant
    return b - a


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

    def __init__(self, cache_dir: Path, manifest: Manifest, split: str, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, shuffle_mb: float = 64, workers: int = 0,
                 device: str = "cpu", views: str = "draw", rows: tuple[int, int] | None = None,
                 rank: int = 0, world: int = 1, keep: bool = True):
        """`rows` = (start, end): only that contiguous range of the split's samples, in manifest order;
        `shuffle_mb`: the rows of one of the two pools, the shuffle window (at least one shard, whatever the
        bound); `keep`: keep a split that fits in the two pools in memory across epochs (read once);
        `rank` of `world`: read and batch only this rank's range of each epoch's rows, in batches of its
        rows of the global `batch_size`, and stop where the rank with the fewest batches stops."""
        info = manifest.splits[split]
        lo, hi = rows if rows is not None else (0, info.count)
        parts = row_range([(cache_dir / s.file, 0, s.count) for s in info.shards], lo, hi)
        self.num_samples, self.batch_size = hi - lo, batch_size
        self.drop_last = drop_last
        self.workers, self.device = workers, torch.device(device)
        row_bytes = max(1, info.bytes // max(1, info.count))
        row_bytes += PART_BYTES if manifest.dtype == "int8" else 0
        pool_rows = window_rows(shuffle_mb, row_bytes, local_batch(batch_size, rank, world))
        self.stream = ShardStream(parts, batch_size, shuffle=shuffle, seed=seed, pool_rows=pool_rows,
                                  drop_last=drop_last, views=views, rank=rank, world=world, workers=workers,
                                  keep=keep)
        self.passes = 0  # epochs iterated: bytes_read / passes is what one epoch reads

    @property
    def bytes_read(self) -> int:
        """Feature bytes this stream (and its workers) has read from HDF5 so far."""
        return int(self.stream.read_bytes.sum())

    def set_epoch(self, epoch: int) -> None:
        self.stream.epoch = epoch

    def release(self) -> None:
        """Let go of the rows kept in memory (a later epoch reads them again)."""
        self.stream.resident = None

    def __len__(self) -> int:
        return self.stream.num_batches(self.workers)

    def __iter__(self):
        self.passes += 1
        pin = self.device.type == "cuda"
        if self.workers:
            batches = iter(DataLoader(self.stream, batch_size=None, num_workers=self.workers, pin_memory=pin))
        else:
            batches = (tuple(t.pin_memory() for t in b) if pin else b for b in self.stream)
        # Every rank takes len(self) steps, the fewest of any rank: a rank with more stops early, and its
        # reader thread (closed here) or worker processes (when their iterator goes) stop with it.
        try:
            for _, (x, y, ids, *quant) in zip(range(len(self)), batches):
                x = x.to(self.device, non_blocking=True)  # as stored; float32 on the device
                if quant:  # int8: each row's shard in the batch's table, the table's scales and zero points
                    part, scale, zero = (t.to(self.device, non_blocking=True) for t in quant)
                    x = dequantize(x, scale[part], zero[part])
                yield x.float(), y.to(self.device, non_blocking=True), ids
        finally:
            if hasattr(batches, "close"):
                batches.close()
