"""Raw datasets held in memory as uint8 tensors, the deterministic validation split, and batches of images.

Stage 0, the end-to-end baseline and the final evaluation read raw images from here; every later stage
reads cached features instead (loader.py). Sources (--dataset):
  synthetic      generated once into --data-dir and reloaded from there (synthetic.py)
  cifar10/100, mnist, fashion-mnist, svhn   torchvision's files in --data-dir (--download fetches them)
  imagefolder    --data-dir/CLASS/*.png|jpg|... (imagefolder.py)
Every image reaches the network as uint8 [3, H, W]: grayscale is replicated to three channels, and
--image-size resizes once here, at load time. `dataset_info` gives the shapes and counts without decoding.
"""

from __future__ import annotations

import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from seqtrain import imagefolder, synthetic
from seqtrain.errors import UserError
from seqtrain.files import write_bytes

if TYPE_CHECKING:  # for annotations only: config.py imports data and its neighbours inside functions
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
}


def image_side(cfg: Config) -> int:
    """The side of the square images the network sees: --image-size, or the dataset's own."""
    if cfg.image_size:
        return cfg.image_size
    if cfg.dataset == "imagefolder":
        return imagefolder.DEFAULT_SIDE
    return synthetic.SIZE if cfg.dataset == "synthetic" else KNOWN[cfg.dataset].side


def dataset_info(cfg: Config) -> dict:
    """{"in_shape", "num_classes", "n_train", "n_test"} of the configured dataset, without decoding an image.

    n_train counts the whole training set, before the validation split is carved from it.
    """
    side = image_side(cfg)
    if cfg.dataset == "synthetic":
        counts = (cfg.n_train, cfg.n_test, synthetic.NUM_CLASSES)
    elif cfg.dataset == "imagefolder":
        listing = imagefolder.list_folder(cfg.data_dir, cfg.data_seed)
        counts = (len(listing.train_files), len(listing.test_files), len(listing.classes))
    else:
        known = KNOWN[cfg.dataset]
        counts = (known.n_train, known.n_test, known.num_classes)
    return {"in_shape": (3, side, side), "n_train": counts[0], "n_test": counts[1], "num_classes": counts[2]}


def source_fingerprint(cfg: Config) -> dict:
    """What identifies stage 0's input: any change here makes every cache built on the old input stale."""
    fp = {"dataset": cfg.dataset, "image_size": image_side(cfg), "data_seed": cfg.data_seed,
          "val_fraction": cfg.val_fraction}
    if cfg.dataset == "synthetic":
        fp.update(n_train=cfg.n_train, n_test=cfg.n_test)
    if cfg.dataset == "imagefolder":  # the user's files can change under the same flags
        listing = imagefolder.list_folder(cfg.data_dir, cfg.data_seed)
        fp["files"] = imagefolder.folder_fingerprint(cfg.data_dir, listing)
    return fp



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
        raise UserError(f"cannot write the synthetic dataset to --data-dir {cfg.data_dir}: {e.strerror}") from None
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
    """One line for a torchvision dataset that could not be loaded: what was looked for and the fix."""
    root = Path(cfg.data_dir)
    missing = [root / f for f in KNOWN[cfg.dataset].files if not (root / f).is_file()]
    reason = ([line for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1].strip()  # the cause
    if missing and cfg.download:
        return UserError(f"downloading {cfg.dataset} into --data-dir {root} failed ({reason}); check the "
                         f"internet connection, or put torchvision's files there by hand ({missing[0]} is missing)")
    if missing:
        more = f" (and {len(missing) - 1} more file(s))" if len(missing) > 1 else ""
        return UserError(f"{cfg.dataset} was not found in --data-dir {root}: torchvision looks for {missing[0]}"
                         f"{more}; pass --download to fetch it (needs internet)")
    folder = (root / KNOWN[cfg.dataset].files[0]).parent
    return UserError(f"{cfg.dataset} in {folder} is damaged ({reason}); delete its files and rerun with --download")


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
    if cfg.dataset == "synthetic":
        x_train, y_train, x_test, y_test = synthetic_arrays(cfg)
        num_classes = synthetic.NUM_CLASSES
    elif cfg.dataset == "imagefolder":  # decoded straight to the final size
        x_train, y_train, x_test, y_test, num_classes = imagefolder.folder_arrays(cfg)
    else:
        x_train, y_train, x_test, y_test = torchvision_arrays(cfg)
        num_classes = KNOWN[cfg.dataset].num_classes
    side = image_side(cfg)
    x_train, y_train = to_rgb(to_size(torch.from_numpy(x_train), side)), torch.from_numpy(y_train).long()
    x_test, y_test = to_rgb(to_size(torch.from_numpy(x_test), side)), torch.from_numpy(y_test).long()

    # The validation split depends on data_seed only, so every training seed sees the same one.
    n = len(y_train)
    n_val = round(n * cfg.val_fraction)
    if n_val < 1 or n - n_val < 2 or len(y_test) < 1:  # only a small image folder can get here
        raise UserError(f"{cfg.dataset} in --data-dir {cfg.data_dir} has {n} training and {len(y_test)} test "
                        f"images, too few to carve a --val-fraction {cfg.val_fraction} split and test; add images")
    assert int(max(y_train.max(), y_test.max())) < num_classes, f"{cfg.dataset}: a label is out of range"
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.data_seed))
    val_ids, train_ids = perm[:n_val].sort().values, perm[n_val:].sort().values
    train = Split(x_train[train_ids], y_train[train_ids], train_ids)
    val = Split(x_train[val_ids], y_train[val_ids], val_ids)
    test = Split(x_test, y_test, torch.arange(len(y_test)))

    mean, std = channel_stats(train.x)  # from the training split only: val and test stay unseen
    return RawData(train, val, test, mean, std, num_classes)
