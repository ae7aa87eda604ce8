"""Raw datasets held in memory as uint8 tensors, the deterministic validation split, and batches of images.

Stage 0, the end-to-end baseline and the final evaluation read raw images from here; every later stage
reads cached features instead (loader.py). Sources (--dataset):
  synthetic      generated once into --data-dir and reloaded from there (synthetic.py)
  cifar10/100, mnist, fashion-mnist, svhn   torchvision's files in --data-dir (--download fetches them)
  imagefolder    --data-dir/CLASS/*.png|jpg|... (imagefolder.py)
  imagenet       --data-dir/train/WNID/*.JPEG and val/WNID/*.JPEG, torchvision's prepared ImageNet (imagefolder.py)
Every image reaches the network as uint8 [3, H, W]: grayscale is replicated to three channels, and
--image-size resizes once here, at load time. `dataset_info` gives the shapes and counts without decoding
(for ImageNet without the data: its published sizes). The whole dataset is held in RAM, so `load_raw`
refuses, before decoding anything, a dataset whose decoded bytes exceed the available memory.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import psutil
import torch
import torch.nn.functional as F

from seqtrain import imagefolder, synthetic
from seqtrain.errors import UserError, setting
from seqtrain.files import write_bytes

if TYPE_CHECKING:  # for annotations only
    from seqtrain.config import Config


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
# What each dataset is, known without reading it


class Known(NamedTuple):
    side: int  # the dataset's own image size (square)
    n_train: int
    n_test: int
    num_classes: int
    files: tuple[str, ...]  # what torchvision 0.29 looks for, relative to --data-dir


def _in(folder: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{folder}/{n}" for n in names)


MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
               "t10k-labels-idx1-ubyte")
KNOWN = {
    "cifar10": Known(32, 50_000, 10_000, 10, _in("cifar-10-batches-py", *(f"data_batch_{i}" for i in range(1, 6)),
                                                   "test_batch", "batches.meta")),
    "cifar100": Known(32, 50_000, 10_000, 100, _in("cifar-100-python", "train", "test", "meta")),
    "mnist": Known(28, 60_000, 10_000, 10, _in("MNIST/raw", *MNIST_FILES)),
    "fashion-mnist": Known(28, 60_000, 10_000, 10, _in("FashionMNIST/raw", *MNIST_FILES)),
    "svhn": Known(32, 73_257, 26_032, 10, ("train_32x32.mat", "test_32x32.mat")),  # without the "extra" set
    # ILSVRC-2012, its 50,000 validation images as the test split. The images vary in size and are resized
    # (imagefolder.decode); 224x224 is the conventional training resolution.
    "imagenet": Known(224, 1_281_167, 50_000, 1000, imagefolder.IMAGENET_ARCHIVES),
}
FOLDERS = ("imagefolder", "imagenet")  # decoded from image files by imagefolder.py


def image_side(cfg: Config) -> int:
    """The side of the square images the network sees: --image-size, or the dataset's own."""
    if cfg.image_size:
        return cfg.image_size
    if cfg.dataset == "imagefolder":
        return imagefolder.DEFAULT_SIDE
    return synthetic.SIZE if cfg.dataset == "synthetic" else KNOWN[cfg.dataset].side


def input_shape(cfg: Config) -> tuple[int, int, int]:
    """C, H, W of the images the network sees: every dataset is given three channels."""
    return 3, image_side(cfg), image_side(cfg)


def dataset_info(cfg: Config, listing: imagefolder.Listing | None = None) -> dict:
    """{"in_shape", "num_classes", "n_train", "n_test"} of the configured dataset, without decoding an image.

    n_train counts the whole training set, before the validation split is carved from it. `listing`: the
    image folder's, when the caller has listed it already.
    """
    side = image_side(cfg)
    if cfg.dataset == "synthetic":
        counts = (cfg.n_train, cfg.n_test, synthetic.NUM_CLASSES)
    elif listing or is_listed(cfg):
        listing = listing or folder_listing(cfg)
        counts = (len(listing.train_files), len(listing.test_files), len(listing.classes))
    else:  # ImageNet without its folders: the published sizes, so that --plan needs no data
        known = KNOWN[cfg.dataset]
        counts = (known.n_train, known.n_test, known.num_classes)
    return {"in_shape": (3, side, side), "n_train": counts[0], "n_test": counts[1], "num_classes": counts[2]}


def source_fingerprint(cfg: Config) -> dict:
    """What identifies stage 0's input: any change here makes every cache built on the old input stale."""
    fp = {"dataset": cfg.dataset, "image_size": image_side(cfg), "data_seed": cfg.data_seed,
          "val_fraction": cfg.val_fraction}
    if cfg.dataset == "synthetic":
        fp.update(n_train=cfg.n_train, n_test=cfg.n_test)
    if cfg.dataset in FOLDERS:  # the user's files can change under the same flags
        fp["files"] = imagefolder.folder_fingerprint(cfg.data_dir, folder_listing(cfg))
    return fp


