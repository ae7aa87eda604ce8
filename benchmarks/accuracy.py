"""Test accuracy of layer-wise (sequential) training against end to end, across depth, the number of stages K
and the downsampling schedule: the claim of Ma, Yu, Li, Wang (2020) that layer-wise learning degrades on deep
networks and that accelerated downsampling (models.schedule) recovers it, at a fraction of e2e's memory.
Optionally across convolution intensity too (models.py: conv layers per block and channel width per stage),
their verification experiment.

Run from the repository root:

    python -m benchmarks.accuracy --quick               # the sweep, small: 2 CPU cores, <= 20 min
    python -m benchmarks.accuracy                       # the same sweep at full size on the default data: a GPU
    python -m benchmarks.accuracy --study [--e2e-only]  # the scaling study: hours, in resumable parts
    python -m benchmarks.accuracy --study --budget 32,64,128   # accuracy under memory budgets (benchmarks/budget.py)
    python -m benchmarks.accuracy --dataset cifar10 --data-dir data   # any seqtrain dataset
    python -m benchmarks.accuracy --quick --archs resnet32 --ks 4 \
        --stage-convs usual 1,2 --stage-width usual 0.5,1   # convolution intensity of the shallow stage
    python -m benchmarks.accuracy --archs resnet20 --ks 2 --seeds 0 --n-train 400 --n-test 100 \
        --width 4 --max-epochs 1                        # a smoke test, well under a minute

The full and quick presets sweep ResNet-20, 32, 56 (CIFAR, 10, 16, 28 blocks) and ResNet-18 (9 blocks) x K in
{2, 4, 8} x downsampling {standard, accelerated} x {sequential, e2e} x seeds {0, 1, 2}: 96 runs. The study
preset: ResNet-20, 32, 56, 110 x K in {4, 8} x {standard, accelerated, accelerated+space-to-depth} x heads
{conv, aug} x seeds {0, 1, 2} at 16x16 (see PRESETS).
  full    seqtrain's defaults: standard widths, 10,000 synthetic images (9,000 train), <= 12 epochs at
          batch 128, early stopping; one process per stage.
  quick   width 8, 2,000 images (1,800 train, 200 val) and 1,000 test images, 5 epochs of AdamW at batch
          64, lr 0.003 after a one-epoch warm-up, no early stopping (--patience 5), one process per run,
          two runs side by side on one thread each: ~18.5 min on 2 idle cores. Why these values, and what
          they cannot show (every network is under-trained at this budget): the comment on PRESETS below.
Every setting can be overridden by its flag; the settings used are printed above the table and saved.

Every point runs the real pipeline, `python -m seqtrain.run`, in fresh processes (the package's own code
path, nothing re-implemented): a sequential point runs `--stage k` for each stage in its own process (so each
stage's peak memory is its own) and then `--stage all`, which assembles the final network and evaluates it on
the raw test images; with --one-process (the quick preset) it runs `--stage all` alone, which saves about
2 s of start-up per stage, but a stage's peak then includes what earlier stages left resident. e2e does not
depend on K, so it runs once per (arch, downsample, seed) with `--stages 1` in its own run directory; with a
convolution intensity other than the usual the network depends on the stage split, so e2e then runs per K
with the same `--stages K --stage-convs ... --stage-width ...` network. Run directories live under
OUT/runs/SETTINGS-HASH/ and complete stages are reused: a rerun trains only what is missing, and changing a
setting starts new directories. Run directories are scratch; --ledger DIR (the study: docs/study/points) is the
record that lasts: every finished point is written there as LEDGER/SETTINGS-HASH/NAME.json (its results, the
seqtrain command that made it, e2e's learning curve and, with --probe, separability probes at the stage
boundaries), a recorded point is never run again, and --report-only reports what the ledger holds.

Convolution intensity (--stage-convs, --stage-width): each value is "usual" or a comma-separated list; a
list shorter than K has its last value repeated ("1,2" is "1,2,2,2" at K = 4: only the first stage's
blocks have one convolution), and points with K below its length are skipped. The axis is every
combination of the two flags' values; the default is "usual" for both (seqtrain's own blocks).

Reported per (arch, downsample, intensity, K, method), mean and std over seeds:
  test acc      the final network's (sequential) or the e2e network's accuracy on the test split
  gap           sequential minus e2e test accuracy of the same arch, downsample, intensity and seed, in points
  peak MB       the largest stage's tensor-level peak (its training or its caching pass, as run.py's table),
                and e2e's: on CUDA the allocator's peak, on a CPU MemTracker's count of live tensors
  mem ratio     largest stage / e2e; beside it the analytic ratio of seqtrain.plan (predicted peaks)
  time s        training and caching seconds of all seeds, as the runs recorded them
The target: ResNet-32, K = 4, accelerated downsampling within 1 point of e2e, with mem ratio <= 0.3 (the
study preset's: ResNet-56, K = 8, the best of every downsampling and head). It is printed, met or missed,
whenever that point was run.
Output: OUT/results.json (written first), then from it (benchmarks/accuracy_report.py) a table,
OUT/accuracy.png (accuracy against depth and K), OUT/curves.png (e2e learning curves) and, last, a JSON line
(wall_s beside cpu_s, the CPU seconds of all runs: on a busy machine wall_s grows, cpu_s does not).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch

try:
    from benchmarks import accuracy_report
    from benchmarks.common import require_plotting
except ImportError:  # python benchmarks/accuracy.py: this folder is on sys.path, the repository root is not
    import accuracy_report
    from common import require_plotting
from seqtrain.archs import num_blocks
from seqtrain.config import Config, flag, shaping_dict
from seqtrain.data import load_raw
from seqtrain.distributed import resolve_device
from seqtrain.errors import UserError
from seqtrain.files import read_json, sha256_json, write_json
from seqtrain.job import resolve
from seqtrain.layout import StageLayout
from seqtrain.memory import device_description
from seqtrain.plan import plan
from seqtrain.rundir import RunDir, collect_results, stage_manifest

ROOT = Path(__file__).resolve().parents[1]  # the repository: every run starts here, with this checkout's seqtrain
PRESETS = {
    # For a GPU: every depth of the issue at the default dataset size and epoch cap, seqtrain's training defaults.
    "full": {"archs": "resnet20,resnet32,resnet56,resnet18", "ks": "2,4,8", "seeds": "0,1,2", "n_train": 10_000,
             "n_test": 2_000, "width": 0, "max_epochs": 12, "jobs": 1, "one_process": False,
             "downsamples": "standard,accelerated", "heads": "conv", "ledger": None, "probe": False},
    # The scaling study on 2 CPU cores (docs/scaling-study.md): CIFAR ResNets 20 to 110 at standard width on
    # 16x16 images (a quarter of the pixels, so ResNet-110 trains an epoch in about 20 s), 10,000 images,
    # up to 30 epochs with patience 6, every remedy: reduction op, aux head, K = 4 and 8. Whether 30 epochs
    # bring e2e to its plateau is what the study's first part measures (--e2e-only, learning curves).
    "study": {"archs": "resnet20,resnet32,resnet56,resnet110", "ks": "4,8", "seeds": "0,1,2", "n_train": 10_000,
              "n_test": 2_000, "width": 0, "max_epochs": 30, "patience": 6, "image_size": 16, "head_pool": 0,
              "downsamples": "standard,accelerated,accelerated+space-to-depth", "heads": "conv,aug", "jobs": 1,
              "one_process": False, "ledger": ROOT / "docs" / "study" / "points", "probe": True},
    # 2 CPU cores, 20 minutes. Measured on this machine (2 cores, torch 2.14.1, one thread per run):
    # - Cost. An e2e epoch of 1,800 images at width 8 takes 3.2, 4.9, 8.6, 2.4 CPU-s (ResNet-20, 32, 56, 18),
    #   accelerated downsampling about 0.4x that; a sequential run costs 1.1-1.3x its e2e (heads, caching).
    #   Starting a process costs ~2 CPU-s (importing torch): one process per stage would start 432 of them
    #   (~860 CPU-s of the 2,400), so each sequential point is one `--stage all` process. Slices of the
    #   sweep put the whole preset at ~2,200 CPU-s: ~18.5 min on two idle cores, longest runs first.
    # - Reliability. The previous preset (SGD lr 0.05, batch 32, early stopping after 3 epochs) left 4 of
    #   12 e2e runs at chance: early stopping ended them on the plateau. SGD without early stopping still
    #   left ResNet-56 e2e at chance (10-13%) in 2 of 3 seeds at lr 0.05 and 4 of 4 runs at lr 0.02, and
    #   ResNet-18 e2e (standard and accelerated, seed 1) in both. AdamW at lr 0.003 and batch 64 took every
    #   standard e2e run measured off the plateau (ResNet-56 29-37% in 5 of 5, ResNet-20 39-45%, ResNet-18
    #   31%) and every sequential one (25-45%, 8 of 8); lr 0.006 and 0.01 stalled ResNet-32 accelerated.
    #   Hence AdamW lr 0.003, a one-epoch warm-up and no early stopping (--patience = --max-epochs; the
    #   best-validation epoch is still the one kept). 2,000 images beat 1,800 (K=4, seed 1: ResNet-20 42%
    #   against 26%, ResNet-18 42% against 29%); width 4 for 8 epochs and 16x16 images for 12 epochs, at
    #   the same cost, did worse.
    # - What it cannot do. At ~25 CPU-s a run every network is under-trained (the 88% of
    #   benchmarks/dataset_baselines.py takes 10,000 images and 15 epochs), e2e most of all, and accelerated
    #   e2e learns slowest: ResNet-56 (seed 0) and ResNet-18 (seed 1) accelerated stayed at 10-17% under
    #   every AdamW lr (0.0015-0.003), warm-up (1, 2) and batch size (32, 64) tried, ResNet-18 under SGD too;
    #   ResNet-32 accelerated reached 19-24%. So at this budget sequential beats e2e (ResNet-32 accelerated
    #   K=4: +11.6 points over 2 seeds), whereas trained to convergence e2e leads (ResNet-20 K=4 at seqtrain's
    #   defaults: 1.1 points, README). The quick preset checks the sweep end to end on 2 cores; the full
    #   preset, on a GPU, is the one that measures the claim.
    "quick": {"archs": "resnet20,resnet32,resnet56,resnet18", "ks": "2,4,8", "seeds": "0,1,2", "n_train": 2_000,
              "n_test": 1_000, "width": 8, "max_epochs": 5, "batch_size": 64, "optimizer": "adamw", "lr": 0.003,
              "warmup_epochs": 1.0, "patience": 5, "jobs": 2, "one_process": True,
              "downsamples": "standard,accelerated", "heads": "conv", "ledger": None, "probe": False},
}
# seqtrain settings passed to every run only when set (by a flag or the preset): otherwise seqtrain's default.
TRAINING = ("batch_size", "lr", "warmup_epochs", "optimizer", "patience", "image_size", "head_pool")
# Settings every point passes to seqtrain (seqtrain_flags), so their defaults never reach a run.
POINT_FLAGS = ("arch", "downsample", "downsample_op", "head", "seed", "stages", "dataset", "n_train", "n_test",
               "width", "max_epochs")
TARGET = {"arch": "resnet32", "k": 4, "downsample": "accelerated", "max_gap_points": 1.0, "max_mem_ratio": 0.3}
# The study's: at least one configuration (any downsampling, op and head) of ResNet-56 at K = 8 within 1 point of
# e2e (the best of its e2e runs), with a largest stage of at most 0.3x e2e's tensor peak; the most accurate
# measured one is reported.
STUDY_TARGET = {"arch": "resnet56", "k": 8, "downsample": None, "max_gap_points": 1.0, "max_mem_ratio": 0.3}


# --------------------------------------------------------------------------------------------------------
# One point: a sequential run (arch, downsample, K, seed) or an e2e run (arch, downsample, seed)


def downsampling(value: str) -> dict:
    """A --downsamples value, SCHEDULE or SCHEDULE+OP (e.g. accelerated+space-to-depth), as seqtrain settings."""
    schedule, _, op = value.partition("+")
    return {"downsample": schedule, "downsample_op": op or "stride"}


def seqtrain_flags(args: argparse.Namespace, point: dict) -> list[str]:
    """The flags that define a point, apart from --run-dir."""
    ds = downsampling(point["downsample"])
    setting = lambda name: point.get("settings", {}).get(name, getattr(args, name))  # noqa: E731
    flags = ["--arch", point["arch"], "--downsample", ds["downsample"], "--downsample-op", ds["downsample_op"],
             "--head", point["head"], "--seed", str(point["seed"]),
             "--stages", str(point["stages"]), "--dataset", args.dataset, "--data-dir", str(args.data_dir),
             "--n-train", str(args.n_train), "--n-test", str(args.n_test), "--width", str(args.width),
             "--max-epochs", str(setting("max_epochs")), "--device", args.device]
    for name in TRAINING:  # only when set: otherwise seqtrain's own default
        if setting(name) is not None:
            flags += [flag(name), str(setting(name))]
    for name in ("stage_convs", "stage_width"):  # already expanded to one value per stage
        if point[name]:
            flags += [flag(name), point[name]]
    return flags + point.get("extra", [])


def run_seqtrain(flags: list[str], log: Path, threads: int | None) -> None:
    run_module("seqtrain.run", flags, log, threads)


def run_module(module: str, flags: list[str], log: Path, threads: int | None) -> None:
    """One `python -m MODULE` process; its output is appended to `log`, whose tail is shown on failure."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ python -m {module} {' '.join(flags)}\n")
        f.flush()
        code = subprocess.run([sys.executable, "-m", module, *flags], stdout=f, stderr=subprocess.STDOUT,
                              env=env, cwd=ROOT).returncode
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"python -m {module} {' '.join(flags)} exited {code}; end of {log}:\n{tail}")


