"""benchmarks/timing.py: the four ways to train run interleaved in fresh run directories, and each one's time is
split by where it went (a one-epoch smoke run: its times are not judged, only their accounting)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from seqtrain.files import read_json

from conftest import ROOT


def test_smoke_run_times_every_way_and_splits_the_time(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "timing.py"), "--rounds", "1", "--out", str(out),
                           "--also", "all, full-res head=--stage all --head-pool 0", "--head-pool", "4",
                           "--max-epochs", "1", "--n-train", "400", "--n-test", "100", "--width", "4",
                           "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["targets"]) == {"all / e2e+ckpt", "all / e2e"}
    assert all(t["target"] in ("<= 1.0", "<= 1.1") and isinstance(t["met"], bool) and isinstance(t["judged"], bool)
               for t in summary["targets"].values())
    result = read_json(out / "timing.json")
    ways = result["ways"]
    assert set(ways) == {"all", "all+ckpt", "e2e", "e2e+ckpt", "all, full-res head"}
    for way in ("all", "all+ckpt", "all, full-res head"):  # every stage, then the final network's accuracy
        stages = ways[way]["parts"][:-1]
        assert [p["part"] for p in stages] == [f"stage {k}" for k in range(4)] and ways[way]["parts"][-1]["test_acc"]
        assert all(p["cache_s"] > 0 and 0 <= p["loader_wait_s"] < p["epochs_s"] for p in stages)
        assert all(0 < p["validation_s"] < p["epochs_s"] for p in stages)
    assert [p["part"] for p in ways["e2e+ckpt"]["parts"]] == ["e2e+ckpt"] and ways["e2e"]["parts"][0]["cache_s"] == 0
    # Each way ran in its own fresh run directory with the flags given: the extra way's override the common ones.
    assert (out / "timing.log").read_text().count("$ ") == 5
    assert [read_json(out / "runs" / f"round0-{i}" / "config.json")["head_pool"] for i in range(5)] == [4, 4, 4, 4, 0]
    epoch = json.loads((out / "runs" / "round0-0" / "stage_01" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["loader_wait_seconds"] >= 0 and epoch["val_seconds"] > 0  # what the split is read from
    assert [h["stage"] for h in result["heads"]] == [0, 1, 2, 3]
    assert all(0 < h["head_share"] < 1 for h in result["heads"])
    assert "head's share of a training step" in proc.stdout


def test_a_target_is_not_judged_on_wall_clocks_another_job_slowed():
    from benchmarks import timing

    def way(wall, wait):
        return [{"wall_s": wall, "cpu_wait_share": wait}]

    runs = {"all": way(100.0, 0.01), "all+ckpt": way(130.0, 0.02), "e2e": way(80.0, 0.30), "e2e+ckpt": way(120.0, None)}
    summary = {name: {"wall_s": r[0]["wall_s"]} for name, r in runs.items()}
    targets = timing.judge(runs, summary)
    # all / e2e+ckpt: 0.833, both ways ran alone (no PSI reading counts as no evidence of contention).
    assert targets["all / e2e+ckpt"] == {"value": 0.833, "target": "<= 1.0", "met": True, "cpu_wait": 0.01,
                                         "judged": True}
    # all / e2e: the ratio is still reported, missed, but e2e waited 30% of its time for a CPU: not judged.
    assert targets["all / e2e"]["met"] is False and targets["all / e2e"]["judged"] is False


def test_an_extra_way_cannot_replace_one_of_the_four(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "timing.py"), "--out", str(tmp_path),
                           "--also", "e2e=--stage e2e --head-pool 0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "'e2e' is one of the four ways" in proc.stderr and not (tmp_path / "runs").exists()


def test_ways_runs_a_subset_and_judges_only_the_targets_it_measured(tmp_path):
    from benchmarks import timing

    runs = {"all": [{"wall_s": 105.0, "cpu_wait_share": 0.01}], "e2e": [{"wall_s": 100.0, "cpu_wait_share": 0.02}]}
    targets = timing.judge(runs, {name: {"wall_s": r[0]["wall_s"]} for name, r in runs.items()})
    assert list(targets) == ["all / e2e"] and targets["all / e2e"]["met"] is True
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "timing.py"), "--out", str(tmp_path),
                           "--ways", "all,e2e2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "choose among all, all+ckpt, e2e, e2e+ckpt" in proc.stderr
    assert not (tmp_path / "runs").exists()
