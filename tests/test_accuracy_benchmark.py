"""benchmarks/accuracy.py: a smoke run on the tiniest configuration gives a well-formed summary (its numbers
are not checked: a one-epoch run learns nothing), a rerun reuses every run directory, and the sweep and the
target check follow their definitions."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import accuracy, accuracy_report
from seqtrain.config import Config
from seqtrain.files import read_json, write_json

from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "accuracy.py"
TINY = ["--archs", "resnet20", "--ks", "2", "--seeds", "0", "--n-train", "400",
        "--n-test", "100", "--width", "4", "--max-epochs", "1"]


def bench(out, data, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    # One thread per run: a machine busy with other jobs stalls two-threaded runs at every OpenMP barrier.
    proc = subprocess.run([sys.executable, str(SCRIPT), *extra, *TINY, "--threads", "1", "--out", str(out),
                           "--data-dir", str(data)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_smoke_run_summary_and_reuse(tmp_path):
    out, ledger = tmp_path / "out", tmp_path / "ledger"
    proc, summary = bench(out, tmp_path / "data", "--downsamples", "standard", "--ledger", str(ledger), "--probe")
    assert summary["torch"] == torch.__version__ and summary["device"] == "cpu" and summary["device_name"]
    assert summary["config"]["archs"] == ["resnet20"] and summary["config"]["ks"] == [2]
    assert summary["target"]["measured"] is False and summary["target"]["arch"] == "resnet32"
    assert "target (resnet32, K=4, accelerated): not measured" in proc.stdout
    rows = {(r["method"], r["k"]): r for r in summary["rows"]}
    assert set(rows) == {("e2e", None), ("sequential", 2)}
    seq, e2e = rows[("sequential", 2)], rows[("e2e", None)]
    assert seq["gap_points"][0] == pytest.approx(100 * (seq["test_acc"][0] - e2e["test_acc"][0]))
    assert e2e["gap_points"] == [0, 0]
    saved = read_json(out / "results.json")
    assert saved["summary"] == summary and len(saved["rows"]) == 2
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    logs = {p.name: p.read_text() for p in (out / "logs").glob("*.log")}
    assert len(logs) == 2 and sum(text.count("$ python -m seqtrain.run") for text in logs.values()) == 4
    # Every finished point is recorded with its command and its probes: the e2e network cut as K = 2 cuts it.
    records = {p.stem: read_json(p) for p in ledger.glob("*/*.json")}
    assert sorted(records) == ["resnet20-standard-e2e-s0", "resnet20-standard-k2-s0"]
    seq, e2e = records["resnet20-standard-k2-s0"], records["resnet20-standard-e2e-s0"]
    assert seq["command"].startswith("python -m seqtrain.run --arch resnet20") and "--stages 2" in seq["command"]
    assert [s["depth"] for s in seq["probe"]["own"]] == [s["depth"] for s in e2e["probe"]["k2"]] and e2e["val_curve"]
    assert seq["results"]["final"]["test_acc"] == rows[("sequential", 2)]["test_acc"][0]

    # A rerun trains nothing: from the run directories, and from the ledger once they are gone.
    _, again = bench(out, tmp_path / "data", "--downsamples", "standard", "--ledger", str(ledger))
    assert {p.name: p.read_text() for p in (out / "logs").glob("*.log")} == logs
    shutil.rmtree(out / "runs")
    _, recalled = bench(out, tmp_path / "data", "--downsamples", "standard", "--ledger", str(ledger), "--report-only")
    assert {p.name: p.read_text() for p in (out / "logs").glob("*.log")} == logs
    assert recalled["rows"] == again["rows"]
    # The same runs read again; only mem ratio moves, with the baseline process measured afresh.
    assert [(r["test_acc"], r["gap_points"]) for r in again["rows"]] == [(r["test_acc"], r["gap_points"])
                                                                          for r in summary["rows"]]


@pytest.mark.slow
def test_quick_preset_smoke_run_in_one_process_per_run(tmp_path):
    out = tmp_path / "out"
    # The quick preset's training at TINY's sizes, with the aug head and space-to-depth reductions.
    proc, summary = bench(out, tmp_path / "data", "--quick", "--heads", "aug", "--downsamples",
                          "accelerated+space-to-depth")
    config = summary["config"]
    assert config["preset"] == "quick" and config["optimizer"] == "adamw" and config["one_process"] is True
    assert config["n_train"] == 400 and config["max_epochs"] == 1  # flags override the preset
    assert proc.stdout.startswith("quick preset: synthetic (400 train")
    assert "--one-process" in proc.stdout and {(r["method"], r["k"]) for r in summary["rows"]} == {
        ("e2e", None), ("sequential", 2)}
    commands = [line for p in (out / "logs").glob("*.log") for line in p.read_text().splitlines()
                if line.startswith("$ python -m seqtrain.run")]
    assert sorted(c.split()[5] for c in commands) == ["all", "e2e"]  # one process per run, not per stage
    assert all("--optimizer adamw" in c and "--patience 5" in c for c in commands)
    assert all("--head aug" in c and "--downsample-op space-to-depth" in c for c in commands)


# --------------------------------------------------------------------------------------------------------
# The sweep's definitions, without training


def test_points_skip_k_beyond_the_depth_and_run_e2e_once(tmp_path):
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
def test_target_check(gap, ratio, met):
    row = {"method": "sequential", "arch": "resnet32", "k": 4, "downsample": "accelerated", "gap_points": (gap, 0.1),
           "mem_ratio": (ratio, 0.01), "analytic_ratio": 0.25, "seeds": [0, 1]}
    other = {**row, "k": 2, "gap_points": (-50.0, 0.0)}
    target = accuracy.target_check([other, row])
    assert target["measured"] and target["met"] is met and target["gap_points"] == gap
    assert accuracy.target_check([other])["measured"] is False


def test_study_target_reports_the_most_accurate_setting_within_the_memory_ratio_against_the_best_e2e():
    def row(downsample, head, acc, gap, ratio, method="sequential"):
        return {"method": method, "arch": "resnet56", "k": 8 if method == "sequential" else None,
                "downsample": downsample, "head": head, "intensity": "usual" if head == "conv" else f"head {head}",
                "test_acc": (acc, 0.01), "gap_points": (gap, 0.2), "mem_ratio": (ratio, 0.0), "analytic_ratio": ratio,
                "seeds": [0, 1, 2]}
    e2e = [row("standard", "conv", 0.90, 0.0, 1.0, "e2e"), row("accelerated", "conv", 0.60, 0.0, 1.0, "e2e")]
    rows = e2e + [row("standard", "conv", 0.87, -3.0, 0.25), row("standard", "aug", 0.895, -0.5, 0.28),
                  row("accelerated", "conv", 0.75, +15.0, 0.2),  # far above its own poor e2e, not the best
                  row("standard", "conv", 0.95, 5.0, 0.35), {**row("standard", "conv", 0.99, 5.0, 0.1), "k": 4}]
    target = accuracy.target_check(rows, target=accuracy.STUDY_TARGET)
    assert (target["downsample"], target["head"], target["gap_to_best_e2e"]) == ("standard", "aug", -0.5)
    assert target["met"] and target["gap_points"] == -0.5
    target = accuracy.target_check([r for r in rows if r.get("head") != "aug"], target=accuracy.STUDY_TARGET)
    assert (target["downsample"], target["gap_to_best_e2e"], target["met"], target["mem_met"]) == \
        ("standard", -3.0, False, True)
    line = accuracy_report.target_line(target)
    assert "resnet56, K=8, standard, conv head, 3 seed(s)): test acc 87.00% against the best e2e's 90.00%" in line
    assert "-3.00 points (>= -1.0: MISSED; -3.00 ± 0.20 to its own e2e)" in line


def test_quick_preset_is_the_issues_sweep_with_its_training_settings(tmp_path):
    args = accuracy.parse_args(["--quick", "--out", str(tmp_path)])
    todo = accuracy.points(args)
    assert args.archs == ["resnet20", "resnet32", "resnet56", "resnet18"] and args.ks == [2, 4, 8]
    assert len(todo) == 4 * 2 * 3 * (1 + 3) and args.one_process and args.jobs == 2  # every depth allows K = 8
    flags = accuracy.seqtrain_flags(args, todo[0])
    for name in ("--batch-size", "--lr", "--warmup-epochs", "--patience", "--width", "--n-train", "--max-epochs"):
        assert name in flags
    assert "quick preset" in accuracy.settings_line(args) and "--patience" in accuracy.settings_line(args)
    full = accuracy.parse_args(["--out", str(tmp_path)])  # the full preset leaves training to seqtrain's defaults
    assert not {"--batch-size", "--lr", "--patience"} & set(accuracy.seqtrain_flags(full, accuracy.points(full)[0]))
    assert not full.one_process


def test_help_names_seqtrains_own_defaults(capsys):
    # The flags left to seqtrain say what seqtrain would use; the help once said patience 3 after it became 5.
    with pytest.raises(SystemExit):
        accuracy.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help at any space
    seq = Config()
    for phrase in (f"seqtrain's {seq.patience}, --quick 5, --study 6", f"seqtrain's {seq.batch_size}",
                   f"seqtrain's {seq.lr}", f"seqtrain's {seq.optimizer}"):
        assert phrase in text, phrase


def test_report_names_the_machines_the_ledger_recorded(tmp_path):
    # --report-only draws points measured elsewhere: the plot's title must name their machines, not this one.
    args = accuracy.parse_args(["--out", str(tmp_path), "--device", "cpu"])
    here = accuracy.device_description("cpu")
    assert accuracy.machines([{"device_name": "AMD EPYC"}] * 2, args) == "AMD EPYC"
    assert accuracy.machines([{"device_name": "AMD EPYC"}] * 2 + [{"device_name": "Xeon"}], args) == (
        "AMD EPYC: 2 points; Xeon: 1 point")
    assert accuracy.machines([{}], args) == accuracy.machines([], args) == here  # run now, on this machine


def test_intensity_axis_pads_lists_and_compares_with_the_same_network_end_to_end(tmp_path, monkeypatch):
    args = accuracy.parse_args(["--archs", "resnet20", "--ks", "2,4", "--seeds", "0", "--downsamples", "standard",
                                "--stage-convs", "usual", "1,2,2", "--out", str(tmp_path)])
    todo = accuracy.points(args)
    usual = [p for p in todo if p["convs"] == "usual"]
    assert [(p["method"], p["k"], p["stages"]) for p in usual] == [("e2e", None, 1), ("sequential", 2, 2),
                                                                    ("sequential", 4, 4)]
    varied = [p for p in todo if p["convs"] != "usual"]  # K = 2 is shorter than the list: skipped
    assert [(p["method"], p["k"], p["stage_convs"]) for p in varied] == [("e2e", 4, "1,2,2,2"),
                                                                         ("sequential", 4, "1,2,2,2")]
    for p in varied:
        flags = accuracy.seqtrain_flags(args, p)
        assert flags[flags.index("--stage-convs") + 1] == "1,2,2,2" and flags[flags.index("--stages") + 1] == "4"
    assert "--stage-convs" not in accuracy.seqtrain_flags(args, usual[1])
    assert len({p["run_dir"] for p in todo}) == len(todo)

    # Each sequential point is compared with the e2e run of its own network and seed.
    def result(p, acc):
        if p["method"] == "e2e":
            return {"e2e": {"test_acc": acc, "peak_tensor_mb": 200.0, "train_seconds": 1.0}}
        return {"final": {"test_acc": acc}, "stages": [{"peak_tensor_mb": 100.0,
                                                        "train_seconds": 1.0, "cache_seconds": 0.5}]}

    accs = {("e2e", None): 0.5, ("sequential", 2): 0.45, ("sequential", 4): 0.4, ("e2e", 4): 0.6}
    done = [{**p, "results": result(p, accs[(p["method"], p["k"])] + (p["convs"] != "usual") * 0.01)} for p in todo]
    monkeypatch.setattr(accuracy, "analytic_ratio", lambda args, point: 0.5)  # plan() is tested elsewhere
    rows = {(r["intensity"], r["method"], r["k"]): r for r in accuracy.summarize(done, args)}
    assert rows[("usual", "sequential", 4)]["gap_points"][0] == pytest.approx(-10.0)
    assert rows[("convs 1,2,2", "sequential", 4)]["gap_points"][0] == pytest.approx(-20.0)
    assert rows[("convs 1,2,2", "sequential", 4)]["mem_ratio"][0] == pytest.approx(100 / 200)
    text = accuracy_report.table(list(rows.values()), "cpu", one_process=True)
    assert "intensity" in text and "convs 1,2,2" in text and "--one-process" in text


def test_heads_and_downsampling_ops_are_axes_with_their_own_e2e(tmp_path):
    args = accuracy.parse_args(["--archs", "resnet20", "--ks", "4", "--seeds", "0", "--heads", "conv,aug",
                                "--downsamples", "standard,accelerated+space-to-depth", "--out", str(tmp_path)])
    todo = accuracy.points(args)
    # 2 downsamplings x 2 heads, each with its own e2e network (the last head, the reduction op differ).
    assert len(todo) == 2 * 2 * 2 and len({p["run_dir"] for p in todo}) == len(todo)
    e2e = {accuracy.e2e_key(p) for p in todo if p["method"] == "e2e"}
    assert all(accuracy.e2e_key({**p, "e2e": None}) in e2e for p in todo)
    flags = accuracy.seqtrain_flags(args, next(p for p in todo if p["head"] == "aug" and "+" in p["downsample"]))
    assert flags[flags.index("--downsample") + 1] == "accelerated"
    assert flags[flags.index("--downsample-op") + 1] == "space-to-depth" and flags[flags.index("--head") + 1] == "aug"
    assert accuracy.intensity(todo[-1]) in ("usual", "head aug")


def test_budget_mode_points_run_e2e_whole_schedules_and_seqtrain_cut_for_each_budget(tmp_path):
    from benchmarks import budget

    args = accuracy.parse_args(["--study", "--budget", "32,64", "--seeds", "0,1", "--e2e-depths", "8,20",
                                "--out", str(tmp_path), "--device", "cpu"])
    assert args.archs == ["resnet56", "resnet110"] and args.downsamples == ["standard"] and args.probe is False
    assert args.ledger == ROOT / "docs" / "study" / "budget"
    todo, single = budget.budget_points(args)
    e2e = [p for p in todo if p["method"] == "e2e"]
    assert [(p["arch"], p["seed"]) for p in e2e] == [("resnet8", 0), ("resnet8", 1), ("resnet20", 0), ("resnet20", 1)]
    # End to end runs its whole cosine schedule: early stopping may keep the best epoch, never cut it short.
    assert all("--patience 30" in " ".join(accuracy.seqtrain_flags(args, p)) for p in e2e)
    seq = {(p["arch"], p["budget_mb"], p["checkpoint"], p["seed"]): p for p in todo if p["method"] == "sequential"}
    flags = " ".join(accuracy.seqtrain_flags(args, seq[("resnet56", 32, True, 0)]))
    assert "--stages auto" in flags and "--memory-budget 32MB --checkpoint" in flags and "--patience 6" in flags
    # Checkpointing lets the cut take fewer stages; where one stage fits, seqtrain is end to end with it.
    assert seq[("resnet56", 32, True, 0)]["k"] < seq[("resnet56", 32, False, 0)]["k"]
    assert {"arch": "resnet56", "budget_mb": 64, "checkpoint": True, "sizes": [28]} in single
    assert ("resnet56", 64, True, 0) not in seq


def test_budget_report_compares_the_best_that_fits(tmp_path):
    from benchmarks import budget

    args = accuracy.parse_args(["--study", "--budget", "32", "--seeds", "0", "--e2e-depths", "8,20,32",
                                "--archs", "resnet56", "--out", str(tmp_path), "--device", "cpu"])
    peaks = {8: {"e2e": 26.0, "e2e+ckpt": 18.0}, 20: {"e2e": 57.0, "e2e+ckpt": 24.0},
             32: {"e2e": 87.0, "e2e+ckpt": 31.0}}

    def e2e(depth, acc, epochs=30, peak=None):  # peak: the tensor peak the run measured, MB
        return {"method": "e2e", "arch": f"resnet{depth}", "epochs": epochs,
                "results": {"e2e": {"test_acc": acc, "peak_tensor_mb": peak or peaks[depth]["e2e"]}}}

    def seq(ckpt, acc, peak):
        return {"method": "sequential", "arch": "resnet56", "budget_mb": 32, "checkpoint": ckpt, "k": 3,
                "sizes": [6, 7, 15], "results": {"final": {"test_acc": acc}, "stages": [
                    {"peak_tensor_mb": peak, "train_seconds": 1.0, "cache_seconds": 1.0}]}}

    done = [e2e(8, 0.83, peak=33.0), e2e(20, 0.885), e2e(32, 0.847), e2e(20, 0.95, epochs=60),
            seq(False, 0.95, 40.0), seq(True, 0.90, 25.0)]
    [row] = budget.summarize(done, [], peaks, args)
    # End to end is judged by the peak its run measured, as seqtrain's stages are: ResNet-8 measured over 32 MB.
    assert (row["e2e"]["deepest"], row["e2e"]["best_depth"]) == (None, None)
    # With checkpointing ResNet-32 fits, but ResNet-20 is the more accurate: the best that fits is compared.
    assert (row["e2e+ckpt"]["deepest"], row["e2e+ckpt"]["best_depth"]) == (32, 20)
    assert row["e2e+ckpt"]["test_acc"]["mean"] == 0.885  # the run at twice the epochs is not a baseline point
    # A seqtrain run whose measured stage went over the budget does not count, however accurate.
    assert [r["fits"] for r in row["seqtrain"]] == [False, True]
    assert row["verdict"]["seqtrain_best"] == 0.90 and row["verdict"]["met"] is True
    assert "**over budget**" in budget.table([row]) and "| 32 MB | e2e | deepest that fits: none" in budget.table([row])
    # One seed a side is a first look, not the 3-seed verdict the target asks for: the table says which.
    assert row["verdict"]["final"] is False and "+1.50 points: ahead, not yet judged (1 seed)" in budget.table([row])
    three = [{**d, "seed": s} for d in done for s in range(3)]
    assert budget.summarize(three, [], peaks, args)[0]["verdict"]["final"] is True
    # seqtrain's 3-seed way is judged, not a more accurate single seed of another way.
    lucky = [d for d in three if d["method"] == "e2e"] + [seq(True, 0.89, 25.0)] * 3 + [seq(False, 0.95, 30.0)]
    [row] = budget.summarize(lucky, [], peaks, args)
    assert row["verdict"]["seqtrain_best"] == 0.89 and row["verdict"]["final"] is True
    # A depth that fits but has no run is named, never silently left out of "the best that fits".
    [row] = budget.summarize([d for d in done if d["arch"] != "resnet32"], [], peaks, args)
    assert row["e2e+ckpt"]["not_run"] == [32] and "not run: ResNet-32" in budget.table([row])
    # So is a seqtrain way not yet run.
    [row] = budget.summarize([d for d in done if not d.get("checkpoint")], [], peaks, args)
    assert "| 32 MB | seqtrain + `--checkpoint` | ResNet-56: not run | | |" in budget.table([row])


def test_budget_points_of_another_head_are_named_apart(tmp_path):
    from benchmarks import budget

    common = ["--study", "--budget", "32", "--seeds", "0", "--e2e-depths", "8", "--archs", "resnet56",
              "--out", str(tmp_path), "--device", "cpu"]
    conv, aug = (budget.budget_points(accuracy.parse_args(common + extra))[0] for extra in ([], ["--heads", "aug"]))
    # The ledger knows a point by its run directory's name: a run with --heads aug is never served conv's record.
    assert [p["head"] for p in aug] == ["aug"] * len(aug)
    assert not {Path(p["run_dir"]).name for p in conv} & {Path(p["run_dir"]).name for p in aug}


def test_a_changed_seqtrain_default_is_never_served_an_old_record(tmp_path, monkeypatch):
    budget_args = ["--study", "--budget", "32", "--seeds", "0", "--e2e-depths", "8", "--archs", "resnet56",
                   "--out", str(tmp_path), "--device", "cpu"]
    args = accuracy.parse_args(budget_args)
    before = accuracy.runs_root(args)

    @dataclasses.dataclass
    class NewDefault(Config):  # a later seqtrain holding out more images for early stopping
        val_fraction: float = 0.2

    monkeypatch.setattr(accuracy, "Config", NewDefault)
    # The ledger files a record under its folder's name: a default no flag sets names a new one, so the
    # points run again instead of being served records made with the old default.
    assert accuracy.runs_root(args) != before
    monkeypatch.undo()
    # The study's sweep was measured with full-resolution heads and passes them; the budget mode uses
    # seqtrain's default heads, and the two are filed apart.
    sweep = accuracy.parse_args(["--study", "--archs", "resnet20", "--ks", "4", "--seeds", "0",
                                 "--out", str(tmp_path), "--device", "cpu"])
    assert (sweep.head_pool, args.head_pool) == (0, Config().head_pool)
    point = next(p for p in accuracy.points(sweep) if p["method"] == "sequential")
    assert "--head-pool 0" in " ".join(accuracy.seqtrain_flags(sweep, point))
    assert accuracy.runs_root(sweep) != before


def test_commands_sharing_a_ledger_never_train_the_same_point_twice(tmp_path, capsys):
    args = accuracy.parse_args([*TINY, "--ledger", str(tmp_path / "ledger"), "--out", str(tmp_path / "out"),
                                "--device", "cpu"])
    point = accuracy.points(args)[0]
    record = accuracy.record_path(args, point)
    with accuracy.claim(record) as mine:  # another command has started training the point
        assert mine
        assert accuracy.run_point(point, args) is None
        assert "another process is training it" in capsys.readouterr().err
        assert not Path(point["run_dir"]).exists()  # nothing was started
        write_json(record, {"method": point["method"], "results": {"e2e": {"test_acc": 0.5}}})
    # Once it is recorded, every command is served the record; the claim leaves no file behind.
    assert accuracy.run_point(point, args)["results"]["e2e"]["test_acc"] == 0.5
    assert [f.name for f in record.parent.iterdir()] == [record.name]


def test_end_to_end_with_checkpointing_fits_by_its_measured_peak(tmp_path):
    from benchmarks import budget

    argv = ["--budget", "64", "--e2e-depths", "8", "--archs", "resnet8", "--seeds", "0", "--n-train", "256",
            "--n-test", "64", "--width", "4", "--batch-size", "32", "--max-epochs", "2", "--image-size", "16",
            "--device", "cpu", "--threads", "1", "--ledger", str(tmp_path / "ledger"), "--out", str(tmp_path / "out"),
            "--data-dir", str(tmp_path / "data")]
    args = accuracy.parse_args(argv)
    [(depth, mb)] = budget.checkpoint_peaks(args).items()
    assert depth == 8 and 0 < mb < 64
    [record] = (tmp_path / "ledger").glob("*/resnet8-standard-e2e-ckpt-peak.json")
    assert read_json(record)["peak_tensor_mb"] == mb and "--stage e2e" in read_json(record)["command"]
    assert "--checkpoint" in read_json(record)["command"]
    # Recorded: a report reads it back with nothing left to run, and it, not --plan, decides what fits.
    shutil.rmtree(tmp_path / "out")
    assert budget.checkpoint_peaks(accuracy.parse_args(argv + ["--report-only"])) == {8: mb}
    peaks = {8: {"e2e": 1000.0, "e2e+ckpt": 1000.0}}  # a --plan that would fit nothing
    [row] = budget.summarize([], [], peaks, args, {8: mb})
    assert row["e2e+ckpt"]["deepest"] == 8 and row["e2e+ckpt"]["peak_mb"][8] == (mb, "measured")
    assert row["e2e"]["deepest"] is None
