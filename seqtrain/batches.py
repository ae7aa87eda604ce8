"""Batch streams: the one protocol every source of training and evaluation batches follows.

A stream yields (x, y, ids) batches, x [B, C, H, W] float on its device (or [B, V, C, H, W] for every cached
view of a sample), and knows its length in batches and the epoch it is in, so that the order of batches
depends on (seed, epoch) alone and a resumed run sees the same ones:

- `ImageBatches` (here): raw images held in RAM, normalised on the device;
- `loader.CachedBatches`: a stage's cached features, streamed from HDF5 shards;
- wrappers that transform another stream's batches (`BatchWrapper`): `augment.AugmentedBatches` (random
  crop/flip while training) and `augment.ViewBatches` (every cached view, for caching).

Under torchrun each source yields only this rank's rows (docs/design.md, "Distributed"), read and copied to
the device by this rank alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from seqtrain.data import Split


class Batches(Protocol):
    """What train.fit, train.evaluate and cache.write_shards read."""

    num_samples: int

    def set_epoch(self, epoch: int) -> None: ...

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]: ...



class ImageBatches:
    """Normalised float batches (x, y, ids) from an in-memory Split; shuffled by (seed, epoch) when asked.

    Normalising on the device keeps host-to-device traffic at one byte per pixel. Rank `rank` of `world`
    takes rows r, r + W, ... of every global batch of `batch_size`, before they are copied to the device.
    """

    def __init__(self, split: Split, mean: list[float], std: list[float], batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, device: str = "cpu",
                 rank: int = 0, world: int = 1, rows: torch.Tensor | None = None):
        """`rows`: the split's rows to yield, in this order (unshuffled), instead of all of them in order."""
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.rows = torch.arange(len(split)) if rows is None else rows
        self.rank, self.world = rank, world
        self.drop_last, self.device, self.epoch = drop_last, torch.device(device), 0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.rows)

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.rows)
        if self.shuffle:  # order depends only on (seed, epoch): a resumed run sees the same batches
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = self.rows[torch.randperm(n, generator=g)]
        else:
            order = self.rows
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size][self.rank::self.world]
            x = self.split.x[idx].to(self.device, non_blocking=True).float().div_(255)
            yield (x.sub_(self.mean).div_(self.std), self.split.y[idx].to(self.device, non_blocking=True),
                   self.split.ids[idx])


class BatchWrapper:
    """Base of batch streams that transform another's batches (augmentation, views): the same interface as
    ImageBatches, with epoch and length passed through."""

    def __init__(self, batches):
        self.batches = batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    @property
    def num_samples(self) -> int:
        return self.batches.num_samples

    def __len__(self) -> int:
        return len(self.batches)
