"""Final test accuracy of the same seqtrain run under a few variants of its settings, over seeds: does a
setting that saves bytes or time cost accuracy?

Run from the repository root:

    python -m benchmarks.variants --variant float16="--cache-dtype float16" --variant int8="--cache-dtype int8"
    python -m benchmarks.variants --variant 1-shard="--shuffle-mb 8" --variant split="--shuffle-mb 4096" \\
        -- --n-train 4000 --n-test 1000 --stages 2 --max-epochs 8 --shard-mb 8
    python -m benchmarks.variants --variant W1="--ranks 1" --variant W2="--ranks 2" -- --n-train 4000

Each variant is a name and the seqtrain flags that make it; everything after `--` is passed to every run
(by default none: seqtrain's defaults, the embedded dataset). `--ranks N` in a variant runs it under
`torchrun --standalone --nproc-per-node N` on the CPU (gloo, one thread per rank; `--ranks 1` also on the CPU,
so that W1 and W2 compare alike; a `--device` in the variant or after `--` overrides it). Every run is
`python -m seqtrain.run --stage all` in its own run directory under OUT/runs/VARIANT-sSEED, so an interrupted
benchmark resumes where it stopped (seqtrain skips complete stages). Reported per variant: the final
network's test accuracy per seed, their mean and standard deviation, the difference of means to the first
variant, each stage's test accuracy, the training and caching seconds the runs recorded, and the MB of the
previous stage's cache each rank read per training epoch. Output:
OUT/variants.json (written as each run finishes) and the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from seqtrain.memory import device_description


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = sys.argv[1:] if argv is None else argv
    common = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--variant", action="append", required=True, metavar="NAME=FLAGS",
                   help='a name and the seqtrain flags that make it, e.g. int8="--cache-dtype int8"')
    p.add_argument("--seeds", default="0,1,2", help="training seeds (default: 0,1,2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/variants"), help="output directory")
    args = p.parse_args(argv)
    variants = {}
    for spec in args.variant:
        name, sep, flags = spec.partition("=")
        if not sep or not name or name in variants:
            p.error(f"--variant {spec!r}: give a new NAME=FLAGS")
        variants[name] = shlex.split(flags)
    args.variants = variants
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args, common


def command(flags: list[str], common: list[str], run_dir: Path) -> tuple[list[str], dict | None]:
    """The command line of one run and its environment (None: this one's); `--ranks N` becomes torchrun."""
    flags = list(flags)
    ranks, device = 1, []
    if "--ranks" in flags:
        i = flags.index("--ranks")
        ranks = int(flags[i + 1])
        del flags[i:i + 2]
        # The CPU, said before the user's flags so that a --device of theirs wins: left at --device auto, a
        # GPU machine would make the ranks NCCL ones, one per GPU, and a 1-GPU machine stops at local rank 1.
        device = ["--device", "cpu"]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    argv = [sys.executable, *launcher, "-m", "seqtrain.run", "--stage", "all", *device, *common, *flags,
            "--run-dir", str(run_dir)]
    return argv, ({**os.environ, "OMP_NUM_THREADS": "1"} if ranks > 1 else None)


def run_one(argv: list[str], env: dict | None, run_dir: Path) -> dict:
    run_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        sys.exit(f"variants: {shlex.join(argv)} exited {code}; see {run_dir.parent / (run_dir.name + '.log')}")
    results = json.loads((run_dir / "final" / "results.json").read_text())
    stages = results["stages"]
    return {"test_acc": results["final"]["test_acc"], "stage_test_acc": [s["test_acc"] for s in stages],
            "train_seconds": sum(s["train_seconds"] for s in stages),
            "cache_seconds": sum(s["cache_seconds"] for s in stages),
            # MB of the previous stage's cache each rank read per training epoch (rank 0's and the most)
            "read_mb_per_rank_epoch": [s.get("read_mb_per_rank_epoch") for s in stages],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def summarize(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    out, base = {}, None
    for name, by_seed in runs.items():
        accs = [r["test_acc"] * 100 for r in by_seed.values()]
        mean = statistics.mean(accs) if accs else float("nan")
        base = mean if base is None else base
        out[name] = {"seeds": sorted(by_seed), "test_acc": accs, "mean": mean,
                     "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "minus_first": mean - base}
    return out


def table(args, runs: dict, summary: dict) -> str:
    first = next(iter(summary))
    lines = [f"{'variant':<14} {'flags':<28} {'test acc % (per seed)':<26} {'mean +- std':>14} {'vs ' + first:>10}"]
    for name, s in summary.items():
        per_seed = ", ".join(f"{a:.2f}" for a in s["test_acc"])
        lines.append(f"{name:<14} {shlex.join(args.variants[name]):<28} {per_seed:<26} "
                     f"{s['mean']:>7.2f} +- {s['std']:.2f} {s['minus_first']:>+10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, common = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[int, dict]] = {name: {} for name in args.variants}
    machine = device_description("cuda" if torch.cuda.is_available() else "cpu")
    record = {"benchmark": "variants", "torch": torch.__version__, "machine": machine,
              "cuda": torch.cuda.is_available(), "common": common, "variants": args.variants, "commands": {},
              "runs": runs}
    for seed in args.seeds:  # seed by seed, so a partial benchmark still compares every variant
        for name, flags in args.variants.items():
            run_dir = args.out / "runs" / f"{name}-s{seed}"
            argv, env = command([*flags, "--seed", str(seed)], common, run_dir)
            print(f"variants: {name}, seed {seed}: {shlex.join(argv[1:])}", flush=True)
            runs[name][seed] = run_one(argv, env, run_dir)
            record["commands"][f"{name}-s{seed}"] = shlex.join(["python", *argv[1:]])
            record["summary"] = summarize(runs)
            tmp = args.out / "variants.json.tmp"
            tmp.write_text(json.dumps(record, indent=2))
            tmp.replace(args.out / "variants.json")
    print(table(args, runs, record["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
