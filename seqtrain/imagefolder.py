"""`--dataset imagefolder`: a folder of images, one sub-folder per class, read into uint8 arrays.

    DIR/CLASS/*.png|jpg|...                 split here: TEST_SHARE of each class becomes the test set
    DIR/train/CLASS/...  DIR/test/CLASS/... the user's own split (the same class names in both)

`--dataset imagenet` reads the same way from torchvision's prepared ImageNet (`list_imagenet`):

    DIR/train/n01440764/*.JPEG ...  DIR/val/n01440764/*.JPEG ...   val/ is the test split

Classes are the sorted folder names (for ImageNet the WordNet ids, labelled as torchvision labels them);
files are read in sorted order, so the same tree always gives the same arrays. Every image is decoded with
PIL, converted to RGB and resized so that its shorter side is the target size, then centre-cropped to a
square. `list_folder` only lists files (no decoding), so `--plan` and the fingerprint of stage 0's input
stay cheap on large folders.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from seqtrain.errors import UserError, setting

# torchvision's ImageFolder extensions, plus .gif; matched case-insensitively.
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")
# Share of each class held out as the test set when the folder has no train/ and test/ sub-trees: the
# usual 80/20 split, stratified so that small classes are represented in both halves.
TEST_SHARE = 0.2
DEFAULT_SIDE = 32  # --image-size 0: the CIFAR resolution every architecture here is designed for
# PIL releases the GIL while decoding and resizing, so threads decode in parallel (not timed here: the two
# shared cores of the development machine were too busy for a fair measurement).
THREADS = min(8, os.cpu_count() or 1)


@dataclass
class Listing:
    classes: list[str]  # sorted class folder names; a label is an index into this list
    train_files: list[Path]
    train_labels: list[int]
    test_files: list[Path]
    test_labels: list[int]


# --------------------------------------------------------------------------------------------------------
# Listing (no decoding)


def class_images(folder: Path) -> dict[str, list[Path]]:
    """{class name: sorted image paths} for the class sub-folders of `folder`; hidden entries are skipped."""
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise UserError(f"{folder} has no class folders: put the images of each class in {folder}/CLASS_NAME/")
    found = {}
    for name in classes:
        root = folder / name
        found[name] = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS and p.is_file()
                             and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not found[name]:
            raise UserError(f"class folder {root} holds no images ({', '.join(EXTENSIONS)}); "
                            "add some or remove the folder")
    return found


def list_folder(root: str | Path, seed: int) -> Listing:
    """The classes and the train/test files of an image folder, from its own split or a seeded one."""
    root = Path(root)
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"{setting('data_dir', str(root))} {what}; give the folder that holds one sub-folder of "
                        "images per class")
    train_dir, test_dir = root / "train", root / "test"
    if train_dir.is_dir() != test_dir.is_dir():
        have, lack = (train_dir, test_dir) if train_dir.is_dir() else (test_dir, train_dir)
        raise UserError(f"{have} exists but {lack} does not: give both train/ and test/, or neither "
                        f"(then {TEST_SHARE:.0%} of each class is held out as the test set)")

    if train_dir.is_dir():
        return list_split(train_dir, test_dir)
    # A stratified split: TEST_SHARE of every class, chosen by a generator seeded with --data-seed.
    found, gen = class_images(root), torch.Generator().manual_seed(seed)
    train, test = {}, {}
    for name in sorted(found):
        files = found[name]
        perm = torch.randperm(len(files), generator=gen).tolist()
        n_test = round(len(files) * TEST_SHARE)
        test[name] = [files[i] for i in sorted(perm[:n_test])]
        train[name] = [files[i] for i in sorted(perm[n_test:])]
    return make_listing(train, test)


def list_split(train_dir: Path, test_dir: Path) -> Listing:
    """The classes and files of a folder split by its owner into `train_dir` and `test_dir`."""
    train, test = class_images(train_dir), class_images(test_dir)
    if set(train) != set(test):
        only_train, only_test = sorted(set(train) - set(test)), sorted(set(test) - set(train))
        raise UserError(f"{train_dir} and {test_dir} must hold the same class folders; only in "
                        f"{train_dir.name}/: {', '.join(only_train) or '-'}; only in {test_dir.name}/: "
                        f"{', '.join(only_test) or '-'}")
    return make_listing(train, test)


def make_listing(train: dict[str, list[Path]], test: dict[str, list[Path]]) -> Listing:
    """A Listing of {class: files} for each split; labels index the sorted class names."""
    classes = sorted(train)
    listing = Listing(classes, [], [], [], [])
    for label, name in enumerate(classes):
        listing.train_files += train[name]
        listing.train_labels += [label] * len(train[name])
        listing.test_files += test[name]
        listing.test_labels += [label] * len(test[name])
    return listing


# --------------------------------------------------------------------------------------------------------
# ImageNet in torchvision's layout (--dataset imagenet)

# What torchvision.datasets.ImageNet prepares train/ and val/ from (and its meta.bin from the devkit).
IMAGENET_ARCHIVES = ("ILSVRC2012_devkit_t12.tar.gz", "ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def imagenet_present(root: str | Path) -> bool:
    """Both of ImageNet's prepared folders are in `root` (listing them is another matter: 1.33M files)."""
    return (Path(root) / "train").is_dir() and (Path(root) / "val").is_dir()


