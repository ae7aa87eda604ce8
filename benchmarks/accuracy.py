"""Test accuracy of layer-wise (sequential) training against end to end, across depth, the number of stages K
and the downsampling schedule: the claim of Ma, Yu, Li, Wang (2020) that layer-wise learning degrades on deep
networks and that accelerated downsampling (models.schedule) recovers it, at a fraction of e2e's memory.

Run from the repository root:

    .venv/bin/python benchmarks/accuracy.py --quick     # ResNet-20/32, K 2,4, 3 seeds, 2,000 images: 2 CPU cores
    .venv/bin/python benchmarks/accuracy.py             # ResNet-20/32/56/18, K 2,4,8, 3 seeds, default data: a GPU
    .venv/bin/python benchmarks/accuracy.py --dataset cifar10 --data-dir data   # any seqtrain dataset
    .venv/bin/python benchmarks/accuracy.py --archs resnet20 --ks 2 --seeds 0 --n-train 400 --n-test 100 \
        --width 4 --max-epochs 1                        # a smoke test, well under a minute

Every point runs the real pipeline, `python -m seqtrain.run`, in fresh processes (the package's own code
path, nothing re-implemented): a sequential point runs `--stage k` for each stage in its own process (so each
stage's peak memory is its own) and then `--stage all`, which assembles the final network and evaluates it on
the raw test images; e2e does not depend on K, so it runs once per (arch, downsample, seed) with `--stages 1`
in its own run directory. Run directories live under OUT/runs/SETTINGS-HASH/ and complete stages are reused:
a rerun trains only what is missing, and changing a setting starts new directories.

Reported per (arch, downsample, K, method), mean and std over seeds:
  test acc      the final network's (sequential) or the e2e network's accuracy on the test split
  gap           sequential minus e2e test accuracy of the same arch, downsample and seed, in points
  peak MB       the largest stage's peak memory (its training or its caching pass, as run.py's table), and
                e2e's: on CUDA the allocator's peak; on a CPU the process's peak resident set, which includes
                about 0.7 GB of torch itself (printed as measured)
  mem ratio     largest stage / e2e. On a CPU both peaks first lose BASE, the resident set of a fresh process
                after importing seqtrain.pipeline (torch, h5py) and one tiny conv training step (torch maps
                its CPU kernels at first use), measured once at the start; on CUDA no subtraction. Beside
                it the analytic ratio of seqtrain.plan (bytes held by a training step, device-independent).
The target (issue "Layer-wise scaling study"): ResNet-32, K = 4, accelerated downsampling within 1 point of
e2e, with mem ratio <= 0.3. It is printed, met or missed, whenever that point was run.
Output: a table, OUT/results.json, OUT/accuracy.png (accuracy against depth and K) and, last, a JSON line
(wall_s beside cpu_s, the CPU seconds of all runs: on a busy machine wall_s grows, cpu_s does not).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from seqtrain.config import Config  # noqa: E402
from seqtrain.data import load_raw  # noqa: E402
from seqtrain.errors import UserError  # noqa: E402
from seqtrain.files import read_json, sha256_json, write_json  # noqa: E402
from seqtrain.memory import device_description  # noqa: E402
from seqtrain.models import num_blocks  # noqa: E402
from seqtrain.pipeline import RunDir, collect_results, resolve_device, stage_manifest  # noqa: E402
from seqtrain.plan import aligned, plan  # noqa: E402

PRESETS = {
    # For a GPU: every depth of the issue at the default dataset size and epoch cap.
    "full": {"archs": "resnet20,resnet32,resnet56,resnet18", "ks": "2,4,8", "seeds": "0,1,2", "n_train": 10_000,
             "n_test": 2_000, "width": 0, "max_epochs": 12, "batch_size": 128, "jobs": 1},
    # 2 CPU cores, 20 minutes. Measured here at 3,000 images: the ResNet-20 slice of one seed (6 runs) took
    # 237 CPU-s, ResNet-32 costs about 1.6x, so 3 seeds need 2,000 images to fit with a margin; width 8
    # (a ResNet-20 e2e at 3,000 images: 38 s, 62% test accuracy in 8 epochs; width 16: 94 s, 76%). Two
    # single-threaded jobs side by side, because a two-threaded process stalls at every OpenMP barrier when
    # other work shares the cores (0.7 s a step against 0.25 s single-threaded, measured here). Batch 32:
    # at 128, 8 epochs of 1,800 images are 112 SGD steps, too few for e2e (ResNet-32 seed 0 stayed at
    # chance, 10.7%; at batch 32 it reached 50.9% in less time, measured here).
    "quick": {"archs": "resnet20,resnet32", "ks": "2,4", "seeds": "0,1,2", "n_train": 2_000, "n_test": 1_000,
              "width": 8, "max_epochs": 8, "batch_size": 32, "jobs": 2},
}
TARGET = {"arch": "resnet32", "k": 4, "downsample": "accelerated", "max_gap_points": 1.0, "max_mem_ratio": 0.3}


# --------------------------------------------------------------------------------------------------------
# One point: a sequential run (arch, downsample, K, seed) or an e2e run (arch, downsample, seed)


def seqtrain_flags(args: argparse.Namespace, arch: str, downsample: str, seed: int) -> list[str]:
    """The flags that define a point, apart from --stages and --run-dir."""
    return ["--arch", arch, "--downsample", downsample, "--seed", str(seed), "--dataset", args.dataset,
            "--data-dir", str(args.data_dir), "--n-train", str(args.n_train), "--n-test", str(args.n_test),
            "--width", str(args.width), "--max-epochs", str(args.max_epochs), "--batch-size", str(args.batch_size),
            "--device", args.device]


def run_seqtrain(flags: list[str], log: Path, threads: int | None) -> None:
    """One `python -m seqtrain.run` process; its output is appended to `log`, whose tail is shown on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with open(log, "a") as f:
        f.write(f"$ python -m seqtrain.run {' '.join(flags)}\n")
        f.flush()
        code = subprocess.run([sys.executable, "-m", "seqtrain.run", *flags], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT).returncode
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"python -m seqtrain.run {' '.join(flags)} exited {code}; end of {log}:\n{tail}")