def is_listed(cfg: Config) -> bool:
    """Whether the dataset's sizes come from listing its files: an image folder, or ImageNet when present."""
    return cfg.dataset == "imagefolder" or cfg.dataset == "imagenet" and imagefolder.imagenet_present(cfg.data_dir)


def folder_listing(cfg: Config) -> imagefolder.Listing:
    """The files of an image-folder dataset; a UserError naming what is missing."""
    if cfg.dataset == "imagenet":
        return imagefolder.list_imagenet(cfg.data_dir, cfg.download)
    return imagefolder.list_folder(cfg.data_dir, cfg.data_seed)


# --------------------------------------------------------------------------------------------------------
# Sources: each returns uint8 NCHW arrays (x_train, y_train, x_test, y_test) at the dataset's own size


def synthetic_arrays(cfg: Config) -> tuple[np.ndarray, ...]:
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
        raise UserError(f"cannot write the synthetic dataset to {setting('data_dir', cfg.data_dir)}: {e.strerror}"
                        ) from None
    return x_train, y_train, x_test, y_test


def torchvision_arrays(cfg: Config) -> tuple[np.ndarray, ...]:
    """A torchvision dataset from --data-dir, read through its bulk arrays, not a PIL image per __getitem__."""
    name, root = cfg.dataset, Path(cfg.data_dir)
    if name == "svhn" and importlib.util.find_spec("scipy") is None:  # checked first: --download would be wasted
        raise UserError("svhn needs scipy to read its .mat files: pip install scipy")
    import torchvision.datasets as tvd

    try:
        if name == "svhn":
            train, test = (tvd.SVHN(root, split=s, download=cfg.download) for s in ("train", "test"))
        else:
            cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
                   "fashion-mnist": tvd.FashionMNIST}[name]
            train, test = (cls(root, train=t, download=cfg.download) for t in (True, False))
    except Exception as e:  # any failure here is a missing, damaged or undownloadable file
        raise dataset_error(cfg, e) from None

    def images(ds) -> np.ndarray:
        x = np.asarray(ds.data)
        if x.ndim == 3:  # MNIST-like: [N, H, W] grayscale
            return x[:, None]
        return x if name == "svhn" else x.transpose(0, 3, 1, 2)  # SVHN is NCHW already; CIFAR is NHWC

    def labels(ds) -> np.ndarray:
        return np.asarray(ds.labels if name == "svhn" else ds.targets, dtype=np.int64)

    return (np.ascontiguousarray(images(train)), labels(train), np.ascontiguousarray(images(test)), labels(test))


