"""seqtrain.probe: the linear probe and the separability index tell separable features from label-shuffled ones,
the command reads real caches and an e2e model at the same boundaries, and user mistakes exit 2 in one line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from seqtrain.api import load_model
from seqtrain.cache import SPLITS, ShardWriter, publish_manifest
from seqtrain.config import Config
from seqtrain.contract import Identity, Manifest, SplitInfo, SplitTable, StageResult
from seqtrain.data import load_raw
from seqtrain.files import read_json, write_json
from seqtrain.job import resolve
from seqtrain.probe import main, pooled_cache, pooled_network, probe, separability
from seqtrain.run import main as seqtrain_main
from seqtrain.rundir import RunDir, dataset_fingerprint, stage_manifest

from conftest import ROOT, tiny_flags

PNG = b"\x89PNG\r\n\x1a\n"
COUNTS = {"train": 600, "val": 50, "test": 400}


# --------------------------------------------------------------------------------------------------------
# Synthetic caches: features built to separate, or not


def class_features(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """[n, 16, 2, 2] features whose pooled value is 3 * one-hot(class) plus unit-variance noise: separable."""
    x = torch.randn(len(labels), 16, 2, 2, generator=g)
    x[torch.arange(len(labels)), labels] += 3.0
    return x


def write_stage(run: RunDir, cfg: Config, k: int, features: dict, labels: dict, input_fp: str) -> Manifest:
    """Publish a stage cache of the given features through seqtrain's own writer and manifest."""
    cache = run.cache(k)
    cache.mkdir(parents=True)
    splits = {}
    for split in SPLITS:
        writer = ShardWriter(cache, split, samples_per_shard=128, dtype="float16", compression="none")
        writer.add(features[split], labels[split], torch.arange(len(labels[split])))
        shards = writer.close()
        splits[split] = SplitInfo(sum(s.count for s in shards), tuple(shards))
    return publish_manifest(
        cache, identity=Identity(resolve(cfg).config_hash, input_fp, k),
        weights_hash="synthetic", num_classes=10,
        table=SplitTable((16, 2, 2), 1, "float16", "none", splits),
        result=StageResult.from_dict({"val_acc": 1.0, "test_acc": 1.0, "epochs": 1, "best_epoch": 1,
                                      "peak_tensor_mb": 1.0, "peak_rss_mb": 1.0, "train_seconds": 1.0,
                                      "cache_seconds": 1.0}))


@pytest.fixture
def synthetic_run(tmp_path) -> RunDir:
    """Stage 0: separable features; stage 1: the same features with every split's labels shuffled."""
    run = RunDir(tmp_path / "run")
    cfg = Config(run_dir=str(run.root), arch="resnet20", width=4, stages="2", balance="blocks").validate()
    run.root.mkdir()
    write_json(run.config, cfg.to_dict())
    g = torch.Generator().manual_seed(0)
    labels = {s: torch.randint(0, 10, (n,), generator=g) for s, n in COUNTS.items()}
    features = {s: class_features(y, g) for s, y in labels.items()}
    first = write_stage(run, cfg, 0, features, labels, dataset_fingerprint(cfg, run))
    shuffled = {s: y[torch.randperm(len(y), generator=g)] for s, y in labels.items()}
    write_stage(run, cfg, 1, features, shuffled, first.fingerprint)
    assert stage_manifest(cfg, resolve(cfg), run, 1)[0] is not None, "the synthetic stages must count as complete"
    return run


def test_probe_scores_separable_features_high_and_shuffled_labels_near_chance(synthetic_run):
    result = probe(synthetic_run, e2e=False, limit=None)
    separable, shuffled = result["stages"]
    assert [s["depth"] for s in result["stages"]] == [5, 10] and result["n_train"] == COUNTS["train"]
    assert separable["probe_test_acc"] > 0.95 and separable["probe_train_acc"] > 0.95
    assert shuffled["probe_test_acc"] < 0.3  # chance is 0.1; a linear probe on 16 channels cannot memorize
    assert separable["separability"] > 1.0 and shuffled["separability"] < 0.1
    assert separable["fisher"] > 10 * shuffled["fisher"]


def test_max_train_caps_the_probe_samples(synthetic_run):
    result = probe(synthetic_run, e2e=False, limit=200)
    assert result["n_train"] == 200 and result["n_test"] == COUNTS["test"]
    assert result["stages"][0]["probe_test_acc"] > 0.9


