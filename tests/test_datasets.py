"""Real datasets: image folders (own split or a seeded stratified one), torchvision sets from their files on
disk (MNIST written here in its idx format), the shapes every network sees, and a clear error for each
kind of missing or broken input."""

from __future__ import annotations

import importlib.util
import json
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from seqtrain import load_model
from seqtrain.augment import default_augment
from seqtrain.cache import read_shard
from seqtrain.config import Config
from seqtrain.data import dataset_info, load_raw, source_fingerprint
from seqtrain.errors import UserError, from_python
from seqtrain.imagefolder import TEST_SHARE, decode, list_folder
from seqtrain.run import main

CLASSES = ("cat", "dog", "eel")
COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "eel": (30, 30, 200), "ant": (90, 60, 0), "bee": (250, 200, 0),
           "wasp": (0, 0, 0)}
GRAYS = {"cat": 40, "dog": 120, "eel": 220, "ant": 10, "bee": 250, "wasp": 0}
SIZES = [(20, 30), (37, 18), (16, 16), (64, 48), (24, 24)]  # (width, height), cycled through


def save_image(path, cls: str, i: int) -> None:
    """A flat image in one of several modes: RGB and RGBA show the class colour, L and P its gray."""
    w, h = SIZES[i % len(SIZES)]
    kind = path.stem.split("_")[0]
    if kind == "rgb":
        Image.new("RGB", (w, h), COLOURS[cls]).save(path)
    elif kind == "rgba":
        Image.new("RGBA", (w, h), (*COLOURS[cls], 100)).save(path)  # alpha is dropped, colour kept
    elif kind == "gray":
        Image.new("L", (w, h), GRAYS[cls]).save(path)
    else:  # palette
        Image.new("L", (w, h), GRAYS[cls]).convert("P").save(path)


def make_folder(root, per_class: int = 5, classes=CLASSES):
    kinds = ("rgb", "gray", "rgba", "pal")
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            save_image(root / cls / f"{kinds[i % len(kinds)]}_{i:02d}.png", cls, i)
    return root


def expected_pixel(path, cls: str) -> tuple[int, int, int]:
    return COLOURS[cls] if path.stem.split("_")[0] in ("rgb", "rgba") else (GRAYS[cls],) * 3


def folder_cfg(root, **kw) -> Config:
    return Config(dataset="imagefolder", data_dir=str(root), **kw)


# --------------------------------------------------------------------------------------------------------
# Image folders


def test_image_folder_loads_rgb_squares_with_the_right_labels(tmp_path):
    root = make_folder(tmp_path / "imgs")
    raw = load_raw(folder_cfg(root, image_size=16))
    assert raw.in_shape == (3, 16, 16) and raw.num_classes == 3
    assert raw.train.x.dtype == torch.uint8
    # 5 per class: round(5 * 0.2) = 1 held out for test; 12 training images, round(1.2) = 1 of them for val
    assert (len(raw.train), len(raw.val), len(raw.test)) == (11, 1, 3)
    assert raw.test.y.tolist() == [0, 1, 2]

    listing = list_folder(root, seed=0)
    for split, files in ((raw.train, listing.train_files), (raw.val, listing.train_files),
                         (raw.test, listing.test_files)):
        for x, y, i in zip(split.x, split.y, split.ids):
            path = files[i]
            assert path.parent.name == CLASSES[y]
            want = torch.tensor(expected_pixel(path, path.parent.name), dtype=torch.uint8).view(3, 1, 1)
            assert torch.equal(x, want.expand(3, 16, 16)), path


def test_default_size_is_32_and_images_are_centre_cropped_not_squashed(tmp_path):
    root = make_folder(tmp_path / "imgs")
    assert load_raw(folder_cfg(root)).in_shape == (3, 32, 32)
    wide = np.zeros((16, 48, 3), dtype=np.uint8)  # H, W, C: black sides, white centre square
    wide[:, 16:32] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    img = decode(tmp_path / "wide.png", 8)  # H, W, C
    assert img[:, 1:-1].min() == 255 and img.min() > 128  # the filter reaches just past the crop's edges


