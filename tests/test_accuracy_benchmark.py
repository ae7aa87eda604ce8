"""benchmarks/accuracy.py: a smoke run on the tiniest configuration gives a well-formed summary (its numbers
are not checked: a one-epoch run learns nothing), a rerun reuses every run directory, and the sweep and the
target check follow their definitions."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from seqtrain.files import read_json

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "accuracy.py"
TINY = ["--archs", "resnet20", "--ks", "2", "--seeds", "0", "--downsamples", "standard", "--n-train", "400",
        "--n-test", "100", "--width", "4", "--max-epochs", "1"]


def bench(out, data) -> tuple[subprocess.CompletedProcess, dict]:
    # One thread per run: a machine busy with other jobs stalls two-threaded runs at every OpenMP barrier.
    proc = subprocess.run([sys.executable, str(SCRIPT), *TINY, "--threads", "1", "--out", str(out), "--data-dir",
                           str(data)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_smoke_run_summary_and_reuse(tmp_path):
    out = tmp_path / "out"
    proc, summary = bench(out, tmp_path / "data")
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu" and summary["device_name"]
    assert summary["config"]["archs"] == ["resnet20"] and summary["config"]["ks"] == [2]
    assert summary["baseline_rss_mb"] > 100  # torch alone is several hundred MB
    assert summary["target"]["measured"] is False and summary["target"]["arch"] == "resnet32"
    assert "target (resnet32, K=4, accelerated): not measured" in proc.stdout
    rows = {(r["method"], r["k"]): r for r in summary["rows"]}
    assert set(rows) == {("e2e", None), ("sequential", 2)}
    assert all(0 <= r["test_acc"][0] <= 1 for r in rows.values()) and rows[("e2e", None)]["gap_points"] == [0, 0]
    saved = read_json(out / "results.json")
    assert saved["summary"] == summary and len(saved["rows"]) == 2
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    assert len(logs) == 2 and sum(text.count("$ python -m seqtrain.run") for text in logs.values()) == 4
    _, again = bench(out, tmp_path / "data")  # every run directory is complete: nothing trains
    assert {p.name: p.read_text() for p in (out / "logs").glob("*.log")} == logs
    # The same runs read again; only mem ratio moves, with the baseline process measured afresh.
    assert [(r["test_acc"], r["gap_points"]) for r in again["rows"]] == [(r["test_acc"], r["gap_points"])
                                                                          for r in summary["rows"]]


# --------------------------------------------------------------------------------------------------------
# The sweep's definitions, without training


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_points_skip_k_beyond_the_depth_and_run_e2e_once(accuracy, tmp_path):
    args = accuracy.parse_args(["--archs", "resnet18,resnet20", "--ks", "2,8,10", "--seeds", "0,1",
                                "--out", str(tmp_path)])
    todo = accuracy.points(args)
    for arch, blocks, ks in (("resnet18", 9, [2, 8]), ("resnet20", 10, [2, 8, 10])):
        mine = [p for p in todo if p["arch"] == arch]
        assert all(p["blocks"] == blocks for p in mine)
        assert sorted({p["k"] for p in mine if p["method"] == "sequential"}) == ks
        assert len([p for p in mine if p["method"] == "e2e"]) == 2 * 2  # per downsample and seed, not per K
    assert len({p["run_dir"] for p in todo}) == len(todo)


@pytest.mark.parametrize(("gap", "ratio", "met"), [(-0.5, 0.2, True), (2.0, 0.3, True), (-1.5, 0.2, False),
                                                   (0.0, 0.35, False)])
def test_target_check(accuracy, gap, ratio, met):
    row = {"method": "sequential", "arch": "resnet32", "k": 4, "downsample": "accelerated", "gap_points": (gap, 0.1),
           "mem_ratio": (ratio, 0.01), "analytic_ratio": 0.25}
    other = {**row, "k": 2, "gap_points": (-50.0, 0.0)}
    target = accuracy.target_check([other, row])
    assert target["measured"] and target["met"] is met and target["gap_points"] == gap
    assert accuracy.target_check([other])["measured"] is False
