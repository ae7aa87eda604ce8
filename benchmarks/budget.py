"""Accuracy under a memory budget (benchmarks/accuracy.py --budget): at each tensor budget, the best test accuracy
that end to end, end to end with activation checkpointing and seqtrain reach on the same data.

    python -m benchmarks.accuracy --study --budget 32,64,128 --seeds 0 --threads 1   # resumable, hours
    python -m benchmarks.accuracy --study --budget 32,64,128 --report-only           # what the ledger holds

- End to end, with and without checkpointing: CIFAR ResNets of the depths --e2e-depths, each trained over its
  whole learning-rate schedule (--patience = --max-epochs: early stopping keeps the best epoch but cannot cut
  the cosine schedule short). Checkpointing changes no weight (tests/test_checkpoint.py: identical weights,
  BatchNorm buffers and losses), so end to end with checkpointing reaches, at a depth, the accuracy end to end
  reaches there: one run serves both, and the two differ only in which depths fit. A depth fits a budget when
  its training step's measured tensor peak is within it: end to end's from its own runs, with checkpointing
  from one epoch of `--stage e2e --checkpoint` per depth (recorded in the ledger as `...-e2e-ckpt-peak`),
  as seqtrain's stages are judged by their measured peaks. Until a depth is measured, `--plan`'s prediction
  stands in, and the table says "(plan)".
- seqtrain: --archs (default ResNet-56 and ResNet-110) with `--stages auto --memory-budget B`, with and without
  `--checkpoint`, one process per stage, the preset's early stopping. Each stage's measured tensor peak
  (MemTracker on a CPU, the CUDA allocator on a GPU) is checked against the budget. When the whole network fits
  in one checkpointed stage, `--stages auto` cuts nothing: that point is end to end with checkpointing of the
  same depth, already in its row, and is not run again.
- --long-e2e adds one end-to-end run per depth (seed 0) at twice the epochs: had the baseline converged?

The ledger (--ledger, default with --study: docs/study/budget) records every finished point; a rerun trains only
what it lacks. Output: OUT/budget.json, a table (markdown) and OUT/budget.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from benchmarks import accuracy
    from benchmarks.common import figure, save_figure
except ImportError:  # python benchmarks/accuracy.py: this folder is on sys.path
    import accuracy
    from common import figure, save_figure
from seqtrain.archs import num_blocks
from seqtrain.config import Config
from seqtrain.errors import UserError
from seqtrain.files import read_json, write_json
from seqtrain.job import resolve
from seqtrain.memory import device_description
from seqtrain.plan import plan
from seqtrain.rundir import RunDir

MB = 2**20
TARGET_SEEDS = 3  # the target compares 3-seed means: seqtrain's best >= end to end with checkpointing's best


def config(args: argparse.Namespace, arch: str, **values) -> Config:
    """The seqtrain configuration of a point, for --plan and the stage cut (no data is read)."""
    training = {name: getattr(args, name) for name in ("batch_size", "image_size", "optimizer", "head_pool")
                if getattr(args, name) is not None}
    return Config(arch=arch, width=args.width, dataset=args.dataset, data_dir=str(args.data_dir),
                  n_train=args.n_train, n_test=args.n_test, device=args.device,
                  **accuracy.downsampling(args.downsamples[0]), head=args.heads[0], **training, **values).validate()


def e2e_peaks(args: argparse.Namespace) -> dict[int, dict[str, float]]:
    """--plan's predicted training-step tensor peak (MB) of each end-to-end depth, without and with checkpointing."""
    out = {}
    for depth in args.e2e_depths:
        p = plan(config(args, f"resnet{depth}", stages="1"))
        out[depth] = {"e2e": p["e2e"]["train_bytes"] / MB, "e2e+ckpt": p["e2e_checkpoint"]["train_bytes"] / MB}
    return out