def run_point(point: dict, args: argparse.Namespace) -> dict:
    """Train one point, reusing whatever of it is complete; returns its results as seqtrain reports them."""
    run, t0 = RunDir(point["run_dir"]), time.perf_counter()
    flags = ["--run-dir", str(run.root), "--stages", str(point["k"] or 1),
             *seqtrain_flags(args, point["arch"], point["downsample"], point["seed"])]
    log = args.out / "logs" / f"{run.root.parent.name}-{run.root.name}.log"
    results = existing_results(run)
    if point["method"] == "e2e" and not (results and results["e2e"]):
        run_seqtrain(["--stage", "e2e", *flags], log, args.threads)
    if point["method"] == "sequential" and not (results and results["final"]):
        for k in range(point["k"]):  # one process per stage: its peak memory is its own
            if not (run.config.exists() and stage_manifest(load_config(run), run, k)[0]):
                run_seqtrain(["--stage", str(k), *flags], log, args.threads)
        run_seqtrain(["--stage", "all", *flags], log, args.threads)  # assembles and evaluates the final network
    results = existing_results(run)
    assert results and results["e2e" if point["method"] == "e2e" else "final"], f"{run.root} has no results"
    seconds = time.perf_counter() - t0
    print(f"  {label(point)}: {seconds:.0f} s, test acc {test_acc(results, point['method']):.4f}", file=sys.stderr,
          flush=True)
    return {**point, "results": results, "seconds": round(seconds, 1)}


def load_config(run: RunDir) -> Config:
    return Config(**read_json(run.config))


def existing_results(run: RunDir) -> dict | None:
    """collect_results of a run directory (None when it has no config yet); `final` only when it is current."""
    if not run.config.exists():
        return None
    cfg = load_config(run)
    results = collect_results(cfg, run)
    last, _ = stage_manifest(cfg, run, cfg.num_stages - 1)
    if results["final"] and (last is None or results["final"]["fingerprint"] != last["fingerprint"]):
        results["final"] = None  # assembled from stages that have since been retrained
    return results


def test_acc(results: dict, method: str) -> float:
    return results["e2e"]["test_acc"] if method == "e2e" else results["final"]["test_acc"]


