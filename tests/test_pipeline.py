"""The pipeline as a user relies on it: cached features are the frozen blocks' output, stages need only
the previous cache, reruns skip finished work, and the composed network agrees with the cached path."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import torch

import seqtrain.models
import seqtrain.stage
from seqtrain import load_model
from seqtrain.batches import ImageBatches
from seqtrain.config import Config
from seqtrain.data import load_raw
from seqtrain.files import load_torch
from seqtrain.job import resolve
from seqtrain.models import build_stage_block
from seqtrain.run import main


def read_split(cache_dir, split):
    files = sorted(cache_dir.glob(f"{split}-*.h5"))
    xs, ys, ids = [], [], []
    for f in files:
        with h5py.File(f) as h:
            xs.append(h["features"][...])
            ys.append(h["labels"][...])
            ids.append(h["ids"][...])
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ids)


def test_cached_features_equal_live_forward_through_frozen_blocks(tiny):
    assert tiny("--stage", "all") == 0
    cfg = Config.from_dict(json.loads((tiny.run_dir / "config.json").read_text()))
    raw = load_raw(cfg)
    batch = next(iter(ImageBatches(raw.test, raw.mean, raw.std, batch_size=100)))[0]
    x = batch
    for k, specs in enumerate(resolve(cfg).specs):
        block = build_stage_block(list(specs))
        block.load_state_dict(load_torch(tiny.run_dir / f"stage_{k:02d}" / "block.pt")["block"])
        with torch.no_grad():
            x = block.eval()(x)
        cached, labels, ids = read_split(tiny.run_dir / f"stage_{k:02d}" / "cache", "test")
        assert cached.dtype == np.float16 and cached.shape[1:] == tuple(x.shape[1:])
        assert (ids == np.arange(len(ids))).all() and (labels == raw.test.y.numpy()).all()
        live = x.numpy()
        # float16 keeps 11 significant bits: relative error at most 2^-11 per element.
        assert np.allclose(cached[:100].astype(np.float32), live, rtol=2**-10, atol=1e-4)
        x = torch.from_numpy(cached[:100].astype(np.float32))  # the next stage sees the cached values


def test_later_stage_trains_without_earlier_weights_or_raw_data(tiny, monkeypatch):
    assert tiny("--stage", "0") == 0
    (tiny.run_dir / "stage_00" / "block.pt").unlink()
    for f in tiny.data_dir.iterdir():
        f.unlink()
    tiny.data_dir.rmdir()
    built = []
    real_build = seqtrain.models.build_block
    monkeypatch.setattr(seqtrain.models, "build_block", lambda spec: built.append(spec) or real_build(spec))

    assert tiny("--stage", "1") == 0
    cfg = Config.from_dict(json.loads((tiny.run_dir / "config.json").read_text()))
    assert built == list(resolve(cfg).specs[1])  # only stage 1's blocks were ever constructed
    manifest = json.loads((tiny.run_dir / "stage_01" / "cache" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["count"] == 360 and manifest["splits"]["test"]["count"] == 100


def test_second_run_trains_nothing(tiny, capsys):
    assert tiny("--stage", "all") == 0
    manifests = sorted(tiny.run_dir.glob("stage_*/cache/manifest.json"))
    before = [(m.stat().st_mtime_ns, m.read_bytes()) for m in manifests]
    capsys.readouterr()
    assert tiny("--stage", "all") == 0
    out = capsys.readouterr().out
    assert "epoch" not in out.split("stage  val acc")[0]  # no epoch line before the summary table
    assert out.count("complete, skipped") == 3  # two stages and the final network
    assert [(m.stat().st_mtime_ns, m.read_bytes()) for m in manifests] == before


def test_retraining_a_stage_makes_later_stages_stale(tiny, capsys, monkeypatch):
    assert tiny("--stage", "all") == 0
    assert tiny("--stage", "0") == 0  # same seed on CPU: identical features, so stage 1 stays current
    capsys.readouterr()
    assert tiny("--stage", "all") == 0
    assert capsys.readouterr().out.count("complete, skipped") == 3

    # Retrain stage 0 to different weights (as a GPU's nondeterminism or new code would): stage 1 is stale.
    real_fit = seqtrain.stage.fit

    def perturbed_fit(model, *args, **kwargs):
        result = real_fit(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters()).mul_(1.5)
        return result

    monkeypatch.setattr(seqtrain.stage, "fit", perturbed_fit)
    assert tiny("--stage", "0") == 0
    monkeypatch.undo()
    capsys.readouterr()
    assert tiny("--stage", "all") == 0
    out = capsys.readouterr().out
    assert "stage 0/1: complete, skipped" in out
    assert "stage 1's cache is stale" in out and "stage 1/1 epoch" in out
    assert "final: complete, skipped" not in out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_composed_network_matches_cached_path(tiny, dtype):
    assert tiny("--stage", "all", "--cache-dtype", dtype) == 0
    results = json.loads((tiny.run_dir / "final" / "results.json").read_text())
    final = results["final"]
    if dtype == "float32":
        assert final["test_acc"] == pytest.approx(final["cached_path_test_acc"], abs=1e-9)
    else:  # float16 rounding may flip a prediction that sits on a decision boundary
        assert abs(final["test_acc"] - final["cached_path_test_acc"]) <= 0.02
    assert [s["stage"] for s in results["stages"]] == [0, 1]

    net = load_model(tiny.run_dir / "final" / "model.pt")  # plain weights_only load, rebuilt module
    cfg = Config.from_dict(json.loads((tiny.run_dir / "config.json").read_text()))
    raw = load_raw(cfg)
    x, y, _ = next(iter(ImageBatches(raw.test, net.mean, net.std, batch_size=100)))
    with torch.no_grad():
        acc = (net(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(final["test_acc"], abs=1e-6)


def test_e2e_baseline_is_recorded_beside_the_sequential_result(tiny, capsys):
    assert tiny("--stage", "all") == 0
    assert tiny("--stage", "e2e") == 0
    e2e = json.loads((tiny.run_dir / "e2e" / "results.json").read_text())
    assert 1 <= e2e["epochs"] <= 3 and e2e["peak_tensor_mb"] > 0
    # The saved e2e network is the one whose test accuracy was recorded.
    net, raw = load_model(tiny.run_dir / "e2e" / "model.pt"), load_raw(Config(n_train=400, n_test=100,
                                                                               data_dir=str(tiny.data_dir)))
    x, y, _ = next(iter(ImageBatches(raw.test, net.mean, net.std, batch_size=100)))
    with torch.no_grad():
        assert (net(x).argmax(1) == y).float().mean().item() == pytest.approx(e2e["test_acc"], abs=1e-6)
    table = capsys.readouterr().out.split("stage  val acc")[-1]
    assert "e2e" in table and "final network" in table and "largest stage / e2e (tensor peak)" in table


def test_config_file_sets_defaults_and_flags_override(tiny, tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('patience = 7\nhead = "linear"\nlr = 0.1\n')
    assert tiny("--stage", "0", "--config", str(toml), "--lr", "0.02") == 0
    saved = json.loads((tiny.run_dir / "config.json").read_text())
    assert saved["patience"] == 7 and saved["head"] == "linear" and saved["lr"] == 0.02
    # The run directory remembers its configuration: --stage 1 needs no other flag.
    assert main(["--stage", "1", "--run-dir", str(tiny.run_dir)]) == 0
