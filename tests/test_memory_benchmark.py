"""benchmarks/memory.py and plan.py: the benchmark's summary is well formed on a tiny configuration (its
numbers are not checked: they depend on the machine), --budget-mb judges every configuration by one figure
and records an out-of-memory anywhere, and what plan.py predicts without computing equals what a real
training step and a real cache measure."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from benchmarks import memory, memory_report
from seqtrain.cache import read_manifest
from seqtrain.config import Config
from seqtrain.files import read_json
from seqtrain.job import resolve
from seqtrain.memory import SavedTensorBytes, analytic_step
from seqtrain.models import StageModel, build_head, build_stage_block
from seqtrain.plan import format_plan, plan
from seqtrain.rundir import RunDir
from seqtrain.train import make_optimizer

from conftest import ROOT

RATIOS = ("peak_ratio", "ckpt_ratio", "ckpt_time_ratio", "floor_ratio", "loader_efficiency", "rss_peak_ratio",
          "rss_floor_ratio")
TINY = ["--device", "cpu", "--arch", "resnet20", "--width", "4", "--stages", "2", "--batch-size", "16",
        "--steps", "2", "--warmup", "1", "--samples", "128"]


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny benchmark run, 7 child processes of ~3 s each: (output dir, last-line summary, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    # One thread per child: with two, a machine busy with other jobs stalls every OpenMP barrier (seconds
    # per step measured here), and this test checks the figures' form, not the speed.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory.py"), *TINY, "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stdout


@pytest.mark.slow
def test_benchmark_summary_is_well_formed(bench):
    out, summary, _ = bench
    for key in RATIOS:
        assert isinstance(summary[key], float) and math.isfinite(summary[key]) and summary[key] > 0, key
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu" and summary["device_name"]
    balanced = list(resolve(Config(arch="resnet20", width=4, stages="2", batch_size=16).validate()).sizes)
    assert summary["config"]["arch"] == "resnet20" and summary["config"]["stages"] == balanced != [5, 5]
    assert summary["largest_stage"] in ("stage 0", "stage 1")
    for name, t in summary["targets"].items():
        op, bound = t["target"].split()
        if name == "rss_floor_ratio":  # opt-in: judged only with --release-memory, which TINY does not give
            assert t["met"] is None and t["opt_in"] == "--release-memory"
            continue
        assert t["met"] == (t["value"] <= float(bound) if op == "<=" else t["value"] >= float(bound))
    # Tensor level: the largest stage measured against plan.py's predicted peak, which errs on the safe side.
    assert 0.85 <= summary["floor_ratio"] <= 1.15 and summary["floor_only_ratio"] >= 1.0
    assert (out / "memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The report redraws from the JSON alone, as a module: nothing is measured again.
    (out / "memory.png").unlink()
    report = subprocess.run([sys.executable, "-m", "benchmarks.memory_report", str(out)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert report.returncode == 0, report.stderr
    assert "peak_ratio" in report.stdout and (out / "memory.png").exists()
    saved = read_json(out / "memory.json")
    assert set(saved["rows"]) == {"e2e", "e2e+ckpt", "stage 0", "stage 1", "ram 1", "cache 0", "cache 1"}
    assert all(row["peak"]["rss"] > 0 for row in saved["rows"].values())
    assert not list(out.glob("caches-*")), "the temporary caches were left behind"


@pytest.mark.slow
def test_benchmark_prints_a_verdict_and_where_its_files_are(bench):
    out, summary, stdout = bench
    block = stdout.split("\nverdict ", 1)[1].split("\n\n", 1)[0]  # from its header to the blank line after it
    verdict = {line.split()[0]: line for line in block.splitlines()[1:] if line.split()[0] in summary}
    assert set(verdict) == {"peak_ratio", "floor_ratio", "loader_efficiency", "rss_floor_ratio"}
    assert f"{summary['peak_ratio']:.2f}x" in verdict["peak_ratio"] and "e2e+ckpt" in verdict["peak_ratio"]
    for name in ("floor_ratio", "loader_efficiency"):
        assert ("met" if summary["targets"][name]["met"] else "MISSED") in verdict[name]
    # An opt-in target that was not opted into is not a failure.
    assert "not measured (opt in with --release-memory)" in verdict["rss_floor_ratio"]
    assert "MISSED" not in verdict["rss_floor_ratio"]
    assert f"results: {out / 'memory.json'}" in stdout and f"plot: {out / 'memory.png'}" in stdout
    assert "ram 1" not in stdout.split("\nverdict ")[0]  # the RAM twin's speed is in the verdict, not a table row


@pytest.mark.parametrize("release", [False, True])
def test_opt_in_target_is_judged_only_when_opted_into(release):
    t = memory.judged("rss_floor_ratio", 3.0, argparse.Namespace(release_memory=release))
    assert t["met"] is (False if release else None) and t["value"] == 3.0
    assert memory_report.against(t) == ("target <= 1.5: MISSED" if release
                                        else "target <= 1.5: not measured (opt in with --release-memory)")
    assert memory.judged("floor_ratio", 1.0, argparse.Namespace(release_memory=False))["met"] is True


@pytest.mark.slow
def test_benchmark_measures_what_plan_predicts(bench):
    out, _, _ = bench
    saved = read_json(out / "memory.json")
    rows, p = saved["rows"], saved["plan"]
    for k, stage in enumerate(p["stages"]):
        # The child counts a real step fed by the real loader; plan.py the same step on the meta device.
        assert rows[f"stage {k}"]["analytic"] == stage["analytic"]
        assert rows[f"cache {k}"]["cache_bytes"] == pytest.approx(stage["cache_bytes"], rel=0.01)
    assert rows["e2e"]["analytic"] == p["e2e"]["analytic"]
    assert rows["e2e+ckpt"]["analytic"]["saved"] < rows["e2e"]["analytic"]["saved"] / 2  # only block inputs kept


def oom(*args, **kw):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")


@pytest.mark.parametrize("kind, where", [("cache", "measure_caching"), ("e2e", "training_job"),
                                         ("stage", "measure_training"), ("ram", "interleaved")])
def test_an_out_of_memory_anywhere_in_a_configuration_is_its_result(monkeypatch, kind, where):
    # Building the model, the caching pass, the training steps, the loader's comparison: each can run out.
    stubs = {"measure_caching": lambda *a: {}, "training_job": lambda *a: (None, None),
             "measure_training": lambda *a: {}, "read_manifest": lambda *a: None,
             "cached_batches": lambda *a, **k: None, "interleaved": lambda *a: [1.0, 1.0], where: oom}
    for name, fn in stubs.items():
        monkeypatch.setattr(memory, name, fn)
    job = memory.Job(Config(arch="resnet8", width=4).to_dict(), "cpu", "unused", 1, 1, kind=kind, stage=1)
    assert memory.child(job)["oom"] is True


def test_the_budget_judges_e2e_and_stages_by_one_figure_and_records_oom(monkeypatch, tmp_path):
    # Tensor peaks by (depth, configuration); at depth 20 stage 1 runs out of the GPU's memory.
    peaks = {8: {"e2e": 60, "ckpt": 40, "stage": 50, "cache": 20},
             20: {"e2e": 100, "ckpt": 70, "stage": 50, "cache": 20}}

    def spawn(job):
        depth = int(job.cfg["arch"].removeprefix("resnet"))
        if depth == 20 and job.kind == "stage" and job.stage == 1:
            return {"oom": True, "device_name": "test"}
        return {"tensor": {"peak": peaks[depth][job.kind] * 2**20}, "device_name": "test"}

    monkeypatch.setattr(memory, "spawn", spawn)
    monkeypatch.setattr(memory.memory_report, "report", lambda out: None)
    args = memory.parse_args(["--device", "cpu", "--quick", "--budget-mb", "64", "--depths", "8,20",
                              "--stages", "2", "--out", str(tmp_path)])
    summary = memory.run_budget(args)
    points = {pt["depth"]: pt for pt in read_json(tmp_path / "budget.json")["points"]}
    assert "memory_limit_mb" not in {f.name for f in dataclasses.fields(memory.Job)}  # nothing capped otherwise
    assert points[8]["e2e_peak"] == 60 * 2**20 and points[8]["fits"] and points[8]["largest_stage_peak"] == 50 * 2**20
    assert points[20]["e2e_peak"] == 100 * 2**20 and not points[20]["e2e_oom"]
    assert points[20]["largest_stage_peak"] is None and not points[20]["fits"]
    assert summary["e2e_max_depth"] == 8 and summary["seqtrain_depth"] == 8
    assert summary["e2e_checkpoint_max_depth"] == 8 and points[20]["e2e_checkpoint_peak"] == 70 * 2**20
    table = memory_report.budget_table(list(points.values()), 64 * 2**20)
    row = next(line.split() for line in table.splitlines() if line.split()[:1] == ["20"])
    assert row[4:6] == ["OOM", "NO"]  # depth 20: the largest stage ran out of memory, so not every stage fits



def test_a_depth_too_deep_to_cache_is_sampled_at_its_largest_stages_and_says_so(monkeypatch, tmp_path):
    # Above --sample-above, end to end comes from --plan and only a sample of the stages is trained, among them
    # the 3 that --plan predicts to be the largest: every one of them must be measured.
    spawned = []

    def spawn(job):
        spawned.append((job.kind, job.stage))
        return {"tensor": {"peak": (40 + job.stage % 7) * 2**20}, "device_name": "test"}

    monkeypatch.setattr(memory, "spawn", spawn)
    monkeypatch.setattr(memory.memory_report, "report", lambda out: None)
    args = memory.parse_args(["--device", "cpu", "--quick", "--budget-mb", "64", "--depths", "56",
                              "--sample-above", "20", "--sample-stages", "5", "--out", str(tmp_path)])
    summary = memory.run_budget(args)
    [pt] = read_json(tmp_path / "budget.json")["points"]
    cfg = memory.bench_config(args, arch="resnet56", stages="auto", memory_budget="64MB")
    predicted = [s["train_bytes"] for s in plan(cfg, resolve(cfg), memory.NUM_CLASSES)["stages"]]
    largest = sorted(range(len(predicted)), key=lambda k: -predicted[k])[:3]
    sampled = pt["sampled"]["stages"]
    assert set(largest) <= set(sampled) and 0 in sampled and len(predicted) - 1 in sampled and len(sampled) <= 5
    assert {kind for kind, _ in spawned} == {"sample"}  # no end-to-end step and no cache at this depth
    assert pt["e2e_predicted"] and pt["e2e_peak"] == plan(cfg, resolve(cfg), memory.NUM_CLASSES)["e2e"]["train_bytes"]
    assert pt["largest_stage_peak"] == max(s["train"] for s in pt["stage_peaks"])
    assert summary["device_name"]  # named though no end-to-end child ran at any depth
    table = memory_report.budget_table([pt], 64 * 2**20)
    assert "(plan)" in table and f"({len(sampled)} measured)" in table and "predicted by --plan, not measured" in table


def test_a_sampled_stage_trains_on_random_features_of_its_inputs_shape(tmp_path):
    cfg = Config(arch="resnet20", width=4, stages="4", batch_size=8, n_train=64, n_test=16)
    job = memory.Job(cfg.to_dict(), "cpu", str(tmp_path / "no-cache-here"), 1, 1, kind="sample", stage=2)
    result = memory.child(job)
    assert result["tensor"]["peak"] > 0 and not (tmp_path / "no-cache-here").exists()


# --------------------------------------------------------------------------------------------------------
# plan.py without the benchmark


def test_saved_tensor_bytes_counts_each_storage_once():
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 0, 1, 0])
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with SavedTensorBytes(exclude=[*model.parameters(), x, y]) as saved:
        nn.functional.cross_entropy(model(x), y).backward()
    # ReLU's output, saved by the ReLU and by the second Linear: 5 x 8 floats once; log_softmax's output:
    # 5 x 2 floats; nll_loss's total weight: 1 float. The weights and the batch are excluded.
    assert saved.bytes == (5 * 8 + 5 * 2 + 1) * 4


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_plan_predicts_the_bytes_of_a_real_step(optimizer):
    cfg = Config(arch="resnet20", width=4, head_width=8, stages="2", batch_size=8, optimizer=optimizer)
    p = plan(cfg)
    for k, specs in enumerate(resolve(cfg.validate()).specs):
        specs = list(specs)
        model = StageModel(build_stage_block(specs), build_head(cfg, specs[-1].out_ch, 10))
        x, y = torch.randn(8, *p["stages"][k]["in_shape"]), torch.randint(0, 10, (8,))
        measured = analytic_step(model, make_optimizer(cfg, model), x, y)
        assert measured.as_dict() == p["stages"][k]["analytic"]
        assert measured.saved > 8 * math.prod(p["stages"][k]["feature_shape"]) * 4  # at least the block's output
        assert measured.optimizer == (2 if optimizer == "adamw" else 1) * measured.grads + (
            4 * len(list(model.parameters())) if optimizer == "adamw" else 0)  # AdamW: two moments and a step


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_plan_predicts_the_cache_of_a_real_run(tiny, dtype):
    assert tiny("--stage", "0", "--cache-dtype", dtype) == 0  # the real dataset, split and writer; later
    p = plan(Config.from_dict(read_json(tiny.run_dir / "config.json")))  # caches: the benchmark test
    manifest = read_manifest(RunDir(tiny.run_dir).cache(0))
    assert list(manifest.feature_shape) == p["stages"][0]["feature_shape"] and manifest.dtype == dtype
    assert {s: manifest.splits[s].count for s in p["splits"]} == p["splits"]
    assert manifest.bytes == p["stages"][0]["cache_bytes"]  # to the byte (plan.py: with HDF5 2.0)
    text = format_plan(p)
    # A line per stage in the table and in the per-block list (where each block leaves the resolution);
    # 11 more: title, header, rule, the e2e and e2e+ckpt rows, 5 notes, the blocks' legend.
    assert "e2e" in text and "free at" in text and len(text.splitlines()) == 2 * len(p["stages"]) + 11
    cut = ",".join(str(s["blocks"]) for s in p["stages"])
    assert f"stages {cut}: cut by memory (--balance memory)" in text  # the chosen cut and why
    assert text.splitlines()[-1].startswith(f"  stage {len(p['stages']) - 1}: ")
