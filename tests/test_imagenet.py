"""`--dataset imagenet` without ImageNet: --plan from the published sizes, the memory refusal before anything
is decoded or written, a missing dataset named in one line, and a tiny fake of torchvision's prepared layout
(train/WNID/*.JPEG, val/WNID/*.JPEG) read through the image-folder machinery."""

from __future__ import annotations

import json
from types import SimpleNamespace

import psutil
import pytest
import torch
from PIL import Image

from seqtrain.config import Config
from seqtrain.data import carve, dataset_info, load_raw, source_fingerprint
from seqtrain.run import main

WNIDS = {"n01440764": (200, 30, 30), "n01443537": (30, 200, 30), "n01484850": (30, 30, 200)}  # class: colour
N_TRAIN, N_TEST = 1_281_167, 50_000


def make_imagenet(root, train: int = 6, val: int = 2):
    """torchvision's prepared layout, with the devkit beside it as torchvision leaves it (unread here)."""
    for split, n in (("train", train), ("val", val)):
        for wnid, colour in WNIDS.items():
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                size = (40 + 7 * i, 30 + 5 * i)  # ImageNet's images vary in size: each is resized and cropped
                Image.new("RGB", size, colour).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=95)
    (root / "ILSVRC2012_devkit_t12.tar.gz").write_bytes(b"")
    return root


def available(monkeypatch, free: int) -> None:
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(**{**real._asdict(), "available": free}))


def one_line_error(capsys, tmp_path, *flags: str) -> str:
    assert main(["--run-dir", str(tmp_path / "run"), "--dataset", "imagenet", *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("seqtrain: error: "), err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    return err


# --------------------------------------------------------------------------------------------------------
# Without the data


def test_plan_needs_no_data(tmp_path, capsys):
    data = tmp_path / "absent"
    assert main(["--plan", "--json", "--dataset", "imagenet", "--arch", "torchvision:resnet18", "--data-dir",
                 str(data), "--run-dir", str(tmp_path / "run")]) == 0
    p = json.loads(capsys.readouterr().out)
    n_val = round(N_TRAIN * 0.1)
    assert p["num_classes"] == 1000 and p["in_shape"] == [3, 224, 224]
    assert p["splits"] == {"train": N_TRAIN - n_val, "val": n_val, "test": N_TEST}
    assert p["stages"][0]["input_bytes"] == (N_TRAIN + N_TEST) * 3 * 224 * 224  # the decoded dataset in RAM
    assert not data.exists() and not (tmp_path / "run").exists()


def test_too_large_is_refused_before_anything_is_read(tmp_path, capsys, monkeypatch):
    available(monkeypatch, 100 * 10**9)
    err = one_line_error(capsys, tmp_path, "--data-dir", str(tmp_path / "absent"))
    rows = N_TRAIN + round(N_TRAIN * 0.1) + N_TEST  # every image, and the val split's copy while it is carved
    assert f"needs {rows * 3 * 224 * 224 / 1e9:,.1f} GB" in err and "100.0 GB are available" in err
    assert f"--image-size 128 (needs {rows * 3 * 128 * 128 / 1e9:,.1f} GB)" in err  # the largest that fits
    assert "more memory" in err


def test_too_large_fake_folder_is_refused_before_decoding(tmp_path, capsys, monkeypatch):
    root = make_imagenet(tmp_path / "imagenet")
    available(monkeypatch, 1000)
    err = one_line_error(capsys, tmp_path, "--data-dir", str(root), "--image-size", "16")
    assert f"needs {(18 + 2 + 6) * 3 * 16 * 16 / 1e9:,.1f} GB" in err  # 18 train + 2 val copied + 6 test
    assert "use a smaller --image-size or a machine with more memory" in err


@pytest.mark.parametrize("download", [False, True])
def test_missing_imagenet_says_what_torchvision_looks_for(download, tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    flags = ["--data-dir", str(tmp_path / "data"), "--image-size", "16"] + (["--download"] if download else [])
    err = one_line_error(capsys, tmp_path, *flags)
    assert f"({tmp_path / 'data' / 'val'}/ missing)" in err and "torchvision.datasets.ImageNet" in err
    assert "ILSVRC2012_img_train.tar" in err and "cannot be downloaded automatically" in err
    assert err.startswith("seqtrain: error: --download cannot fetch imagenet") == download


# --------------------------------------------------------------------------------------------------------
# A fake of torchvision's prepared layout


def test_fake_imagenet_loads_as_an_image_folder(tmp_path):
    root = make_imagenet(tmp_path / "imagenet")
    cfg = Config(dataset="imagenet", data_dir=str(root), image_size=16)
    raw, info = load_raw(cfg), dataset_info(cfg)
    assert raw.in_shape == (3, 16, 16) and raw.num_classes == 3
    assert (len(raw.train) + len(raw.val), len(raw.test)) == (18, 6)
    assert (info["n_train"], info["n_test"], info["num_classes"]) == (18, 6, 3)  # listed, not the known sizes
    assert raw.test.y.tolist() == [0, 0, 1, 1, 2, 2]  # val/ is the test split; labels follow the sorted WNIDs
    colours = torch.tensor(list(WNIDS.values())).view(3, 3, 1, 1)  # class, C, H, W
    for split in (raw.train, raw.val, raw.test):
        assert (split.x.int() - colours[split.y]).abs().max() <= 3  # JPEG keeps a flat colour to within 3
    before = source_fingerprint(cfg)
    Image.new("RGB", (40, 30), (1, 2, 3)).save(root / "val" / "n01440764" / "n01440764_0.JPEG")
    assert source_fingerprint(cfg) != before  # a replaced file makes stage 0's cache stale


def test_carve_equals_indexing_across_chunks():
    x = torch.randint(0, 256, (50, 3, 4, 4), dtype=torch.uint8)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    val_ids, train_ids = perm[:7].sort().values, perm[7:].sort().values
    want_train, want_val = x[train_ids].clone(), x[val_ids].clone()
    train, val = carve(x, torch.arange(50), train_ids, val_ids, chunk_bytes=5 * 48)  # 5 rows a chunk
    assert torch.equal(train.x, want_train) and torch.equal(val.x, want_val)
    assert train.y.tolist() == train_ids.tolist() and val.y.tolist() == val_ids.tolist()


def test_fake_imagenet_trains_and_later_stages_run_without_it(tmp_path):
    root = make_imagenet(tmp_path / "imagenet", train=8)
    flags = ["--dataset", "imagenet", "--data-dir", str(root), "--image-size", "16", "--arch", "resnet8", "--run-dir",
             str(tmp_path / "run"), "--width", "4", "--head-width", "8", "--stages", "2", "--max-epochs", "1",
             "--batch-size", "8", "--shard-mb", "1"]
    assert main([*flags, "--stage", "0"]) == 0
    root.rename(tmp_path / "moved")  # stage 1 reads stage 0's cache only: ImageNet need not be here
    assert main([*flags, "--stage", "1"]) == 0
    assert (tmp_path / "run" / "stage_01" / "cache" / "manifest.json").is_file()