def label(point: dict) -> str:
    k = "e2e" if point["method"] == "e2e" else f"K={point['k']}"
    return f"{point['arch']} {point['downsample']} {k} seed {point['seed']}"


# --------------------------------------------------------------------------------------------------------
# The sweep


def points(args: argparse.Namespace) -> list[dict]:
    """Every point of the sweep, e2e first within each (arch, downsample, seed); K larger than the depth skipped."""
    keys = ("dataset", "n_train", "n_test", "width", "max_epochs", "batch_size", "device")
    settings = {k: getattr(args, k) for k in keys}
    root = args.out / "runs" / sha256_json(settings)[:8]
    out = []
    for arch in args.archs:
        blocks = num_blocks(Config(arch=arch, width=args.width))
        for downsample in args.downsamples:
            for seed in args.seeds:
                base = {"arch": arch, "blocks": blocks, "downsample": downsample, "seed": seed}
                name = f"{arch}-{downsample}-{{}}-s{seed}"  # {} is e2e or kK
                out.append({**base, "method": "e2e", "k": None, "run_dir": str(root / name.format("e2e"))})
                out += [{**base, "method": "sequential", "k": k, "run_dir": str(root / name.format(f"k{k}"))}
                        for k in args.ks if k <= blocks]
    return out


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Every point, `--jobs` at a time; the first failure stops the sweep with its log's tail."""
    todo = points(args)
    print(f"accuracy: {len(todo)} runs, {args.jobs} at a time; logs in {args.out / 'logs'}", file=sys.stderr)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_point, p, args) for p in todo]
        try:
            return [f.result() for f in futures]
        except RuntimeError as e:
            pool.shutdown(cancel_futures=True)
            sys.exit(f"benchmarks/accuracy.py: {e}")


def peak_mb(results: dict, method: str, device: str) -> float:
    """The largest stage's peak (training or caching, as run.py's table), or e2e's; MB as seqtrain measures it."""
    if method == "e2e":
        return results["e2e"]["peak_cuda_mb" if device == "cuda" else "peak_rss_mb"]
    if device == "cuda":
        return max(s["peak_cuda_mb"] for s in results["stages"])
    return max(max(s["peak_rss_mb"], s["cache_peak_rss_mb"]) for s in results["stages"])


BASELINE = """
import psutil, torch, seqtrain.pipeline
net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
net(torch.randn(2, 3, 8, 8)).sum().backward()
print(psutil.Process().memory_info().rss / 2**20)
"""


def baseline_rss_mb(args: argparse.Namespace) -> float:
    """Resident set of a fresh process after seqtrain's imports and one tiny conv step: what every peak shares.

    The step matters: torch maps its CPU kernels at first use (+166 MB measured here on top of the imports' 522).
    """
    code = BASELINE
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    return float(out)


def analytic_ratio(args: argparse.Namespace, arch: str, downsample: str, k: int) -> float:
    """seqtrain.plan's largest stage / e2e bytes of one training step (device-independent)."""
    cfg = Config(arch=arch, width=args.width, stages=str(k), downsample=downsample, dataset=args.dataset)
    return plan(cfg)["totals"]["peak_ratio"]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(done: list[dict], args: argparse.Namespace, base_mb: float) -> list[dict]:
    """One row per (arch, downsample, K or e2e): means and stds over seeds, gaps and memory ratios."""
    e2e = {(d["arch"], d["downsample"], d["seed"]): d for d in done if d["method"] == "e2e"}
    base = base_mb if args.device == "cpu" else 0.0
    groups: dict[tuple, list[dict]] = {}
    for d in done:
        groups.setdefault((d["arch"], d["downsample"], d["method"], d["k"]), []).append(d)
    rows = []
    for (arch, downsample, method, k), runs in groups.items():
        acc = [test_acc(d["results"], method) for d in runs]
        ref = [e2e[(arch, downsample, d["seed"])]["results"] for d in runs]
        gap = [100 * (a - r["e2e"]["test_acc"]) for a, r in zip(acc, ref)]
        peak = [peak_mb(d["results"], method, args.device) for d in runs]
        ratio = [(p - base) / (peak_mb(r, "e2e", args.device) - base) for p, r in zip(peak, ref)]
        rows.append({"arch": arch, "blocks": runs[0]["blocks"], "downsample": downsample, "method": method, "k": k,
                     "seeds": [d["seed"] for d in runs], "test_acc": mean_std(acc), "gap_points": mean_std(gap),
                     "peak_mb": mean_std(peak), "mem_ratio": mean_std(ratio),
                     "analytic_ratio": analytic_ratio(args, arch, downsample, k) if k else 1.0,
                     "seconds": sum(d["seconds"] for d in runs)})
    return rows