def test_separability_is_scale_free_and_zero_without_class_structure():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 10, (2000,), generator=g)
    x = class_features(y, g).mean(dim=(2, 3))  # [n, 16]
    sep, fisher = separability(x, y)
    assert separability(1000 * x, y) == pytest.approx((sep, fisher), rel=1e-6)
    noise, _ = separability(torch.randn(2000, 16, generator=g), y)
    assert noise < 0.02 < sep


# --------------------------------------------------------------------------------------------------------
# A tiny real run: the command line, and the e2e network at the same boundaries


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny pipeline with its e2e baseline (two stages of a 4-channel ResNet-20), run once for this module."""
    tmp = tmp_path_factory.mktemp("probe")
    # Cut into equal block counts (5, 5), so that the probed depths are easy to name.
    assert seqtrain_main(tiny_flags(tmp, "--stage", "all", "--balance", "blocks")) == 0
    assert seqtrain_main(tiny_flags(tmp, "--stage", "e2e", "--balance", "blocks")) == 0
    return RunDir(tmp / "run")


def test_probe_command_on_a_real_run(tiny_run):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "seqtrain.probe", "--run-dir", str(tiny_run.root)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("probe: ") and "(sequential)" in lines[0]
    assert lines[1].split()[:3] == ["stage", "depth", "channels"] and len(lines) == 7  # title, 2+2 table, 2 notes
    result = read_json(tiny_run.root / "probe" / "probe.json")
    assert [s["depth"] for s in result["stages"]] == [5, 10] and result["source"] == "sequential"
    assert all(s["separability"] > 0 for s in result["stages"])
    for s, line in zip(result["stages"], lines[3:5]):  # the table prints the JSON's figures
        assert f"{s['probe_test_acc']:.4f}" in line.split()
    assert (tiny_run.root / "probe" / "separability.png").read_bytes()[:8] == PNG


def test_network_features_match_the_caches_at_each_boundary(tiny_run):
    # The --e2e path pools a saved network's block outputs; on the final network (the frozen stages) it must
    # reproduce every stage's cached test features, up to float16 rounding.
    cfg = Config.from_dict(read_json(tiny_run.config))
    net, raw = load_model(tiny_run.final / "model.pt"), load_raw(cfg)
    layout = resolve(cfg)
    live = pooled_network(net, raw.test, list(layout.sizes), 32, "cpu")
    for k, (x, y) in enumerate(live):
        cached_x, cached_y = pooled_cache(tiny_run.cache(k), stage_manifest(cfg, layout, tiny_run, k)[0], "test", None)
        assert torch.equal(y, cached_y)
        torch.testing.assert_close(x, cached_x, atol=2e-3, rtol=2e-3)


def test_e2e_probe_at_the_run_boundaries_and_regrouped(tiny_run, capsys):
    assert main(["--run-dir", str(tiny_run.root), "--e2e"]) == 0
    result = read_json(tiny_run.e2e / "probe" / "probe.json")
    assert result["source"] == "e2e" and [s["depth"] for s in result["stages"]] == [5, 10]
    assert "(e2e)" in capsys.readouterr().out
    out = tiny_run.root / "e2e-by-block"
    assert main(["--run-dir", str(tiny_run.root), "--e2e", "--stages", "10", "--out", str(out)]) == 0
    assert [s["depth"] for s in read_json(out / "probe.json")["stages"]] == list(range(1, 11))
    assert (out / "separability.png").read_bytes()[:8] == PNG


# --------------------------------------------------------------------------------------------------------
# Mistakes


@pytest.mark.parametrize("case", ["missing", "no_stage", "stages_without_e2e", "no_e2e_model"])
def test_mistakes_exit_2_with_one_line(tmp_path, capsys, case):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
        write_json(run / "config.json", Config(run_dir=str(run), width=4, stages="2").to_dict())
    argv = {"missing": [], "no_stage": [], "stages_without_e2e": ["--stages", "2"], "no_e2e_model": ["--e2e"]}[case]
    assert main(["--run-dir", str(run), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("seqtrain: error: ") and err.count("\n") == 1
    assert {"missing": "no config.json", "no_stage": "no complete stage", "stages_without_e2e": "--stages",
            "no_e2e_model": "--stage e2e"}[case] in err
    assert not (run / "probe").exists()
