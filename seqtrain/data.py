"""Raw datasets held in memory as uint8 tensors, the deterministic validation split, and batches of images.

Stage 0, the end-to-end baseline and the final evaluation read raw images from here; every later stage
reads cached features instead (loader.py). The synthetic default dataset is generated once into
--data-dir and reloaded from there.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqtrain import synthetic
from seqtrain.errors import UserError
from seqtrain.files import write_bytes


@dataclass
class Split:
    x: torch.Tensor  # uint8 [N, C, H, W]
    y: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N]: index of each sample in its original split (train and val share one range)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class RawData:
    train: Split
    val: Split
    test: Split
    mean: list[float]  # per channel, of the training split in [0, 1] units
    std: list[float]
    num_classes: int

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])


# --------------------------------------------------------------------------------------------------------
# Sources


def synthetic_arrays(cfg) -> tuple[np.ndarray, ...]:
    """The synthetic dataset, generated on first use and kept in --data-dir (a few seconds to make)."""
    path = Path(cfg.data_dir) / f"synthetic-{cfg.n_train}-{cfg.n_test}-seed{cfg.data_seed}.npz"
    if path.exists():
        try:
            with np.load(path) as z:
                return z["x_train"], z["y_train"], z["x_test"], z["y_test"]
        except (OSError, ValueError, KeyError):
            path.unlink()  # a damaged copy: it is cheap to make again
    x_train, y_train = synthetic.generate(cfg.n_train, cfg.data_seed)
    # A different stream for test, so train and test are independent draws of the same distribution.
    x_test, y_test = synthetic.generate(cfg.n_test, cfg.data_seed + 1_000_003)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
        write_bytes(path, buf.getvalue())
    except OSError as e:
        raise UserError(f"cannot write the synthetic dataset to --data-dir {cfg.data_dir}: {e.strerror}") from None
    return x_train, y_train, x_test, y_test


def torchvision_arrays(cfg) -> tuple[np.ndarray, ...]:
    import torchvision

    cls = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}[cfg.dataset]
    try:
        train = cls(cfg.data_dir, train=True, download=cfg.download)
        test = cls(cfg.data_dir, train=False, download=cfg.download)
    except RuntimeError:
        raise UserError(f"{cfg.dataset} was not found in --data-dir {cfg.data_dir}; "
                        "pass --download to fetch it (needs internet)") from None
    as_nchw = lambda a: np.ascontiguousarray(a.transpose(0, 3, 1, 2))  # noqa: E731  [N, H, W, C] -> NCHW
    return (as_nchw(train.data), np.asarray(train.targets), as_nchw(test.data), np.asarray(test.targets))


def load_raw(cfg) -> RawData:
    """Load the configured dataset and carve the validation split from its training set."""
    if cfg.dataset == "synthetic":
        x_train, y_train, x_test, y_test = synthetic_arrays(cfg)
    else:
        x_train, y_train, x_test, y_test = torchvision_arrays(cfg)
    x_train, y_train = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    x_test, y_test = torch.from_numpy(x_test), torch.from_numpy(y_test).long()

    # The validation split depends on data_seed only, so every training seed sees the same one.
    n = len(y_train)
    n_val = round(n * cfg.val_fraction)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.data_seed))
    val_ids, train_ids = perm[:n_val].sort().values, perm[n_val:].sort().values
    train = Split(x_train[train_ids], y_train[train_ids], train_ids)
    val = Split(x_train[val_ids], y_train[val_ids], val_ids)
    test = Split(x_test, y_test, torch.arange(len(y_test)))

    pixels = train.x.float().div_(255)  # [N, C, H, W]
    mean = pixels.mean(dim=(0, 2, 3)).tolist()
    std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return RawData(train, val, test, mean, std, num_classes)


# --------------------------------------------------------------------------------------------------------
# Batches


class ImageBatches:
    """Normalised float batches (x, y, ids) from an in-memory Split; shuffled by (seed, epoch) when asked.

    Normalising on the device keeps host-to-device traffic at one byte per pixel.
    """

    def __init__(self, split: Split, mean: list[float], std: list[float], batch_size: int, *,
                 shuffle: bool = False, seed: int = 0, drop_last: bool = False, device: str = "cpu"):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.drop_last, self.device, self.epoch = drop_last, torch.device(device), 0
        self.mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @property
    def num_samples(self) -> int:
        return len(self.split)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        n = len(self.split)
        if self.shuffle:  # order depends only on (seed, epoch): a resumed run sees the same batches
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        else:
            order = torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.split.x[idx].to(self.device, non_blocking=True).float().div_(255)
            yield (x.sub_(self.mean).div_(self.std), self.split.y[idx].to(self.device, non_blocking=True),
                   self.split.ids[idx])
