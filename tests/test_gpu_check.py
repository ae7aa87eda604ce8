"""scripts/gpu_check.sh: with no GPU visible it stops at once with one line and exit status 2, and the figures
it writes are each stage's measured peaks, times and throughput set against --plan's prediction (computed
here from a tiny CPU run; the whole script is rehearsed on the CPU with --rehearse, about 4 minutes)."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys

import pytest

from seqtrain.files import read_json

from conftest import ROOT


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path):
    # no GPU, also on a machine that has one; the interpreter running these tests, whatever PATH says
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("gpu_check: error: no CUDA GPU is visible (")
    assert "CUDA_VISIBLE_DEVICES=''" in proc.stderr and "--rehearse" in proc.stderr
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_the_figures_set_each_stage_against_the_plan(tiny):
    assert tiny("--max-epochs", "1") == 0 and tiny("--max-epochs", "1", "--stage", "e2e") == 0
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert tiny("--max-epochs", "1", "--plan", "--json") == 0
    plan, results = json.loads(out.getvalue()), read_json(tiny.run_dir / "final" / "results.json")
    e2e = read_json(tiny.run_dir / "e2e" / "results.json")
    figures = gpu_check().stage_figures(plan, results, e2e)
    assert [r["stage"] for r in figures["stages"]] == [0, 1]
    for row, stage, predicted in zip(figures["stages"], results["stages"], plan["stages"]):
        assert row["train_peak_mb"] == stage["train_memory"]["peak_tensor_mb"] > 0
        assert row["train_peak_over_predicted"] == pytest.approx(row["train_peak_mb"] / (predicted["train_bytes"]
                                                                                        / 2**20), abs=1e-3)
        assert row["train_samples_per_s"] == pytest.approx(plan["splits"]["train"] / stage["train_seconds"], rel=1e-3)
        assert row["cache_seconds"] == stage["cache_seconds"] and row["tensor_source"].startswith("MemTracker")
    largest = max(r["train_peak_mb"] for r in figures["stages"])
    assert figures["largest_stage_over_e2e"] == pytest.approx(largest / e2e["peak_tensor_mb"], abs=1e-3)