def checkpoint_peaks(args: argparse.Namespace) -> dict[int, float]:
    """End to end with checkpointing's measured training-step tensor peak (MB) at each --e2e-depths depth: one
    epoch of `--stage e2e --checkpoint` (every step after the first holds the same tensors), recorded in the
    ledger like a point. With --report-only, the depths the ledger holds."""
    settings = {"max_epochs": 1, "patience": 1}  # one epoch: its accuracy is not used, only its peak
    root = accuracy.runs_root(args, **settings)
    out = {}
    for depth in args.e2e_depths:
        point = {**base_point(args, f"resnet{depth}", 0), "method": "e2e", "stages": 1, "settings": settings,
                 "extra": ["--checkpoint"],
                 "run_dir": str(root / f"resnet{depth}-{args.downsamples[0]}{head_tag(args)}-e2e-ckpt-peak")}
        path = accuracy.record_path(args, point)
        if path is not None and path.exists():
            out[depth] = read_json(path)["peak_tensor_mb"]
            continue
        if args.report_only:
            continue
        with accuracy.claim(path) as mine:
            if path is not None and path.exists():  # recorded while this process waited for the claim
                out[depth] = read_json(path)["peak_tensor_mb"]
            elif mine:  # else another process is measuring it: --plan's figure stands in meanwhile
                out[depth] = measure_checkpoint_peak(args, point, path, root, depth)
    return out


def measure_checkpoint_peak(args: argparse.Namespace, point: dict, path: Path | None, root: Path, depth: int) -> float:
    """One epoch of `--stage e2e --checkpoint` for `point`: its measured peak (MB), recorded at `path` (ledger)."""
    run = RunDir(point["run_dir"])
    flags = ["--stage", "e2e", *accuracy.seqtrain_flags(args, point)]
    log = args.out / "logs" / f"{root.name}-{run.root.name}.log"
    accuracy.run_seqtrain(["--run-dir", str(run.root), *flags], log, args.threads)
    peak = accuracy.existing_results(run)["e2e_checkpoint"]["peak_tensor_mb"]
    print(f"  ResNet-{depth} e2e+ckpt: training step's tensor peak {peak} MB", file=sys.stderr, flush=True)
    if path is not None:
        command = ("python -m seqtrain.run " + " ".join(flags)).replace(f"{accuracy.ROOT}/", "")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {"arch": f"resnet{depth}", "peak_tensor_mb": peak, "command": command,
                          "device_name": device_description(args.device), "finished": time.strftime("%Y-%m-%d %H:%M")})
    return peak


def head_tag(args: argparse.Namespace) -> str:
    """The head in a point's name (its run directory and ledger record), as the sweep's points name it: a run
    with `--heads aug` is never served a record of conv heads."""
    return "" if args.heads[0] == "conv" else f"-{args.heads[0]}"


def base_point(args: argparse.Namespace, arch: str, seed: int) -> dict:
    return {"arch": arch, "blocks": num_blocks(arch, args.width), "downsample": args.downsamples[0],
            "head": args.heads[0], "convs": "usual", "swidth": "usual", "seed": seed, "stage_convs": "",
            "stage_width": "", "e2e": None}


def e2e_point(args: argparse.Namespace, depth: int, seed: int, epochs: int) -> dict:
    """End to end at its whole schedule of `epochs` (--patience = epochs), in the folder of those settings."""
    settings = {"max_epochs": epochs, "patience": epochs}
    root = accuracy.runs_root(args, **settings)
    return {**base_point(args, f"resnet{depth}", seed), "method": "e2e", "k": None, "stages": 1,
            "settings": settings, "epochs": epochs,
            "run_dir": str(root / f"resnet{depth}-{args.downsamples[0]}{head_tag(args)}-e2e-s{seed}")}


