"""Streaming loader for cached features: bounded memory, shuffled every epoch, the next shard prefetched.

Each epoch the shard order is permuted, shards are read whole (one contiguous read each, DESIGN.md
"Reading"), `mix` of them are pooled into a buffer whose samples are shuffled together, and a background
thread reads the next shard meanwhile. In steady state `resident_shards` shards are in memory: `mix` in
the buffer, one waiting in the queue and one being read; while a new group is pooled (`torch.cat`) the
group's shards and the pooled copy coexist for a moment. float16 becomes float32 in torch, per batch.

With DataLoader worker processes each worker streams a disjoint subset of the shards; HDF5 files are only
ever opened inside the process that reads them (h5py handles cannot cross fork or spawn).

A train split cached with V augmented views ([n, V, C, H, W]) yields one view per sample, drawn anew each
epoch (`views="draw"`), or all of them for the next stage's caching pass (`views="all"`).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from seqtrain.cache import read_shard


class ShardStream(IterableDataset):
    """Yields CPU batches (x float32, y, ids) from one split's shards; picklable (holds only paths)."""

    def __init__(self, parts: list[tuple[Path, int, int]], batch_size: int, *, shuffle: bool, seed: int,
                 resident_shards: int, drop_last: bool, views: str = "draw"):
        # parts: (shard path, first row, end row) -- whole shards, or a rank's contiguous slice of them
        self.parts = [(str(p), a, b) for p, a, b in parts]
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.mix = max(1, resident_shards - 2)
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
        carry: list[tuple[torch.Tensor, ...]] = []
        for group in grouped(prefetched(order), self.mix):
            x, y, ids = (torch.cat(parts) for parts in zip(*carry, *group))
            del group, carry  # only the pooled buffer stays resident
            n = len(y)
            perm = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            full = n // self.batch_size * self.batch_size
            for i in range(0, full, self.batch_size):
                idx = perm[i:i + self.batch_size]
                yield self.pick(x, idx, g), y[idx], ids[idx]
            rest = perm[full:]
            carry = [(x[rest], y[rest], ids[rest])] if len(rest) else []
            del x, y, ids
        if carry and not self.drop_last:
            x, y, ids = carry[0]
            yield self.pick(x, torch.arange(len(y)), g), y, ids

    def pick(self, x: torch.Tensor, idx: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Rows `idx` as float32; of a [n, V, C, H, W] split, one random view each (or all, or view 0)."""
        if x.ndim == 5 and self.views == "draw":
            return x[idx, torch.randint(x.shape[1], (len(idx),), generator=g)].float()
        if x.ndim == 5 and self.views == "plain":
            return x[idx, 0].float()
        return x[idx].float()


def prefetched(parts: list[tuple[str, int, int]]):
    """Read shards (rows [a, b) of each) in a background thread, one ahead of the consumer; torch releases the
    GIL while it computes, so reading the next shard overlaps with training on the current one."""
    q: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()

    def read_all():
        try:
            for p, a, b in parts:
                item = tuple(t[a:b] for t in read_shard(Path(p)))
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(None)
        except BaseException as e:  # handed to the consumer, which re-raises it where it is seen
            q.put(e)

    thread = threading.Thread(target=read_all, daemon=True, name="shard-prefetch")
    thread.start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def grouped(items, size: int):
    group = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


class CachedBatches:
    """(x, y, ids) batches of one split of a stage cache, on `device`; the same interface as ImageBatches."""

    def __init__(self, cache_dir: Path, manifest: dict, split: str, batch_size: int, *, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = False, resident_shards: int = 4, workers: int = 0,
                 device: str = "cpu", views: str = "draw", rows: tuple[int, int] | None = None):
        """`rows` = (start, end): only that contiguous range of the split's samples, in manifest order."""
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
        self.stream = ShardStream(parts, batch_size, shuffle=shuffle, seed=seed, resident_shards=resident_shards,
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
        for x, y, ids in batches:
            yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True), ids