def record_path(args: argparse.Namespace, point: dict) -> Path | None:
    """Where a finished point's record goes in --ledger: LEDGER/SETTINGS-HASH/NAME.json, as its run directory."""
    run = Path(point["run_dir"])
    return args.ledger / run.parent.name / f"{run.name}.json" if args.ledger else None


def recorded(args: argparse.Namespace, point: dict) -> dict | None:
    """The point's ledger record, when it has one: a finished point, whether or not its run directory survives."""
    path = record_path(args, point)
    if path is None or not path.exists():
        return None
    return {**read_json(path), "run_dir": point["run_dir"]}


@contextlib.contextmanager
def claim(record: Path | None):
    """Whether this process may train the point whose ledger record is `record`: True for the first to ask, False
    while another process holds the claim (it is training the point), so two commands sharing a ledger split
    the points between them. The OS lets go of a claim when its process ends, however it ends."""
    if record is None:
        yield True
        return
    lock = record.with_name(f".{record.stem}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        with open(lock, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                current = os.stat(lock).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                current = False
            if not current:
                continue  # locked a file its holder had already removed: claim the one at the path now
            try:
                yield True
            finally:
                lock.unlink(missing_ok=True)  # while still held, so whoever locks next checks the path again
            return


def run_point(point: dict, args: argparse.Namespace) -> dict | None:
    """Train one point, reusing whatever of it is complete; returns its results as seqtrain reports them, or
    None when another process sharing --ledger is training it.

    With --ledger a point recorded there is not run again (delete its record to rerun it), and every point that
    finishes is recorded: its results, its command, its e2e learning curve and (--probe) its separability probes.
    """
    with claim(record_path(args, point)) as mine:
        if (done := recorded(args, point)) is not None:  # asked again once claimed: it may have finished meanwhile
            return done
        if not mine:
            print(f"  {label(point)}: another process is training it (its record goes to {args.ledger}); "
                  "skipped", file=sys.stderr, flush=True)
            return None
        return train_point(point, args)


def train_point(point: dict, args: argparse.Namespace) -> dict:
    run, t0 = RunDir(point["run_dir"]), time.perf_counter()
    flags = ["--run-dir", str(run.root), *seqtrain_flags(args, point)]
    log = args.out / "logs" / f"{run.root.parent.name}-{run.root.name}.log"
    results = existing_results(run)
    if point["method"] == "e2e" and not (results and results["e2e"]):
        run_seqtrain(["--stage", "e2e", *flags], log, args.threads)
    if point["method"] == "sequential" and not (results and results["final"]):
        for k in range(0 if args.one_process else point["k"]):  # one process per stage: its peak is its own
            if not (run.config.exists() and stage_manifest(*run_config(run), run, k)[0]):
                run_seqtrain(["--stage", str(k), *flags], log, args.threads)
        run_seqtrain(["--stage", "all", *flags], log, args.threads)  # assembles and evaluates the final network
    results = existing_results(run)
    assert results and results["e2e" if point["method"] == "e2e" else "final"], f"{run.root} has no results"
    done = {**point, "results": results, "val_curve": val_curve(point["run_dir"]),
            "probe": probes(point, args, log) if args.probe else None}
    seconds = time.perf_counter() - t0
    print(f"  {label(point)}: {seconds:.0f} s, test acc {test_acc(results, point['method']):.4f}", file=sys.stderr,
          flush=True)
    done["seconds"] = round(seconds, 1)
    if (path := record_path(args, point)) is not None:
        command = "python -m seqtrain.run " + " ".join(seqtrain_flags(args, point)).replace(f"{ROOT}/", "")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, {**done, "run_dir": str(Path(point["run_dir"]).relative_to(args.out)), "command": command,
                          "device_name": device_description(args.device), "finished": time.strftime("%Y-%m-%d %H:%M")})
    return done


