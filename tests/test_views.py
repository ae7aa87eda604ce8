"""Augmentation and cached views: crops and flips are what they claim, every view of a sample is fixed by
(seed, view, id), the cache holds V views of each training sample with view 0 the plain forward pass, and
later stages train on one view per sample per epoch."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

from seqtrain.augment import Augment, AugmentedBatches, crop_flip, view_params, views_of
from seqtrain.batches import ImageBatches
from seqtrain.cache import read_manifest
from seqtrain.config import Config
from seqtrain.data import load_raw
from seqtrain.files import load_torch
from seqtrain.job import resolve
from seqtrain.loader import CachedBatches
from seqtrain.models import build_stage_block
from seqtrain.streams import cached_train_order

AUG = Augment(crop=True, flip=True, padding=2)


def test_crop_and_flip_move_pixels_as_stated():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    centre = torch.full((2,), 2)
    no = torch.zeros(2, dtype=torch.bool)
    assert torch.equal(crop_flip(x, centre, centre, no, pad=2), x)  # offset = padding: the image itself
    assert torch.equal(crop_flip(x, centre, centre, ~no, pad=2), x.flip(-1))
    shifted = crop_flip(x, torch.tensor([3, 3]), torch.tensor([2, 2]), no, pad=2)  # one pixel to the left
    assert torch.equal(shifted[..., :-1], x[..., 1:]) and (shifted[..., -1] == 0).all()


def test_views_are_fixed_by_seed_view_and_id_not_by_batch():
    x = torch.randn(8, 3, 8, 8)
    ids = torch.arange(100, 108)
    whole = views_of(x, ids, 3, seed=5, aug=AUG)  # [B, V, C, H, W]
    halves = torch.cat([views_of(x[:3], ids[:3], 3, 5, AUG), views_of(x[3:], ids[3:], 3, 5, AUG)])
    assert whole.shape == (8, 3, 3, 8, 8) and torch.equal(whole, halves)
    assert torch.equal(whole[:, 0], x)
    assert not torch.equal(whole[:, 1], whole[:, 2])
    dx, dy, flip = view_params(torch.arange(10_000), 1, 0, AUG)
    assert set(dx.tolist()) == set(dy.tolist()) == set(range(5)) and 0.45 < flip.float().mean() < 0.55


def test_training_augmentation_is_reproducible_per_epoch():
    raw_x = torch.randint(0, 255, (64, 3, 8, 8), dtype=torch.uint8)
    from seqtrain.data import Split

    split = Split(raw_x, torch.zeros(64, dtype=torch.long), torch.arange(64))
    # No shuffling: any difference between epochs is the augmentation's.
    batches = AugmentedBatches(ImageBatches(split, [0.5] * 3, [0.2] * 3, 16), AUG, seed=0)
    first = [b[0] for b in batches]
    again = [b[0] for b in batches]
    batches.set_epoch(1)
    other = [b[0] for b in batches]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def read_split(cache_dir, split):
    xs, ids = [], []
    for f in sorted(cache_dir.glob(f"{split}-*.h5")):
        with h5py.File(f) as h:
            xs.append(h["features"][...])
            ids.append(h["ids"][...])
    return np.concatenate(xs), np.concatenate(ids)


def test_cache_holds_views_and_view_zero_is_the_plain_forward_pass(tiny):
    assert tiny("--augment", "crop+flip", "--cache-views", "3", "--stage", "all") == 0
    cfg = Config.from_dict(json.loads((tiny.run_dir / "config.json").read_text()))
    raw = load_raw(cfg)
    block = build_stage_block(list(resolve(cfg).specs[0]))
    block.load_state_dict(load_torch(tiny.run_dir / "stage_00" / "block.pt")["block"])
    block.eval()
    cache0, cache1 = tiny.run_dir / "stage_00" / "cache", tiny.run_dir / "stage_01" / "cache"
    features, ids = read_split(cache0, "train")
    # the train split is cached in a random order of --data-seed's (pipeline.frozen_image_batches)
    order = cached_train_order(cfg, len(raw.train))
    assert features.shape[:2] == (len(raw.train), 3) and np.array_equal(ids, raw.train.ids[order].numpy())
    assert read_split(cache0, "test")[0].ndim == 4  # val and test are cached plain

    x = next(iter(ImageBatches(raw.train, raw.mean, raw.std, batch_size=50, rows=order)))[0]
    with torch.no_grad():
        plain = block(x).numpy()
        view2 = block(views_of(x, raw.train.ids[order[:50]], 3, cfg.seed, Augment(True, True, cfg.crop_padding))[:, 2])
    np.testing.assert_allclose(features[:50, 0], plain, atol=2e-2, rtol=1e-2)  # float16 cache
    np.testing.assert_allclose(features[:50, 2], view2.numpy(), atol=2e-2, rtol=1e-2)
    assert np.abs(features[:, 1] - features[:, 0]).mean() > 0.05 * np.abs(features[:, 0]).mean()
    assert np.abs(features[:, 2] - features[:, 1]).mean() > 0.05 * np.abs(features[:, 0]).mean()

    # Stage 1 keeps the views apart: view v of its cache is block 1 applied to view v of stage 0's.
    block1 = build_stage_block(list(resolve(cfg).specs[1]))
    block1.load_state_dict(load_torch(tiny.run_dir / "stage_01" / "block.pt")["block"])
    features1, _ = read_split(cache1, "train")
    with torch.no_grad():
        out = block1.eval()(torch.from_numpy(features[:20, 1]).float()).numpy()
    np.testing.assert_allclose(features1[:20, 1], out, atol=2e-2, rtol=1e-2)
    manifest = json.loads((cache0 / "manifest.json").read_text())
    assert manifest["views"] == 3


def test_later_stages_draw_one_view_per_sample_each_epoch(tiny):
    assert tiny("--augment", "crop", "--cache-views", "4", "--stage", "0") == 0
    cache = tiny.run_dir / "stage_00" / "cache"
    manifest = read_manifest(cache)
    features, ids = read_split(cache, "train")
    by_id = {int(i): features[n] for n, i in enumerate(ids)}
    batches = CachedBatches(cache, manifest, "train", 64, shuffle=True, seed=1)

    def drawn_views(epoch) -> dict[int, int]:
        """{sample id: the view drawn for it} over one epoch (so the shuffled order does not matter)."""
        batches.set_epoch(epoch)
        picks = {}
        for x, _, batch_ids in batches:
            assert x.shape[1:] == features.shape[2:]  # one view: [B, C, H, W]
            for row, i in zip(x.numpy(), batch_ids.tolist()):
                matches = [v for v in range(4) if np.array_equal(row.astype(np.float16), by_id[i][v])]
                assert matches, "a drawn sample is one of its cached views"
                picks[i] = matches[0]
        return picks

    first = drawn_views(0)
    assert len(first) == len(ids) and set(first.values()) == {0, 1, 2, 3}
    assert drawn_views(0) == first and drawn_views(1) != first


@pytest.mark.parametrize("flags, message", [
    (["--cache-views", "2"], "needs augmentation"),  # synthetic data: --augment auto means none
    (["--augment", "none", "--cache-views", "3"], "needs augmentation"),
])
def test_views_without_augmentation_are_refused(tiny, capsys, flags, message):
    assert tiny(*flags, "--stage", "all") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not tiny.run_dir.exists()  # nothing written