def list_imagenet(root: str | Path, download: bool = False) -> Listing:
    """ImageNet's train/ and val/ class folders, as torchvision.datasets.ImageNet prepares them; val/ is the
    test split. The devkit and meta.bin beside them are not needed: labels are the sorted WordNet ids."""
    root = Path(root)
    if not imagenet_present(root):
        raise imagenet_missing(root, download)
    val = root / "val"
    if not any(p.is_dir() for p in val.iterdir()):  # ILSVRC2012_img_val.tar unpacked by hand: flat files
        raise UserError(f"{val} holds no class folders: torchvision.datasets.ImageNet sorts the validation "
                        f"images into them with the devkit's labels; {imagenet_prepare_hint(root)}")
    return list_split(root / "train", val)


def imagenet_prepare_hint(root: Path) -> str:
    return (f"put {', '.join(IMAGENET_ARCHIVES)} in {root} and prepare the folders once with python -c "
            f"\"import torchvision.datasets as d; [d.ImageNet('{root}', split=s) for s in ('train', 'val')]\" "
            "(needs scipy)")


def imagenet_missing(root: Path, download: bool) -> UserError:
    """One line: what is missing, how torchvision prepares it, and that nothing downloads it."""
    lack = ", ".join(f"{root / d}/" for d in ("train", "val") if not (root / d).is_dir())
    # torchvision.datasets.ImageNet has no download: its docstring asks for the archives from image-net.org.
    fetch = "ImageNet cannot be downloaded automatically: get its archives from https://image-net.org"
    lead = f"{setting('download', True)} cannot fetch imagenet ({fetch}); " if download else ""
    tail = "" if download else f"; {fetch}"
    return UserError(f"{lead}imagenet was not found in {setting('data_dir', str(root))} ({lack} missing): seqtrain "
                     "reads the train/ and val/ class folders that torchvision.datasets.ImageNet prepares; "
                     f"{imagenet_prepare_hint(root)}{tail}")


def folder_fingerprint(root: str | Path, listing: Listing) -> str:
    """sha256 of every image's path (relative to root), size and mtime: replacing a file changes it."""
    h = hashlib.sha256()
    for path in sorted(listing.train_files + listing.test_files):
        st = path.stat()
        h.update(f"{path.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------
# Decoding


def decode(path: Path, side: int) -> np.ndarray:
    """One image as uint8 [side, side, 3]: RGB, shorter side resized to `side`, centre-cropped."""
    try:
        with Image.open(path) as img:
            img.draft(None, (side, side))  # JPEG: decode at 1/2-1/8 scale, still >= side (500x375 -> 32: 1.5x faster)
            if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the top byte, convert() would clip to 255
                img = Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
            elif img.mode in ("P", "PA"):
                img = img.convert("RGBA")  # a palette may carry transparency; RGBA first, then drop alpha
            img = ImageOps.fit(img.convert("RGB"), (side, side), method=Image.Resampling.BILINEAR)
            return np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        reason = " ".join(str(e).split())  # one line, whatever PIL says
        raise UserError(f"cannot read image {path} ({reason}); replace or delete it") from None


def read_images(files: list[Path], side: int) -> np.ndarray:
    """Decode `files` into uint8 [N, 3, side, side] with a small thread pool."""
    # N, C, H, W, written image by image: one array of the decoded size, never a transposed second copy
    out = np.empty((len(files), 3, side, side), dtype=np.uint8)

    def one(i: int) -> None:
        out[i] = decode(files[i], side).transpose(2, 0, 1)  # H, W, C as PIL gives them -> C, H, W

    # Submitted a chunk at a time: a bad file stops the read within a chunk, and a million files never
    # become a million pending futures.
    with ThreadPoolExecutor(THREADS) as pool:
        for start in range(0, len(files), 1024):
            list(pool.map(one, range(start, min(len(files), start + 1024))))  # re-raises a worker's error here
    return out


def folder_arrays(listing: Listing, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """(x_train, y_train, x_test, y_test, num_classes) of a listed folder, decoded at `side`."""
    x_train, x_test = read_images(listing.train_files, side), read_images(listing.test_files, side)
    as_labels = lambda labels: np.asarray(labels, dtype=np.int64)  # noqa: E731
    return x_train, as_labels(listing.train_labels), x_test, as_labels(listing.test_labels), len(listing.classes)