def probes(point: dict, args: argparse.Namespace, log: Path) -> dict:
    """Separability probes (seqtrain.probe) at the stage boundaries: a sequential run's own, and an e2e network
    cut as each K of the sweep cuts it (--balance memory and blocks cut where seqtrain.run would)."""
    run = Path(point["run_dir"])
    cuts = {f"k{k}": ["--e2e", "--stages", str(k)] for k in args.ks if k <= point["blocks"]} \
        if point["method"] == "e2e" else {"own": []}
    out = {}
    for name, extra in cuts.items():
        dest = run / "probes" / name
        if not (dest / "probe.json").exists():
            run_module("seqtrain.probe", ["--run-dir", str(run), "--out", str(dest), *extra], log, args.threads)
        out[name] = [{k: s[k] for k in ("depth", "channels", "probe_test_acc", "separability")}
                     for s in read_json(dest / "probe.json")["stages"]]
    return out


def run_config(run: RunDir) -> tuple[Config, StageLayout]:
    """A run directory's configuration (config.json also holds its normalisation statistics) and stage layout."""
    cfg = Config.from_dict(read_json(run.config))
    return cfg, resolve(cfg)


def existing_results(run: RunDir) -> dict | None:
    """collect_results of a run directory (None when it has no config yet); `final` only when it is current."""
    if not run.config.exists():
        return None
    cfg, layout = run_config(run)
    results = collect_results(cfg, layout, run)
    last, _ = stage_manifest(cfg, layout, run, layout.num_stages - 1)
    if results["final"] and (last is None or results["final"]["fingerprint"] != last.fingerprint):
        results["final"] = None  # assembled from stages that have since been retrained
    return results