def seqtrain_points(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """seqtrain's points (arch x budget x checkpointing x seed), and the (arch, budget, checkpointing) whose
    auto cut is a single stage: end to end with checkpointing, not run as seqtrain."""
    root = accuracy.runs_root(args)
    out, single = [], []
    for arch in args.archs:  # the shallower network first: its points cost less
        for budget in args.budget:
            for ckpt in (False, True):
                layout = resolve(config(args, arch, stages="auto", memory_budget=f"{budget:g}MB", checkpoint=ckpt))
                spec = {"budget_mb": budget, "checkpoint": ckpt, "sizes": list(layout.sizes)}
                if layout.num_stages == 1:
                    single.append({"arch": arch, **spec})
                    continue
                name = f"{arch}-{args.downsamples[0]}{head_tag(args)}-b{budget:g}{'-ckpt' if ckpt else ''}"
                for seed in args.seeds:
                    out.append({**base_point(args, arch, seed), **spec, "method": "sequential",
                                "k": layout.num_stages, "stages": "auto",
                                "extra": ["--memory-budget", f"{budget:g}MB"] + (["--checkpoint"] if ckpt else []),
                                "run_dir": str(root / f"{name}-s{seed}")})
    return out, single


def budget_points(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """Every point to run: the end-to-end baselines first (cheapest first), then seqtrain's."""
    e2e = [e2e_point(args, d, s, args.max_epochs) for d in args.e2e_depths for s in args.seeds]
    if args.long_e2e:
        e2e += [e2e_point(args, d, 0, 2 * args.max_epochs) for d in args.e2e_depths]
    seq, single = seqtrain_points(args)
    return e2e + seq, single


def run_points(todo: list[dict], args: argparse.Namespace) -> list[dict]:
    """Run (or read from the ledger) every point in order, one at a time; --report-only reads the ledger only."""
    done = []
    for point in todo:
        record = accuracy.recorded(args, point)
        if record is None and not args.report_only:
            try:
                record = accuracy.run_point(point, args)
            except RuntimeError as e:
                sys.exit(f"benchmarks/accuracy.py: {e}")
        if record is not None:
            done.append({**record, **{k: point[k] for k in ("epochs", "budget_mb", "checkpoint", "sizes")
                                      if k in point}})
    return done


# --------------------------------------------------------------------------------------------------------
# Report


def stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "seeds": len(values)}


def e2e_rows(done: list[dict], peaks: dict, budget: float, args: argparse.Namespace,
             ckpt_mb: dict[int, float]) -> dict:
    """End to end and end to end with checkpointing under one budget: the deepest depth that fits and the most
    accurate one (mean over seeds) among the depths that fit and were measured.

    A depth fits when its measured peak is within the budget, as seqtrain's stages are judged: end to end's from
    its runs, with checkpointing's from `ckpt_mb` (checkpoint_peaks); --plan's prediction until then."""
    acc, measured_mb = {}, {}
    for d in done:
        if d["method"] == "e2e" and d.get("epochs") == args.max_epochs:
            depth = int(d["arch"][len("resnet"):])
            acc.setdefault(depth, []).append(d["results"]["e2e"]["test_acc"])
            measured_mb[depth] = max(measured_mb.get(depth, 0.0), d["results"]["e2e"]["peak_tensor_mb"])
    out = {}
    for way in ("e2e", "e2e+ckpt"):
        measured = measured_mb if way == "e2e" else ckpt_mb
        mb = {d: (measured[d], "measured") if d in measured else (round(peaks[d][way], 1), "plan")
              for d in args.e2e_depths}
        fit = [depth for depth in args.e2e_depths if mb[depth][0] <= budget]
        by_depth = {depth: stats(acc[depth]) for depth in fit if depth in acc}
        best = max(by_depth, key=lambda depth: by_depth[depth]["mean"], default=None)
        out[way] = {"deepest": max(fit, default=None), "peak_mb": {d: mb[d] for d in fit},
                    "best_depth": best, "test_acc": by_depth.get(best), "by_depth": by_depth,
                    "not_run": [depth for depth in fit if depth not in acc]}
    return out


def seqtrain_rows(done: list[dict], budget: float, args: argparse.Namespace, one_stage: list[dict]) -> list[dict]:
    """seqtrain's ways under `budget`, each arch with and without --checkpoint; a way not yet run is a row
    saying so (never left out), one whose cut is a single stage is end to end's row (`one_stage`)."""
    rows = []
    for arch in args.archs:
        for ckpt in (False, True):
            runs = [d for d in done if d["method"] == "sequential" and d["arch"] == arch
                    and d.get("budget_mb") == budget and d.get("checkpoint") == ckpt]
            if not runs:
                if not any(s["arch"] == arch and s["checkpoint"] == ckpt for s in one_stage):
                    rows.append({"arch": arch, "checkpoint": ckpt, "k": None, "fits": False, "test_acc": None,
                                 "not_run": True})
                continue
            peaks = [max(s["peak_tensor_mb"] for s in d["results"]["stages"]) for d in runs]
            rows.append({"arch": arch, "checkpoint": ckpt, "k": runs[0]["k"], "sizes": runs[0].get("sizes"),
                         "largest_stage_mb": round(max(peaks), 1), "fits": max(peaks) <= budget,
                         "test_acc": stats([d["results"]["final"]["test_acc"] for d in runs]),
                         "seconds": round(sum(accuracy.run_seconds(d["results"], "sequential") for d in runs), 1)})
    return rows


def summarize(done: list[dict], single: list[dict], peaks: dict, args: argparse.Namespace,
              ckpt_mb: dict[int, float] | None = None) -> list[dict]:
    """One entry per budget: e2e, e2e+ckpt, every seqtrain way, and the verdict against e2e+ckpt's best."""
    out = []
    for budget in args.budget:
        e2e = e2e_rows(done, peaks, budget, args, ckpt_mb or {})
        one_stage = [s for s in single if s["budget_mb"] == budget]
        seq = seqtrain_rows(done, budget, args, one_stage)
        fitting = [r for r in seq if r["fits"] and r["test_acc"]]
        # seqtrain's best among its ways with the target's seeds when one has them: a lucky single seed of
        # another way does not stand in for a 3-seed mean
        full = [r for r in fitting if r["test_acc"]["seeds"] >= TARGET_SEEDS]
        best = max(full or fitting, key=lambda r: r["test_acc"]["mean"], default=None)
        ckpt = e2e["e2e+ckpt"]
        ref = ckpt["test_acc"]  # the most accurate depth that fits, whatever its seeds: the stronger baseline
        verdict = None
        if best and ref:
            seeds = min(best["test_acc"]["seeds"], *(s["seeds"] for s in ckpt["by_depth"].values()))
            verdict = {"seqtrain_best": best["test_acc"]["mean"], "e2e_checkpoint_best": ref["mean"],
                       "gap_points": round(100 * (best["test_acc"]["mean"] - ref["mean"]), 2),
                       "met": best["test_acc"]["mean"] >= ref["mean"], "seeds": seeds,
                       # the target compares 3-seed means, and every depth that fits could be the baseline's
                       # best: fewer seeds anywhere, or a depth not run, is a first look, said as such
                       "final": seeds >= TARGET_SEEDS and not ckpt["not_run"]}
        out.append({"budget_mb": budget, **e2e, "seqtrain": seq, "verdict": verdict,
                    "one_stage": one_stage})
    return out


def pct(s: dict | None) -> str:
    if not s:
        return "not measured"
    if s["seeds"] == 1:
        return f"{100 * s['mean']:.2f}% (1 seed)"
    return f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}% ({s['seeds']} seeds)"