def target_check(rows: list[dict]) -> dict:
    """The issue's target, met or missed; `measured` is False when the sweep did not include its point."""
    row = next((r for r in rows if r["method"] == "sequential" and r["arch"] == TARGET["arch"]
                and r["k"] == TARGET["k"] and r["downsample"] == TARGET["downsample"]), None)
    out = {**TARGET, "measured": row is not None}
    if row:
        gap, ratio = row["gap_points"][0], row["mem_ratio"][0]
        out.update(gap_points=round(gap, 2), gap_std=round(row["gap_points"][1], 2), mem_ratio=round(ratio, 3),
                   analytic_ratio=round(row["analytic_ratio"], 3), gap_met=gap >= -TARGET["max_gap_points"],
                   mem_met=ratio <= TARGET["max_mem_ratio"])
        out["met"] = out["gap_met"] and out["mem_met"]
    return out


# --------------------------------------------------------------------------------------------------------
# Report


def table(rows: list[dict], device: str, base_mb: float) -> str:
    pm = lambda ms, scale=1, d=4: f"{ms[0] * scale:.{d}f} ± {ms[1] * scale:.{d}f}"  # noqa: E731
    out = [["arch", "blocks", "downsample", "K", "method", "seeds", "test acc", "gap (points)", "peak MB",
            "mem ratio", "analytic ratio", "time s"]]
    for r in rows:
        seq = r["method"] == "sequential"
        out.append([r["arch"], str(r["blocks"]), r["downsample"], str(r["k"] or "-"), r["method"], str(len(r["seeds"])),
                    pm(r["test_acc"]), pm(r["gap_points"], d=2) if seq else "-", f"{r['peak_mb'][0]:.0f}",
                    f"{r['mem_ratio'][0]:.3f}" if seq else "-", f"{r['analytic_ratio']:.3f}" if seq else "-",
                    f"{r['seconds']:.0f}"])
    memory = ("peak MB: CUDA allocator peak" if device == "cuda" else
              f"peak MB: peak resident set, torch included; mem ratio subtracts BASE = {base_mb:.0f} MB from both")
    return "\n".join([aligned(out), "test acc, gap: mean ± std over seeds; gap: sequential - e2e, same seed; "
                      "peak MB, mem ratio: means; largest stage / e2e", memory])


def target_line(t: dict) -> str:
    if not t["measured"]:
        return f"target ({t['arch']}, K={t['k']}, {t['downsample']}): not measured by this sweep"
    return (f"target ({t['arch']}, K={t['k']}, {t['downsample']}): gap {t['gap_points']:+.2f} ± {t['gap_std']:.2f} "
            f"points (>= -{t['max_gap_points']}: {'met' if t['gap_met'] else 'MISSED'}), mem ratio "
            f"{t['mem_ratio']:.3f} (<= {t['max_mem_ratio']}: {'met' if t['mem_met'] else 'MISSED'}; analytic "
            f"{t['analytic_ratio']:.3f})")