def test_acc(results: dict, method: str) -> float:
    return results["e2e"]["test_acc"] if method == "e2e" else results["final"]["test_acc"]


def run_seconds(results: dict, method: str) -> float:
    """Training (and caching) seconds as the run recorded them, so a rerun that reuses it reports the same."""
    if method == "e2e":
        return results["e2e"]["train_seconds"]
    return sum(s["train_seconds"] + s["cache_seconds"] for s in results["stages"])


def intensity(point: dict) -> str:
    """The point's convolution intensity as given: "usual", or "convs C, width W" with the flags' values."""
    parts = [f"{name} {point[key]}" for name, key in (("convs", "convs"), ("width", "swidth"))
             if point[key] != "usual"]
    if point.get("head", "conv") != "conv":  # the auxiliary head is an axis of the same kind
        parts.append(f"head {point['head']}")
    return ", ".join(parts) or "usual"


def label(point: dict) -> str:
    k = ("e2e" + (f" (K={point['k']} network)" if point["k"] else "")) if point["method"] == "e2e" else \
        f"K={point['k']}"
    extra = "" if intensity(point) == "usual" else f" [{intensity(point)}]"
    return f"{point['arch']} {point['downsample']}{extra} {k} seed {point['seed']}"


# --------------------------------------------------------------------------------------------------------
# The sweep


def per_stage(value: str, k: int) -> str | None:
    """An intensity value for K stages: "" for "usual", the list padded with its last value, None if too long."""
    if value == "usual":
        return ""
    items = value.replace(" ", "").split(",")
    return ",".join(items + items[-1:] * (k - len(items))) if len(items) <= k else None