def test_sixteen_bit_and_jpeg_images_keep_their_brightness(tmp_path):
    Image.fromarray(np.full((20, 30), 200 * 256, dtype=np.uint16)).save(tmp_path / "deep.png")
    Image.new("RGB", (300, 200), (10, 100, 250)).save(tmp_path / "photo.jpg", quality=95)
    assert Image.open(tmp_path / "deep.png").mode.startswith("I;16")
    assert (decode(tmp_path / "deep.png", 8) == 200).all()
    assert np.abs(decode(tmp_path / "photo.jpg", 8).astype(int) - [10, 100, 250]).max() <= 3


def test_stratified_split_is_deterministic_and_per_class(tmp_path):
    root = tmp_path / "imgs"
    for cls, n in (("a", 10), ("b", 5), ("c", 3)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            (root / cls / f"{i:02d}.png").touch()  # listing never decodes
    first, again, other = list_folder(root, 0), list_folder(root, 0), list_folder(root, 1)
    assert first == again
    assert first.test_files != other.test_files
    for label, (cls, n) in enumerate((("a", 10), ("b", 5), ("c", 3))):
        assert first.test_labels.count(label) == round(n * TEST_SHARE)
        assert first.train_labels.count(label) == n - round(n * TEST_SHARE)
        held = {p for p, y in zip(first.test_files, first.test_labels) if y == label}
        assert all(p.parent.name == cls for p in held)
        assert not held & set(first.train_files)


def test_train_and_test_subtrees_are_honoured(tmp_path):
    root = tmp_path / "imgs"
    make_folder(root / "train", per_class=8, classes=("ant", "bee"))
    make_folder(root / "test", per_class=3, classes=("ant", "bee"))
    listing = list_folder(root, 0)
    assert listing.classes == ["ant", "bee"]
    assert all(p.parts[-3] == "train" for p in listing.train_files)
    assert all(p.parts[-3] == "test" for p in listing.test_files)
    raw = load_raw(folder_cfg(root, image_size=8))
    assert len(raw.train) + len(raw.val) == 16 and raw.test.y.tolist() == [0, 0, 0, 1, 1, 1]


def test_describe_agrees_with_load_raw(tmp_path):
    for cfg in (folder_cfg(make_folder(tmp_path / "imgs"), image_size=12), Config(data_dir=str(tmp_path / "syn"),
                                                                                  n_train=200, n_test=50)):
        info, raw = dataset_info(cfg), load_raw(cfg)
        assert info["in_shape"] == raw.in_shape and info["num_classes"] == raw.num_classes
        assert (info["n_train"], info["n_test"]) == (len(raw.train) + len(raw.val), len(raw.test))


def test_fingerprint_follows_the_files(tmp_path):
    root = make_folder(tmp_path / "imgs")
    cfg = folder_cfg(root)
    before = source_fingerprint(cfg)
    assert source_fingerprint(cfg) == before
    target = root / "dog" / "rgb_00.png"
    Image.new("RGB", (20, 30), (1, 2, 3)).save(target)
    os.utime(target, ns=(1, 1))  # a replaced file, whatever the clock's resolution
    assert source_fingerprint(cfg) != before
    assert source_fingerprint(folder_cfg(root, image_size=16)) != source_fingerprint(cfg)


def test_auto_augmentation_per_dataset():
    assert [default_augment(d) for d in ("cifar10", "cifar100", "imagefolder", "svhn", "mnist", "fashion-mnist",
                                         "synthetic")] == ["crop+flip"] * 3 + ["crop"] + ["none"] * 3


def test_image_folder_end_to_end_through_the_cli(tmp_path):
    root = make_folder(tmp_path / "imgs", per_class=10)
    run_dir = tmp_path / "run"
    flags = ["--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "16", "--run-dir", str(run_dir),
             "--width", "4", "--head-width", "8", "--stages", "2", "--max-epochs", "2", "--batch-size", "8",
             "--shard-mb", "1"]
    assert main(flags) == 0
    net = load_model(run_dir / "final" / "model.pt")
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 3)
    # The folder is read class by class, but stage 0 caches the train split shuffled: a shuffle window of
    # the first shards holds every class, not one.
    manifest = json.loads((run_dir / "stage_00" / "cache" / "manifest.json").read_text())
    labels = torch.cat([read_shard(run_dir / "stage_00" / "cache" / s["file"])[1]
                        for s in manifest["splits"]["train"]["shards"]])
    assert not (labels[1:] >= labels[:-1]).all() and len(set(labels[:len(labels) // 2].tolist())) == 3


# --------------------------------------------------------------------------------------------------------
# Mistakes: exit status 2 and one line naming the file or folder


def cli_error(tmp_path, capsys, *flags: str) -> str:
    args = ["--run-dir", str(tmp_path / "run"), "--width", "4", "--stages", "2", *flags]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqtrain: error: "), err
    assert not (tmp_path / "run").exists()
    return err


def test_corrupt_image_is_named(tmp_path, capsys):
    root = make_folder(tmp_path / "imgs")
    bad = root / "dog" / "rgb_04.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    err = cli_error(tmp_path, capsys, "--dataset", "imagefolder", "--data-dir", str(root))
    assert f"cannot read image {bad}" in err


@pytest.mark.parametrize("case", ["missing", "empty", "no class folders", "class without images", "mismatch",
                                  "train without test"])
def test_broken_image_folder_is_named(case, tmp_path, capsys):
    root = tmp_path / "imgs"
    if case == "empty":
        root.mkdir()
    elif case == "no class folders":
        root.mkdir()
        Image.new("RGB", (8, 8)).save(root / "stray.png")
    elif case == "class without images":
        make_folder(root)
        (root / "fox").mkdir()
        (root / "fox" / "notes.txt").write_text("no images here")
    elif case == "mismatch":
        make_folder(root / "train", classes=("ant", "bee"))
        make_folder(root / "test", classes=("ant", "wasp"))
    elif case == "train without test":
        make_folder(root / "train")
    err = cli_error(tmp_path, capsys, "--dataset", "imagefolder", "--data-dir", str(root))
    expect = {"missing": f"--data-dir {root} does not exist", "empty": f"{root} has no class folders",
              "no class folders": f"{root} has no class folders",
              "class without images": f"class folder {root / 'fox'} holds no images",
              "mismatch": "only in train/: bee; only in test/: wasp",
              "train without test": f"{root / 'test'} does not"}[case]
    assert expect in err, err


# --------------------------------------------------------------------------------------------------------
# torchvision datasets from their files


def write_idx(path, array: np.ndarray) -> None:
    """MNIST's idx format: zero bytes, type code 0x08 (uint8), the number of dims, big-endian dims, data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
                     + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_from_raw_files_becomes_three_channels(name, folder, tmp_path):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.integers(0, 256, (40, 28, 28)), rng.integers(0, 256, (10, 28, 28))
    y_train, y_test = np.arange(40) % 10, np.arange(10)
    raw_dir = tmp_path / folder / "raw"
    for split, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        write_idx(raw_dir / f"{split}-images-idx3-ubyte", x)
        write_idx(raw_dir / f"{split}-labels-idx1-ubyte", y)
    raw = load_raw(Config(dataset=name, data_dir=str(tmp_path)))
    assert raw.in_shape == (3, 28, 28) and raw.num_classes == 10
    assert torch.equal(raw.test.x, torch.from_numpy(x_test.astype(np.uint8))[:, None].expand(-1, 3, -1, -1))
    assert raw.test.y.tolist() == y_test.tolist()
    assert torch.equal(raw.train.y, torch.from_numpy(y_train)[raw.train.ids])
    assert len(raw.train) + len(raw.val) == 40

    resized = load_raw(Config(dataset=name, data_dir=str(tmp_path), image_size=32))
    assert resized.in_shape == (3, 32, 32)
    # antialiased bilinear keeps the image's mean brightness to within rounding
    assert abs(resized.test.x.float().mean() - raw.test.x.float().mean()) < 1.0


@pytest.mark.parametrize("name,where", [("mnist", "MNIST/raw/train-images-idx3-ubyte"),
                                        ("cifar10", "cifar-10-batches-py/data_batch_1"),
                                        ("cifar100", "cifar-100-python/train")])
def test_missing_torchvision_dataset_says_where_and_how(name, where, tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "--dataset", name, "--data-dir", str(tmp_path / "data"))
    assert f"{name} was not found in --data-dir" in err
    assert str(tmp_path / "data" / where) in err and "pass --download to fetch it" in err


def test_missing_torchvision_dataset_from_python_names_the_keywords(tmp_path):
    # From Python the fix is a keyword argument (issue 26): `download=True`, not the flag `--download`.
    data = str(tmp_path / "data")
    with from_python(), pytest.raises(UserError) as e:
        load_raw(Config(dataset="cifar10", data_dir=data))
    msg = str(e.value)
    assert f"cifar10 was not found in data_dir={data!r}" in msg and "pass download=True to fetch it" in msg
    assert "--" not in msg, msg
    with pytest.raises(UserError, match="pass --download to fetch it"):  # the command line's terms outside
        load_raw(Config(dataset="cifar10", data_dir=data))


def test_train_stages_names_the_keyword_for_a_missing_dataset(tmp_path):
    import seqtrain

    stages = [nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)]
    with pytest.raises(UserError, match="pass download=True to fetch it"):
        seqtrain.train_stages(stages, dataset="cifar10", data_dir=str(tmp_path / "data"),
                              run_dir=str(tmp_path / "run"))


def test_damaged_mnist_says_so(tmp_path, capsys):
    raw_dir = tmp_path / "data" / "MNIST" / "raw"
    for split in ("train", "t10k"):
        write_idx(raw_dir / f"{split}-images-idx3-ubyte", np.zeros((4, 28, 28)))
        (raw_dir / f"{split}-labels-idx1-ubyte").write_bytes(b"\0\0\x0d\x01")  # float32 labels
    err = cli_error(tmp_path, capsys, "--dataset", "mnist", "--data-dir", str(tmp_path / "data"))
    assert "is damaged" in err and "rerun with --download" in err
    with from_python(), pytest.raises(UserError, match="is damaged .*; delete its files and rerun with download=True"):
        load_raw(Config(dataset="mnist", data_dir=str(tmp_path / "data")))


@pytest.mark.skipif(importlib.util.find_spec("scipy") is not None, reason="scipy is installed")
def test_svhn_without_scipy_says_what_to_install(tmp_path, capsys):
    err = cli_error(tmp_path, capsys, "--dataset", "svhn", "--data-dir", str(tmp_path / "data"))
    assert "pip install scipy" in err


def test_files_added_between_two_api_calls_in_one_process_retrain_stage_0(tmp_path):
    # The input fingerprint is remembered per run, not per process: a second seqtrain.train_stages() call
    # in the same session must see the folder as it is now, not reuse the stage-0 cache of the old files.
    import seqtrain

    root = make_folder(tmp_path / "imgs", per_class=10)
    settings = dict(dataset="imagefolder", data_dir=str(root), image_size=16, run_dir=str(tmp_path / "run"),
                    max_epochs=1, batch_size=8, shard_mb=1)

    def stages():
        torch.manual_seed(0)
        return [torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU())]

    first = seqtrain.train_stages(stages(), **settings).results["stages"][0]
    for cls in CLASSES:
        for i in range(10, 15):
            save_image(root / cls / f"rgb_{i:02d}.png", cls, i)
    second = seqtrain.train_stages(stages(), **settings).results["stages"][0]
    assert second["cache_mb"] > first["cache_mb"]  # stage 0 cached the 45 images, not the first 30 again
