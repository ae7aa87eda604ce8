"""Input-space augmentation: random crop and horizontal flip while stage 0 (and e2e) train, and the fixed
augmented views of every training sample that a stage caches for the stages after it.

An augmentation of the image cannot be replayed on cached features (flipping a feature map is not
flipping the image; docs/design.md, "Augmentation"). So each stage caches V views of every training sample,
view 0 un-augmented and views 1..V-1 crops/flips of it, and the next stage draws one view per sample per
epoch (loader.py). A view is a pure function of (seed, view, sample id), so a view propagates through
the stages unchanged: view v of stage k's cache is blocks 0..k applied to the same augmented image.

Crops pad the normalised image with zeros (the dataset's mean colour) by --crop-padding pixels on each
side and cut a window of the original size back out (He et al. 2016's CIFAR recipe, pad 4 at 32x32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from seqtrain.batches import BatchWrapper
from seqtrain.errors import UserError

if TYPE_CHECKING:  # for annotations only: config.py imports data and its neighbours inside functions
    from seqtrain.config import Config


@dataclass(frozen=True)
class Augment:
    crop: bool
    flip: bool
    padding: int

    @property
    def active(self) -> bool:
        return self.crop or self.flip


def default_augment(dataset: str) -> str:
    """What --augment auto means for `dataset`."""
    if dataset in ("cifar10", "cifar100", "imagefolder", "imagenet"):
        return "crop+flip"  # natural images: a mirrored or shifted photo shows the same class
    if dataset == "svhn":
        return "crop"  # digits: a mirrored 2 or 5 is not a digit, but a shifted one still is
    # mnist, fashion-mnist: centred, size-normalised images whose standard baselines train without
    # augmentation, and mirroring changes digits. synthetic: the generator already draws a fresh position,
    # scale and colour for every image.
    return "none"


def augment_for(cfg: Config) -> Augment:
    """The augmentation --augment asks for ("auto": the dataset's usual, default_augment)."""
    mode = default_augment(cfg.dataset) if cfg.augment == "auto" else cfg.augment
    aug = Augment(crop="crop" in mode and cfg.crop_padding > 0, flip="flip" in mode, padding=cfg.crop_padding)
    if cfg.cache_views > 1 and not aug.active:
        raise UserError(f"--cache-views {cfg.cache_views} needs augmentation, but --augment {cfg.augment} on "
                        f"{cfg.dataset} means none: every view would be the same; use --cache-views 1 or "
                        "--augment crop+flip")
    return aug


def crop_flip(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """Per-sample crops at offsets (dx, dy) in [0, 2*pad] of the zero-padded batch, mirrored where `flip`."""
    B, C, H, W = x.shape
    padded = F.pad(x, (pad, pad, pad, pad)) if pad else x
    cols = torch.arange(W, device=x.device)
    cols = torch.where(flip.to(x.device)[:, None], W - 1 - cols, cols) + dx.to(x.device)[:, None]  # [B, W]
    rows = torch.arange(H, device=x.device) + dy.to(x.device)[:, None]  # [B, H]
    b = torch.arange(B, device=x.device)[:, None, None]
    out = padded[b, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: [B, H, W, C]
    return out.permute(0, 3, 1, 2).contiguous()


def random_augment(x: torch.Tensor, aug: Augment, g: torch.Generator) -> torch.Tensor:
    """A fresh random crop/flip of every image in the batch, drawn from the CPU generator `g`."""
    B = len(x)
    span = 2 * aug.padding + 1 if aug.crop else 1
    dx, dy = torch.randint(span, (B,), generator=g), torch.randint(span, (B,), generator=g)
    flip = torch.randint(2, (B,), generator=g).bool() if aug.flip else torch.zeros(B, dtype=torch.bool)
    return crop_flip(x, dx, dy, flip, aug.padding if aug.crop else 0)


def view_params(ids: torch.Tensor, view: int, seed: int, aug: Augment):
    """(dx, dy, flip) of view `view` of samples `ids`: a hash of (seed, view, id), the same on every run,
    rank and batch size. splitmix64's finaliser; numpy's uint64 arithmetic wraps by definition."""
    with np.errstate(over="ignore"):
        z = ids.cpu().numpy().astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z += np.uint64((seed * 1_000_003 + view * 7_919 + 1) & 0xFFFFFFFFFFFF)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
    span = np.uint64(2 * aug.padding + 1 if aug.crop else 1)
    dx = torch.from_numpy((z % span).astype(np.int64))
    dy = torch.from_numpy(((z >> np.uint64(20)) % span).astype(np.int64))
    flip = torch.from_numpy(((z >> np.uint64(40)) & np.uint64(1)).astype(bool)) if aug.flip else torch.zeros(
        len(ids), dtype=torch.bool)
    return dx, dy, flip


def views_of(x: torch.Tensor, ids: torch.Tensor, views: int, seed: int, aug: Augment) -> torch.Tensor:
    """[B, V, C, H, W]: view 0 is `x` itself, view v > 0 its fixed augmentation (view_params)."""
    out = [x]
    for v in range(1, views):
        dx, dy, flip = view_params(ids, v, seed, aug)
        out.append(crop_flip(x, dx, dy, flip, aug.padding if aug.crop else 0))
    return torch.stack(out, dim=1)


# --------------------------------------------------------------------------------------------------------
# Batch wrappers (batches.BatchWrapper: the interface of batches.ImageBatches)


class AugmentedBatches(BatchWrapper):
    """Training batches with a fresh random crop/flip per sample, drawn by (seed, epoch, rank): resumable."""

    def __init__(self, batches, aug: Augment, seed: int, rank: int = 0):
        super().__init__(batches)
        self.aug, self.seed, self.rank, self.epoch = aug, seed, rank, 0

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank + 17)
        for x, y, ids in self.batches:
            yield random_augment(x, self.aug, g), y, ids


class ViewBatches(BatchWrapper):
    """Batches of all V cached views of each sample, [B, V, C, H, W], for writing a training-split cache."""

    def __init__(self, batches, views: int, seed: int, aug: Augment):
        super().__init__(batches)
        self.views, self.seed, self.aug = views, seed, aug

    def __iter__(self):
        for x, y, ids in self.batches:
            yield views_of(x, ids, self.views, self.seed, self.aug), y, ids