def runs_root(args: argparse.Namespace, **settings) -> Path:
    """OUT/runs/SETTINGS-HASH: the folder of the points run with these settings (`settings` overriding the
    flags'), and the name of their folder in the ledger."""
    keys = ("dataset", "n_train", "n_test", "width", "max_epochs", "device", *TRAINING)
    values = {k: v for k in keys if (v := settings.get(k, getattr(args, k))) is not None}
    # seqtrain's defaults of the settings no point passes shape every point too: a changed default (say
    # --head-pool's) names a new folder, so the ledger never serves a record that seqtrain would not reproduce.
    defaults = {k: v for k, v in shaping_dict(Config()).items() if k not in values and k not in POINT_FLAGS}
    return args.out / "runs" / sha256_json({**values, "seqtrain_defaults": defaults})[:8]


def points(args: argparse.Namespace) -> list[dict]:
    """Every point of the sweep, e2e first within each (arch, downsample, intensity, seed); K larger than the
    depth (or shorter than an intensity list) skipped."""
    root = runs_root(args)
    out = []
    for arch in args.archs:
        blocks = num_blocks(arch, args.width)
        for downsample, head in ((d, h) for d in args.downsamples for h in args.heads):
            for convs in args.stage_convs:
                for swidth in args.stage_width:
                    usual = convs == swidth == "usual"
                    tag = ("" if convs == "usual" else "-c" + convs.replace(",", ".")) + (
                        "" if swidth == "usual" else "-w" + swidth.replace(",", "_")) + (
                        "" if head == "conv" else f"-{head}")
                    for seed in args.seeds:
                        base = {"arch": arch, "blocks": blocks, "downsample": downsample, "head": head,
                                "convs": convs, "swidth": swidth, "seed": seed}
                        name = f"{arch}-{downsample}{tag}-{{}}-s{seed}"  # {} is e2e, e2e-kK or kK
                        if usual:  # the network does not depend on K: one e2e for every K
                            out.append({**base, "method": "e2e", "k": None, "stages": 1, "stage_convs": "",
                                        "stage_width": "", "e2e": None, "run_dir": str(root / name.format("e2e"))})
                        for k in args.ks:
                            sc, sw = per_stage(convs, k), per_stage(swidth, k)
                            if k > blocks or sc is None or sw is None:
                                continue
                            point = {**base, "k": k, "stages": k, "stage_convs": sc, "stage_width": sw,
                                     "e2e": None if usual else k}
                            if not usual:  # the network depends on the split: e2e of the same K-stage network
                                out.append({**point, "method": "e2e", "run_dir": str(root / name.format(f"e2e-k{k}"))})
                            out.append({**point, "method": "sequential", "run_dir": str(root / name.format(f"k{k}"))})
    if args.e2e_only:
        return [p for p in out if p["method"] == "e2e"]
    return out


def e2e_key(point: dict) -> tuple:
    """Which e2e run a point is compared with (an e2e point: itself)."""
    return (point["arch"], point["downsample"], point.get("head", "conv"), point["convs"], point["swidth"],
            point["seed"], point["e2e"])


def cost(point: dict) -> float:
    """A rough relative cost, to start the longest runs first (two runs side by side then end together)."""
    return point["blocks"] * (0.4 if point["downsample"] == "accelerated" else 1.0) * (
        1.0 if point["method"] == "e2e" else 1.3)


def run_sweep(args: argparse.Namespace) -> list[dict]:
    """Every point, `--jobs` at a time, longest first; the first failure stops the sweep with its log's tail.

    --report-only: the points recorded in --ledger (and the e2e runs they compare with) alone, none run."""
    todo = points(args)
    if args.report_only:
        done = with_their_e2e([d for d in (recorded(args, p) for p in todo) if d is not None])
        print(f"accuracy: {len(done)} of {len(todo)} points recorded in {args.ledger}", file=sys.stderr)
        return done
    print(f"accuracy: {len(todo)} runs, {args.jobs} at a time; logs in {args.out / 'logs'}", file=sys.stderr)
    order = sorted(range(len(todo)), key=lambda i: -cost(todo[i]))
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_point, todo[i], args): i for i in order}
        done = {}
        for future in as_completed(futures):  # as they finish: a failure stops the sweep at once
            try:
                done[futures[future]] = future.result()
            except RuntimeError as e:
                pool.shutdown(cancel_futures=True)
                sys.exit(f"benchmarks/accuracy.py: {e}")
    return with_their_e2e([done[i] for i in range(len(todo)) if done[i] is not None])  # None: another process has it


def with_their_e2e(done: list[dict]) -> list[dict]:
    """The points of `done` whose e2e run is among them: a point is reported against its own e2e only."""
    e2e = {e2e_key(d) for d in done if d["method"] == "e2e"}
    return [d for d in done if e2e_key(d) in e2e]


def peak_mb(results: dict, method: str) -> float:
    """The largest stage's tensor-level peak (training or caching, as run.py's table), or e2e's."""
    if method == "e2e":
        return results["e2e"]["peak_tensor_mb"]
    return max(s["peak_tensor_mb"] for s in results["stages"])


def analytic_ratio(args: argparse.Namespace, point: dict) -> float:
    """seqtrain.plan's largest stage / e2e bytes of one training step (device-independent)."""
    cfg = Config(arch=point["arch"], width=args.width, stages=str(point["k"]), **downsampling(point["downsample"]),
                 head=point["head"], dataset=args.dataset, stage_convs=point["stage_convs"],
                 stage_width=point["stage_width"], **({"batch_size": args.batch_size} if args.batch_size else {}))
    return plan(cfg)["largest_stage_ratio"]


