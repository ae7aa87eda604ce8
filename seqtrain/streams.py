"""The batch streams a stage reads: raw images for stage 0 and e2e, the previous cache for stage k > 0.

Each comes in two kinds: batches to train on (shuffled, augmented, this rank's share of every global batch)
or to evaluate on, and the frozen pass that caches the stage's output (this rank's contiguous slice of the
split, in order, every cached view of each sample).
"""

from __future__ import annotations

from pathlib import Path

import torch

from seqtrain import distributed
from seqtrain.augment import AugmentedBatches, ViewBatches, augment_for
from seqtrain.batches import ImageBatches
from seqtrain.config import Config
from seqtrain.contract import Manifest
from seqtrain.data import RawData
from seqtrain.errors import UserError
from seqtrain.loader import CachedBatches, local_batch


def image_batches(cfg: Config, raw: RawData, split: str, device, train: bool):
    """Raw-image batches to train on (shuffled, augmented as --augment says) or to evaluate on, this rank's share."""
    batches = ImageBatches(getattr(raw, split), raw.mean, raw.std, cfg.batch_size, shuffle=train, seed=cfg.seed,
                           drop_last=train, device=device, rank=distributed.rank(), world=distributed.world_size())
    aug = augment_for(cfg)
    if train and aug.active:
        batches = AugmentedBatches(batches, aug, cfg.seed, distributed.rank())
    return batches


def cached_batches(cfg: Config, cache_dir: Path, manifest: Manifest, split: str, device,
                   train: bool) -> CachedBatches:
    """Cached-feature batches to train on (one random view per sample) or to evaluate on: this rank reads
    only its share, its range of each epoch's rows to train on, its contiguous part to evaluate."""
    r, w = distributed.rank(), distributed.world_size()
    if train:
        return CachedBatches(cache_dir, manifest, split, cfg.batch_size, shuffle=True,
                             seed=cfg.seed * 1000 + manifest.stage + 1, drop_last=True, shuffle_mb=cfg.shuffle_mb,
                             workers=cfg.workers, device=device, rank=r, world=w)
    # Evaluation sums counts over the ranks (train.evaluate): any disjoint parts will do, and contiguous ones
    # are whole-shard reads. Batches of the rank's rows of the global batch hold its memory to training's.
    rows = distributed.contiguous_part(manifest.splits[split].count)
    return CachedBatches(cache_dir, manifest, split, local_batch(cfg.batch_size, r, w), shuffle_mb=cfg.shuffle_mb,
                         workers=cfg.workers, device=device, views="plain", rows=rows)


def frozen_image_batches(cfg: Config, raw: RawData, split: str, device):
    """What stage 0 caches: this rank's contiguous slice of the split, with every view for train.

    The train split is cached in a random order (seeded by --data-seed): datasets often come sorted by class
    (an image folder always), and a shuffle window of a few shards must hold every class, not one or two."""
    whole = getattr(raw, split)
    order = cached_train_order(cfg, len(whole)) if split == "train" else torch.arange(len(whole))
    batches = ImageBatches(whole, raw.mean, raw.std, cfg.batch_size, device=device,
                           rows=order[slice(*distributed.contiguous_part(len(whole)))])
    if split == "train" and cfg.cache_views > 1:
        return ViewBatches(batches, cfg.cache_views, cfg.seed, augment_for(cfg))
    return batches


def cached_train_order(cfg: Config, n: int) -> torch.Tensor:
    """The order in which stage 0 caches the n rows of the train split: a permutation fixed by --data-seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.data_seed))


def frozen_cached_batches(cfg: Config, cache_dir: Path, manifest: Manifest, split: str, device) -> CachedBatches:
    """What stage k > 0 caches: this rank's contiguous slice of the previous cache, every view of each sample."""
    rows = distributed.contiguous_part(manifest.splits[split].count)
    # read once: nothing to keep for a later epoch
    return CachedBatches(cache_dir, manifest, split, cfg.batch_size, shuffle_mb=cfg.shuffle_mb,
                         workers=cfg.workers, device=device, views="all", rows=rows, keep=False)


def require_full_batch(cfg: Config, batches, count: int) -> None:
    """Training drops an incomplete last batch: a --batch-size above the training split would train nothing."""
    if len(batches) == 0:
        per_worker = f" for each of the {cfg.workers} --workers (each batches its own shards)" if cfg.workers else ""
        raise UserError(f"--batch-size {cfg.batch_size} leaves no full batch of the {count} "
                        f"training samples{per_worker}; lower it" + (" or --workers" if cfg.workers else ""))


def release(*streams) -> None:
    """Let cached-feature streams drop the splits they keep in memory (CachedBatches.release)."""
    for batches in streams:
        if isinstance(batches, CachedBatches):
            batches.release()


def read_per_epoch(batches) -> dict | None:
    """MB of cached features one epoch of training read from HDF5, rank 0's and the most any rank read; None
    for raw images (held in RAM) or when no epoch was iterated here (a resume after the last one)."""
    here = isinstance(batches, CachedBatches) and batches.passes
    every = distributed.gather(batches.bytes_read / batches.passes / 2**20 if here else None)
    return None if None in every else {"rank0": round(every[0], 3), "max": round(max(every), 3)}