def plot(rows: list[dict], args: argparse.Namespace, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.downsamples), figsize=(5.5 * len(args.downsamples), 4.2), squeeze=False,
                             sharey=True)
    x = {arch: i for i, arch in enumerate(args.archs)}
    for ax, downsample in zip(axes[0], args.downsamples):
        series = [("e2e", None, "k--")] + [(f"sequential K={k}", k, "o-") for k in args.ks]
        for name, k, style in series:
            rs = [r for r in rows if r["downsample"] == downsample and r["k"] == k]
            if rs:
                ax.errorbar([x[r["arch"]] for r in rs], [r["test_acc"][0] for r in rs],
                            yerr=[r["test_acc"][1] for r in rs], fmt=style, capsize=3, label=name)
        blocks = {r["arch"]: r["blocks"] for r in rows}
        ax.set_xticks(list(x.values()), [f"{arch}\n({blocks[arch]} blocks)" for arch in x])
        ax.set_title(f"{downsample} downsampling", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (mean ± std over seeds)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def children_cpu_s() -> float:
    """CPU seconds of every run so far: beside the wall time, it tells a busy machine from slow work."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="ResNet-20/32, K 2,4, width 8, 2,000 images, 8 epochs "
                   "at batch 32, 3 seeds: <= 20 min on 2 CPU cores")
    p.add_argument("--archs", help="comma-separated seqtrain --arch values (default: resnet20,resnet32,resnet56,"
                   "resnet18; --quick resnet20,resnet32)")
    p.add_argument("--ks", help="numbers of stages; larger than a network's blocks are skipped (default: 2,4,8; "
                   "--quick 2,4)")
    p.add_argument("--downsamples", default="standard,accelerated", help="schedules, seqtrain --downsample values "
                   "(default: standard,accelerated)")
    p.add_argument("--seeds", help="training seeds; the data stays the same (default: 0,1,2)")
    p.add_argument("--dataset", default="synthetic", help="seqtrain --dataset (default: synthetic, embedded)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="seqtrain --data-dir (default: data)")
    p.add_argument("--n-train", type=int, help="synthetic training images (default: 10000, --quick 2000)")
    p.add_argument("--n-test", type=int, help="synthetic test images (default: 2000, --quick 1000)")
    p.add_argument("--width", type=int, help="first block's channels, 0 = standard (default: 0, --quick 8)")
    p.add_argument("--max-epochs", type=int, help="epoch cap of every stage and of e2e (default: 12, --quick 8)")
    p.add_argument("--batch-size", type=int, help="of every stage and of e2e (default: 128, --quick 32)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--jobs", type=int, help="runs side by side (default: 1, --quick 2)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: CPU cores / jobs on a CPU)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/accuracy"), help="output directory")
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.archs, args.downsamples = args.archs.split(","), args.downsamples.split(",")
    try:
        args.ks, args.seeds = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error("--ks and --seeds are comma-separated integers, e.g. --ks 2,4 --seeds 0,1,2")
    args.device = resolve_device(args.device).type
    if args.threads is None and args.device == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    args.out, args.data_dir = args.out.absolute(), args.data_dir.absolute()
    return args


def check_settings(args: argparse.Namespace) -> None:
    """Every point's flags validated, and the dataset made once, before any run starts (runs share it)."""
    for arch in args.archs:
        for downsample in args.downsamples:
            cfg = Config(arch=arch, width=args.width, downsample=downsample, dataset=args.dataset,
                         data_dir=str(args.data_dir), n_train=args.n_train, n_test=args.n_test,
                         max_epochs=args.max_epochs).validate()
    load_raw(cfg)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        check_settings(args)
    except UserError as e:
        sys.exit(f"benchmarks/accuracy.py: {e}")
    base_mb = baseline_rss_mb(args)
    rows = summarize(run_sweep(args), args, base_mb)
    target = target_check(rows)
    config = {k: getattr(args, k) for k in ("quick", "archs", "ks", "downsamples", "seeds", "dataset", "n_train",
                                            "n_test", "width", "max_epochs", "batch_size", "jobs", "threads")}
    print(table(rows, args.device, base_mb))
    print(target_line(target))
    title = (f"{args.dataset} ({args.n_train} train), width {args.width or 'standard'}, <= {args.max_epochs} epochs "
             f"at batch {args.batch_size}, "
             f"{device_description(args.device)}, torch {torch.__version__}")
    plot(rows, args, args.out / "accuracy.png", title)
    summary = {"benchmark": "accuracy", "torch": torch.__version__, "device": args.device,
               "device_name": device_description(args.device), "config": config, "baseline_rss_mb": round(base_mb, 1),
               "target": target, "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(children_cpu_s(), 1),
               "rows": [{k: r[k] for k in ("arch", "downsample", "method", "k", "test_acc", "gap_points", "mem_ratio")}
                        for r in rows]}
    write_json(args.out / "results.json", {"summary": summary, "rows": rows})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