def val_curve(run_dir: str) -> list[float]:
    """An e2e run's validation accuracy after every epoch, from its metrics.jsonl: has it flattened?"""
    path = Path(run_dir) / "e2e" / "metrics.jsonl"
    if not path.exists():  # results given without their run directory (the report's tests)
        return []
    return [json.loads(line)["val_acc"] for line in path.read_text().splitlines() if line.strip()]


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(done: list[dict], args: argparse.Namespace) -> list[dict]:
    """One row per (arch, downsample, intensity, K or e2e): means and stds over seeds, gaps and memory ratios."""
    e2e = {e2e_key(d): d for d in done if d["method"] == "e2e"}
    groups: dict[tuple, list[dict]] = {}
    for d in done:
        key = (d["arch"], d["downsample"], d.get("head", "conv"), d["convs"], d["swidth"], d["method"], d["k"])
        groups.setdefault(key, []).append(d)
    rows = []
    for (arch, downsample, head, convs, swidth, method, k), runs in groups.items():
        acc = [test_acc(d["results"], method) for d in runs]
        ref = [e2e[e2e_key(d)]["results"] for d in runs]
        gap = [100 * (a - r["e2e"]["test_acc"]) for a, r in zip(acc, ref)]
        peak = [peak_mb(d["results"], method) for d in runs]
        ratio = [p / peak_mb(r, "e2e") for p, r in zip(peak, ref)]
        seq = method == "sequential"
        curves = [] if seq else [d.get("val_curve") or val_curve(d["run_dir"]) for d in runs]
        rows.append({"arch": arch, "blocks": runs[0]["blocks"], "downsample": downsample, "head": head,
                     "convs": convs, "swidth": swidth, "curves": curves, "intensity": intensity(runs[0]),
                     "method": method, "k": k,
                     "seeds": [d["seed"] for d in runs], "test_acc": mean_std(acc), "gap_points": mean_std(gap),
                     "peak_mb": mean_std(peak), "mem_ratio": mean_std(ratio),
                     "analytic_ratio": analytic_ratio(args, runs[0]) if seq else 1.0,
                     "seconds": sum(run_seconds(d["results"], method) for d in runs), "probe": mean_probes(runs)})
    return rows


def mean_probes(runs: list[dict]) -> dict:
    """Per probe cut (a sequential run's own boundaries, or an e2e network cut as K), the depth of each boundary
    and its linear-probe test accuracy and separability, averaged over the seeds that were probed."""
    out = {}
    probed = [d["probe"] for d in runs if d.get("probe")]
    for name in probed[0] if probed else ():
        cuts = [p[name] for p in probed if name in p]
        if len({tuple(s["depth"] for s in cut) for cut in cuts}) != 1:
            continue  # seeds cut at different depths (a memory split that moved): nothing to average
        out[name] = {"seeds": len(cuts), "depth": [s["depth"] for s in cuts[0]],
                     **{key: [statistics.mean(cut[i][key] for cut in cuts) for i in range(len(cuts[0]))]
                        for key in ("probe_test_acc", "separability")}}
    return out


def target_check(rows: list[dict], one_process: bool = False, target: dict = TARGET) -> dict:
    """The target, met or missed; `measured` is False when the sweep did not include its point.

    With no `downsample` in the target (the study's), every downsampling and head qualifies, and the gap that
    counts is to the network's best e2e (any downsampling or head): a schedule whose own e2e is poor would
    otherwise "close" the gap by losing accuracy. The row reported is the most accurate within the memory
    ratio (else the most accurate), with its gap to its own e2e beside.

    With --one-process the stages' peaks are not their own, so `mem_per_stage` is False and mem_met means little.
    """
    candidates = [r for r in rows if r["method"] == "sequential" and r["arch"] == target["arch"]
                  and r["k"] == target["k"] and target["downsample"] in (None, r["downsample"])
                  and r.get("intensity", "usual") in (("usual",) if target["downsample"] else ("usual", "head aug"))]
    fits = lambda r: r["mem_ratio"][0] <= target["max_mem_ratio"]  # noqa: E731
    e2e = [r["test_acc"][0] for r in rows if r["method"] == "e2e" and r["arch"] == target["arch"]]
    best_e2e = max(e2e) if target["downsample"] is None and e2e else None
    if best_e2e is None:
        row = max(candidates, default=None, key=lambda r: (fits(r), r["gap_points"][0]))
    else:
        row = max(candidates, default=None, key=lambda r: (fits(r), r["test_acc"][0]))
    out = {**target, "measured": row is not None, "mem_per_stage": not one_process}
    if row:
        gap, ratio = row["gap_points"][0], row["mem_ratio"][0]
        out.update(downsample=row["downsample"], head=row.get("head", "conv"), seeds=len(row["seeds"]),
                   gap_points=round(gap, 2), gap_std=round(row["gap_points"][1], 2), mem_ratio=round(ratio, 3),
                   analytic_ratio=round(row["analytic_ratio"], 3), mem_met=ratio <= target["max_mem_ratio"])
        if best_e2e is not None:
            out.update(best_e2e_acc=round(best_e2e, 4), test_acc=round(row["test_acc"][0], 4),
                       gap_to_best_e2e=round((row["test_acc"][0] - best_e2e) * 100, 2))
        out["gap_met"] = out.get("gap_to_best_e2e", gap) >= -target["max_gap_points"]
        out["met"] = out["gap_met"] and out["mem_met"]
    return out