def table(rows: list[dict]) -> str:
    lines = ["| budget | way | network | largest stage MB | test acc |", "|---|---|---|---:|---:|"]
    for r in rows:
        b = f"{r['budget_mb']:g} MB"
        for way in ("e2e", "e2e+ckpt"):
            e = r[way]
            not_run = e.get("not_run") and f"; not run: {', '.join(f'ResNet-{d}' for d in e['not_run'])}"
            if e["best_depth"] is None:
                deepest = f"ResNet-{e['deepest']}" if e["deepest"] else "none"
                lines.append(f"| {b} | {way} | deepest that fits: {deepest}; none measured{not_run or ''} | | |")
                continue
            mb, source = e["peak_mb"][e["best_depth"]]
            lines.append(f"| {b} | {way} | ResNet-{e['best_depth']} (deepest that fits: ResNet-{e['deepest']}"
                         f"{not_run or ''}) | {mb} ({source}) | {pct(e['test_acc'])} |")
        for s in r["seqtrain"]:
            way = "seqtrain + `--checkpoint`" if s["checkpoint"] else "seqtrain"
            if s.get("not_run"):
                lines.append(f"| {b} | {way} | ResNet-{s['arch'][len('resnet'):]}: not run | | |")
                continue
            fits = "" if s["fits"] else " **over budget**"
            lines.append(f"| {b} | {way} | ResNet-{s['arch'][len('resnet'):]}, {s['k']} stages | "
                         f"{s['largest_stage_mb']} (measured){fits} | {pct(s['test_acc'])} |")
        for s in r["one_stage"]:
            same = "end to end with checkpointing" if s["checkpoint"] else "end to end"
            lines.append(f"| {b} | seqtrain{' + `--checkpoint`' if s['checkpoint'] else ''} | "
                         f"ResNet-{s['arch'][len('resnet'):]}: one stage, {same} (its row) | | |")
        if v := r["verdict"]:
            why = f"{v['seeds']} seed{'s' * (v['seeds'] > 1)}" if v["seeds"] < TARGET_SEEDS else "a depth not run"
            judged = ("met" if v["met"] else "**missed**") if v["final"] else \
                f"{'ahead' if v['met'] else 'behind'}, not yet judged ({why})"
            lines.append(f"| {b} | verdict | seqtrain's best - end to end + checkpointing's best | | "
                         f"{v['gap_points']:+.2f} points: {judged} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    fig, ax = figure()
    series = {
        "end to end (best depth that fits)": [(r["budget_mb"], r["e2e"]["test_acc"]) for r in rows],
        "end to end + checkpointing (best depth that fits)": [(r["budget_mb"], r["e2e+ckpt"]["test_acc"])
                                                              for r in rows],
    }
    for ckpt, name in ((False, "seqtrain (best arch)"), (True, "seqtrain + --checkpoint (best arch)")):
        pts = []
        for r in rows:
            ways = [s for s in r["seqtrain"] if s["checkpoint"] == ckpt and s["fits"] and s["test_acc"]]
            best = max(ways, key=lambda s: s["test_acc"]["mean"], default=None)
            pts.append((r["budget_mb"], best and best["test_acc"]))
        series[name] = pts
    for name, pts in series.items():
        pts = [(b, s) for b, s in pts if s]
        if pts:
            ax.errorbar([b for b, _ in pts], [100 * s["mean"] for _, s in pts],
                        yerr=[100 * s["std"] for _, s in pts], marker="o", capsize=3, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["budget_mb"] for r in rows], [f"{r['budget_mb']:g}" for r in rows])
    ax.set_xlabel("tensor memory budget, MB")
    save_figure(fig, ax, path, title, "test accuracy, %")