def dataset_error(cfg: Config, e: Exception) -> UserError:
    """One line for a torchvision dataset that could not be loaded: what was looked for and the fix, named as
    the caller names settings (--download on the command line, download=True from Python: errors.setting)."""
    root = Path(cfg.data_dir)
    missing = [root / f for f in KNOWN[cfg.dataset].files if not (root / f).is_file()]
    reason = ([line for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1].strip()  # the cause
    where, download = setting("data_dir", cfg.data_dir), setting("download", True)
    if missing and cfg.download:
        return UserError(f"downloading {cfg.dataset} into {where} failed ({reason}); check the "
                         f"internet connection, or put torchvision's files there by hand ({missing[0]} is missing)")
    if missing:
        more = f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else ""
        return UserError(f"{cfg.dataset} was not found in {where}: torchvision looks for {missing[0]}"
                         f"{more}; pass {download} to fetch it (needs internet)")
    folder = (root / KNOWN[cfg.dataset].files[0]).parent
    return UserError(f"{cfg.dataset} in {folder} is damaged ({reason}); delete its files and rerun with {download}")


# --------------------------------------------------------------------------------------------------------
# Shapes


def to_size(x: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 [N, C, H, W] resized to [N, C, side, side] (antialiased bilinear), a chunk at a time."""
    N, C, H, W = x.shape
    if H == W == side:
        return x
    out = torch.empty((N, C, side, side), dtype=torch.uint8)
    step = max(1, 2**24 // (C * max(H * W, side * side)))  # <= 64 MB of float32 per chunk
    for i in range(0, N, step):
        part = F.interpolate(x[i:i + step].float(), size=(side, side), mode="bilinear", antialias=True)
        out[i:i + step] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Grayscale [N, 1, H, W] replicated to [N, 3, H, W], so every network takes three channels."""
    return x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x


def channel_stats(x: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 [N, C, H, W] images in [0, 1] units, without a float copy of all."""
    N, C, H, W = x.shape
    total, squares = torch.zeros(C, dtype=torch.float64), torch.zeros(C, dtype=torch.float64)
    step = max(1, 2**23 // (C * H * W))  # <= 64 MB of float64 per chunk
    for i in range(0, N, step):
        part = x[i:i + step].double().div_(255)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square_().sum(dim=(0, 2, 3))
    n = N * H * W
    mean = total / n
    var = (squares - n * mean.square()) / max(1, n - 1)  # unbiased, as torch.std
    return mean.tolist(), var.clamp_min(0).sqrt().clamp_min(1e-3).tolist()


# --------------------------------------------------------------------------------------------------------
# Loading


def load_raw(cfg: Config) -> RawData:
    """Load the configured dataset at its final size and carve the validation split from its training set."""
    side = image_side(cfg)
    listing = folder_listing(cfg) if is_listed(cfg) else None
    info = dataset_info(cfg, listing)
    check_memory(cfg, info["n_train"], info["n_test"])  # before anything is decoded, generated or downloaded

    if cfg.dataset == "synthetic":
        x_train, y_train, x_test, y_test = synthetic_arrays(cfg)
        num_classes = synthetic.NUM_CLASSES
    elif cfg.dataset in FOLDERS:  # decoded straight to the final size
        x_train, y_train, x_test, y_test, num_classes = imagefolder.folder_arrays(listing or folder_listing(cfg), side)
    else:
        x_train, y_train, x_test, y_test = torchvision_arrays(cfg)
        num_classes = KNOWN[cfg.dataset].num_classes
    x_train, y_train = to_rgb(to_size(torch.from_numpy(x_train), side)), torch.from_numpy(y_train).long()
    x_test, y_test = to_rgb(to_size(torch.from_numpy(x_test), side)), torch.from_numpy(y_test).long()

    # The validation split depends on data_seed only, so every training seed sees the same one.
    n = len(y_train)
    n_val = round(n * cfg.val_fraction)
    if n_val < 1 or n - n_val < 2 or len(y_test) < 1:  # only a small image folder can get here
        raise UserError(f"{cfg.dataset} in {setting('data_dir', cfg.data_dir)} has {n} training and {len(y_test)} "
                        f"test images, too few to carve a {setting('val_fraction', cfg.val_fraction)} split and "
                        "test; add images")
    assert int(max(y_train.max(), y_test.max())) < num_classes, f"{cfg.dataset}: a label is out of range"
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.data_seed))
    val_ids, train_ids = perm[:n_val].sort().values, perm[n_val:].sort().values
    train, val = carve(x_train, y_train, train_ids, val_ids)
    test = Split(x_test, y_test, torch.arange(len(y_test)))

    mean, std = channel_stats(train.x)  # from the training split only: val and test stay unseen
    return RawData(train, val, test, mean, std, num_classes)


def carve(x: torch.Tensor, y: torch.Tensor, train_ids: torch.Tensor, val_ids: torch.Tensor,
          chunk_bytes: int = 2**26) -> tuple[Split, Split]:
    """The train and val splits of `x` [N, C, H, W], rearranged in place: no second copy of the dataset.

    Only the val rows are copied out; the train rows then move forward in order (ids sorted, so row
    train_ids[i] >= i is read before anything overwrites it) and val goes back behind them. Both
    splits are views of `x`, which peaks at the val split's bytes above the dataset's (check_memory).
    """
    n, val_x = len(train_ids), x[val_ids]
    step = max(1, chunk_bytes // max(1, x[0].numel()))  # rows moved at a time (x is uint8)
    for i in range(0, n, step):
        j = min(n, i + step)
        x[i:j] = x[train_ids[i:j]]  # gathered into a temporary first, then written
    x[n:] = val_x
    return Split(x[:n], y[train_ids], train_ids), Split(x[n:], y[val_ids], val_ids)


# --------------------------------------------------------------------------------------------------------
# Memory: the whole dataset is decoded into RAM

SUGGESTED_SIDES = (192, 160, 128, 112, 96, 64, 32)  # what --image-size the refusal suggests, largest first


def load_bytes(cfg: Config, n_train: int, n_test: int, side: int) -> int:
    """Peak bytes of load_raw's images at `side`: every image as uint8 [3, side, side], plus the copy of the
    validation split that carve() makes. torchvision's sets add their native arrays (under 0.25 GB)."""
    return (n_train + round(n_train * cfg.val_fraction) + n_test) * 3 * side * side


def check_memory(cfg: Config, n_train: int, n_test: int) -> None:
    """Refuse, in one line and before anything is decoded, a dataset whose images would not fit in RAM."""
    side = image_side(cfg)
    need, free = load_bytes(cfg, n_train, n_test, side), psutil.virtual_memory().available
    if need <= free:
        return
    fits = [s for s in SUGGESTED_SIDES if s < side and load_bytes(cfg, n_train, n_test, s) <= free]
    fix = (f"use {setting('image_size', fits[0])} (needs {load_bytes(cfg, n_train, n_test, fits[0]) / 1e9:,.1f} "
           "GB) or a machine with more memory" if fits
           else f"use a smaller {setting('image_size')} or a machine with more memory")
    raise UserError(f"{cfg.dataset} at {side}x{side} needs {need / 1e9:,.1f} GB of RAM ({n_train + n_test:,} "
                    f"images of 3x{side}x{side} uint8, all held in memory, and a copy of the validation split "
                    f"while it is carved), but {free / 1e9:,.1f} GB are available: {fix}")