# --------------------------------------------------------------------------------------------------------
# Report


def children_cpu_s() -> float:
    """CPU seconds of every run so far: beside the wall time, it tells a busy machine from slow work."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    seq = Config()  # seqtrain's defaults, named in the help of the flags left to them: read, not copied
    p.add_argument("--quick", action="store_true", help="the sweep at width 8 on 2,000 images, 5 epochs of AdamW "
                   "at batch 64, no early stopping, one process per run: ~18.5 min on 2 CPU cores (see the docstring)")
    p.add_argument("--study", action="store_true", help="the scaling study's preset: ResNet-20 to 110 at 16x16, "
                   "up to 30 epochs, every reduction op and head (hours: run it in parts, it resumes)")
    p.add_argument("--e2e-only", action="store_true", help="only the e2e points: their learning curves say whether "
                   "a budget trains e2e to convergence")
    p.add_argument("--image-size", type=int, help="seqtrain --image-size (default: the dataset's own, --study 16)")
    p.add_argument("--head-pool", type=int, help=f"seqtrain --head-pool (default: seqtrain's {seq.head_pool}; the "
                   "--study sweep 0: its conv heads saw the full resolution, as it was measured)")
    p.add_argument("--archs", help="comma-separated seqtrain --arch values (default: resnet20,resnet32,resnet56,"
                   "resnet18)")
    p.add_argument("--ks", help="numbers of stages; larger than a network's blocks are skipped (default: 2,4,8)")
    p.add_argument("--downsamples", help="schedules, seqtrain --downsample values, "
                   "each optionally +OP for --downsample-op, e.g. accelerated+space-to-depth (default: "
                   "standard,accelerated)")
    p.add_argument("--heads", help="auxiliary heads, seqtrain --head values, e.g. conv,aug; e2e "
                   "runs once per head, whose last-stage classifier it shares (default: conv)")
    p.add_argument("--stage-convs", nargs="+", default=["usual"], metavar="CONVS", help="convolution intensity "
                   "axis: conv layers per block for each stage, e.g. usual 1,2 4,2 ('1,2' = the first stage's "
                   "blocks 1 conv, every later stage 2; default: usual)")
    p.add_argument("--stage-width", nargs="+", default=["usual"], metavar="MULTS", help="convolution intensity "
                   "axis: channel multiplier per stage, e.g. usual 0.5,1 (last value repeated; default: usual)")
    p.add_argument("--seeds", help="training seeds; the data stays the same (default: 0,1,2)")
    p.add_argument("--dataset", default="synthetic", help="seqtrain --dataset (default: synthetic, embedded)")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="seqtrain --data-dir (default: data)")
    p.add_argument("--n-train", type=int, help="synthetic training images (default: 10000, --quick 2000)")
    p.add_argument("--n-test", type=int, help="synthetic test images (default: 2000, --quick 1000)")
    p.add_argument("--width", type=int, help="first block's channels, 0 = standard (default: 0, --quick 8)")
    p.add_argument("--max-epochs", type=int, help="epoch cap of every stage and of e2e (default: 12, --quick 5)")
    p.add_argument("--batch-size", type=int, help=f"of every stage and of e2e (default: seqtrain's {seq.batch_size}, "
                   "--quick 64)")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default: seqtrain's {seq.lr}, --quick 0.003)")
    p.add_argument("--warmup-epochs", type=float, help=f"linear warm-up (default: seqtrain's {seq.warmup_epochs:g}, "
                   "--quick 1)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), help=f"(default: seqtrain's {seq.optimizer}, "
                   "--quick adamw)")
    p.add_argument("--patience", type=int, help="early-stopping patience in epochs; --max-epochs or more turns "
                   f"early stopping off (default: seqtrain's {seq.patience}, --quick {PRESETS['quick']['patience']}, "
                   f"--study {PRESETS['study']['patience']})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--jobs", type=int, help="runs side by side (default: 1, --quick 2)")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: CPU cores / jobs on a CPU)")
    p.add_argument("--one-process", action=argparse.BooleanOptionalAction, help="run each sequential point as "
                   "one `--stage all` process rather than one process per stage: ~2 s less start-up per stage, "
                   "but a stage's peak memory includes earlier stages' leftovers (default: off, --quick on)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/accuracy"), help="output directory")
    p.add_argument("--ledger", type=Path, help="record every finished point here (JSON with its command) and "
                   "never run a recorded point again: a study resumes from it after its run directories are gone "
                   "(default: none, --study docs/study/points)")
    p.add_argument("--probe", action=argparse.BooleanOptionalAction, help="run seqtrain.probe on every finished "
                   "point: a sequential run's stage boundaries, an e2e network cut as each K (default: --study on)")
    p.add_argument("--report-only", action="store_true", help="report the points recorded in --ledger, run none")
    p.add_argument("--budget", help="accuracy under tensor memory budgets, in MB, e.g. 32,64,128: end to end and "
                   "end to end with checkpointing at every --e2e-depths depth that fits, seqtrain's --archs with "
                   "--stages auto --memory-budget, with and without --checkpoint (benchmarks/budget.py; default "
                   "archs resnet56,resnet110, --study ledger docs/study/budget)")
    p.add_argument("--e2e-depths", default="8,14,20,32,44,56,110", help="--budget: CIFAR ResNet depths trained "
                   "end to end (default: 8,14,20,32,44,56,110)")
    p.add_argument("--long-e2e", action="store_true", help="--budget: one end-to-end run per depth (seed 0) at "
                   "twice the epochs, to show whether the baseline had converged")
    args = p.parse_args(argv)
    if args.budget:  # its own defaults, before the preset's
        for key, value in (("archs", "resnet56,resnet110"), ("downsamples", "standard"), ("heads", "conv"),
                           ("probe", False), ("head_pool", Config.head_pool),
                           ("ledger", ROOT / "docs" / "study" / "budget" if args.study else None)):
            if getattr(args, key) is None:
                setattr(args, key, value)
        if args.out == p.get_default("out"):
            args.out = Path("benchmarks/out/budget")
        try:
            args.budget = [float(b) for b in args.budget.split(",")]
            args.e2e_depths = [int(d) for d in args.e2e_depths.split(",")]
        except ValueError:
            p.error("--budget and --e2e-depths are comma-separated numbers, e.g. --budget 32,64,128")
        if len(args.downsamples.split(",")) > 1 or len(args.heads.split(",")) > 1:
            p.error("--budget compares one network family: give one --downsamples and one --heads value")
    if args.quick and args.study:
        p.error("--quick and --study are two presets: choose one")
    args.preset = "quick" if args.quick else "study" if args.study else "full"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.archs, args.downsamples, args.heads = args.archs.split(","), args.downsamples.split(","), args.heads.split(",")
    try:
        args.ks, args.seeds = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error("--ks and --seeds are comma-separated integers, e.g. --ks 2,4 --seeds 0,1,2")
    args.device = resolve_device(args.device).type
    if args.threads is None and args.device == "cpu":
        args.threads = max(1, (os.cpu_count() or 1) // args.jobs)
    if args.report_only and not args.ledger:
        p.error("--report-only reports what --ledger recorded: give --ledger DIR (or --study)")
    args.out, args.data_dir = args.out.absolute(), args.data_dir.absolute()
    args.ledger = args.ledger and args.ledger.absolute()
    return args


def settings_line(args: argparse.Namespace) -> str:
    """The settings every run used, in words, for the report and the plot."""
    train = ", ".join(f"{flag(name)} {getattr(args, name)}" for name in TRAINING if getattr(args, name) is not None)
    return (f"{args.preset} preset: {args.dataset} ({args.n_train:,} train incl. validation, {args.n_test:,} test), "
            f"width {args.width or 'standard'}, <= {args.max_epochs} epochs, {train or 'seqtrain training defaults'}; "
            f"{args.jobs} run(s) at a time on {args.threads or 'default'} thread(s)"
            + (", one process per sequential run" if args.one_process else ", one process per stage"))


def machines(done: list[dict], args: argparse.Namespace) -> str:
    """Where the points ran: the ledger's record of each (--report-only must not stamp its own machine on
    points measured elsewhere, as the study's plot once did), this machine for points run now."""
    here = device_description(args.device)
    counts = Counter(d.get("device_name", here) for d in done).most_common()
    if len(counts) <= 1:
        return counts[0][0] if counts else here
    return "; ".join(f"{name}: {n} point{'s' * (n > 1)}" for name, n in counts)