def main(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    try:  # a budget below a single block, a depth that is no CIFAR ResNet: the flag's one line
        peaks = e2e_peaks(args)
        todo, single = budget_points(args)
    except UserError as e:
        sys.exit(f"benchmarks/accuracy.py --budget: {e}")
    print(f"accuracy --budget: {len(todo)} points ({sum(accuracy.recorded(args, p) is not None for p in todo)} "
          f"recorded in {args.ledger}); logs in {args.out / 'logs'}", file=sys.stderr)
    try:  # first, as they take minutes, not hours: which depths end to end with checkpointing fits
        ckpt_mb = checkpoint_peaks(args)
    except RuntimeError as e:
        sys.exit(f"benchmarks/accuracy.py: {e}")
    done = run_points(todo, args)
    rows = summarize(done, single, peaks, args, ckpt_mb)
    summary = {"benchmark": "accuracy-budget", "torch": torch.__version__, "device": args.device,
               "device_name": accuracy.machines(done, args), "settings": accuracy.settings_line(args),
               "e2e_depths": args.e2e_depths, "archs": args.archs, "seeds": args.seeds,
               "e2e_checkpoint_measured_mb": ckpt_mb,
               "wall_s": round(time.perf_counter() - t0, 1),
               "verdicts": {r["budget_mb"]: r["verdict"] for r in rows},
               "long_e2e": [{"arch": d["arch"], "epochs": d["epochs"], "test_acc": d["results"]["e2e"]["test_acc"],
                             "best_epoch": d["results"]["e2e"]["best_epoch"]}
                            for d in done if d["method"] == "e2e" and d.get("epochs") != args.max_epochs]}
    write_json(args.out / "budget.json", {"summary": summary, "rows": rows})
    print(table(rows))
    plot(rows, args.out / "budget.png", f"Accuracy under a tensor memory budget\n{summary['settings']}\n"
         f"{summary['device_name']}, torch {torch.__version__}")
    print(json.dumps(summary))