def check_settings(args: argparse.Namespace) -> None:
    """Every point's flags validated, and the dataset made once, before any run starts (runs share it)."""
    cfg = None
    for point in points(args):
        cfg = Config(arch=point["arch"], width=args.width, **downsampling(point["downsample"]), head=point["head"],
                     dataset=args.dataset,
                     data_dir=str(args.data_dir), n_train=args.n_train, n_test=args.n_test, stages=str(point["stages"]),
                     stage_convs=point["stage_convs"], stage_width=point["stage_width"],
                     max_epochs=args.max_epochs).validate()
    if cfg is None:
        raise UserError("the sweep has no points: check --archs, --ks and the length of --stage-convs/--stage-width")
    load_raw(cfg)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_plotting("benchmarks/accuracy.py")
    t0 = time.perf_counter()
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    try:
        check_settings(args)
    except UserError as e:
        sys.exit(f"benchmarks/accuracy.py: {e}")
    print(f"accuracy: {settings_line(args)}", file=sys.stderr)
    if args.budget:
        try:  # budget imports this module: loaded only in its mode
            from benchmarks import budget
        except ImportError:  # python benchmarks/accuracy.py
            import budget

        budget.main(args)
        return
    done = run_sweep(args)
    rows = summarize(done, args)
    target = target_check(rows, args.one_process, STUDY_TARGET if args.study else TARGET)
    config = {k: getattr(args, k) for k in ("preset", "quick", "e2e_only", "archs", "ks", "downsamples", "heads",
                                            "image_size", "stage_convs",
                                            "stage_width", "seeds", "dataset", "n_train", "n_test", "width",
                                            "max_epochs", *TRAINING, "jobs", "threads", "one_process")}
    summary = {"benchmark": "accuracy", "torch": torch.__version__, "device": args.device,
               "device_name": machines(done, args), "config": config, "settings": settings_line(args),
               "target": target, "wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(children_cpu_s(), 1),
               "rows": [{k: r[k] for k in ("arch", "downsample", "intensity", "method", "k", "test_acc", "gap_points",
                                           "mem_ratio")} for r in rows]}
    write_json(args.out / "results.json", {"summary": summary, "rows": rows})  # before anything is drawn
    accuracy_report.report(args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
