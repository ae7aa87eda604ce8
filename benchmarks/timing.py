"""Wall-clock of the four ways to train the default network, side by side: `--stage all`, `--stage all
--checkpoint`, `--stage e2e` and `--stage e2e --checkpoint`, and where each one's time goes.

    python benchmarks/timing.py                      # the default run, 2 rounds: about 50 min on 2 CPU cores
    python benchmarks/timing.py --head-pool 8        # any other flag goes to every seqtrain command
    python benchmarks/timing.py --rounds 1 --max-epochs 1 --n-train 1000   # a smoke test
    python benchmarks/timing.py --ways all,e2e --rounds 3   # two of the ways: one target, in less time

Each way runs as `python -m seqtrain.run` in a fresh run directory (nothing reused), `--rounds` times,
interleaved (A B C D, then D C B A, ...) so that the machine's drift cancels between ways. Run it alone on the
machine: another job's load lands in whichever way runs beside it (the CPU-wait share of each run is printed,
from Linux PSI, to tell). Per way: the process's wall-clock, and from the run's own records each stage's
training (its steps, the time waiting for batches, validation after each epoch) and caching seconds. Per stage
of the cut: the auxiliary head's share of a training step, timed on random inputs of the stage's shape (the
head's forward and backward against the whole stage's step).

Targets: `--stage all` within `--stage e2e --checkpoint`'s wall-clock, and within 1.1x `--stage e2e`'s.
Output: OUT/timing.json, a table, and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from benchmarks.common import CpuWait, target
except ImportError:  # python benchmarks/timing.py: this folder is on sys.path, the repository root is not
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.common import CpuWait, target
from seqtrain.config import Config
from seqtrain.data import dataset_info, load_raw
from seqtrain.distributed import resolve_device
from seqtrain.files import read_json, write_json
from seqtrain.job import resolve
from seqtrain.memory import device_description
from seqtrain.models import StageModel, build_head
from seqtrain.network import build_stage
from seqtrain.run import build_parser, config_from_args
from seqtrain.rundir import RunDir, collect_results

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"all": ["--stage", "all"], "all+ckpt": ["--stage", "all", "--checkpoint"],
        "e2e": ["--stage", "e2e"], "e2e+ckpt": ["--stage", "e2e", "--checkpoint"]}
TARGETS = {"all / e2e+ckpt": ("<=", 1.0), "all / e2e": ("<=", 1.1)}
# Above this share of CPU wait (another job on the cores) a way's wall-clock says more about the other job than
# about the way: its ratios are still printed, marked as not judged. Alone, runs here waited under 3%.
CONTENDED = 0.05


def parse_config(flags: list[str], run_dir: Path) -> Config:
    """The Config seqtrain.run makes of these flags (a mistake is its one-line error), for a run directory that
    does not exist yet: an existing one's config.json would be read into it."""
    return config_from_args(build_parser().parse_args(["--stage", "all", *flags, "--run-dir", str(run_dir)]))


def stage_of(flags: list[str]) -> tuple[str, bool]:
    """What a way's flags run: ("all" or "e2e", with --checkpoint or not); the last --stage counts."""
    args = build_parser().parse_args(flags)
    return ("e2e" if args.stage == "e2e" else "all"), "--checkpoint" in flags


def run_way(way: str, run_dir: Path, flags: list[str], log: Path, ways: dict[str, list[str]]) -> dict:
    """One seqtrain process, timed; its records read back from the run directory. A way's own flags come after
    the common ones, so they override them."""
    cmd = [sys.executable, "-m", "seqtrain.run", "--run-dir", str(run_dir), *flags, *ways[way]]
    with open(log, "a") as f, CpuWait() as wait:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        t0 = time.perf_counter()
        # in this directory, as the flags' relative paths (--data-dir) were meant, with this checkout's seqtrain
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}).returncode
        wall = time.perf_counter() - t0
    if code != 0:
        sys.exit(f"benchmarks/timing.py: {' '.join(cmd)} exited {code}; see {log}")
    return {"wall_s": round(wall, 1), "cpu_wait_share": wait.share and round(wait.share, 3),
            "parts": parts(*stage_of(ways[way]), RunDir(run_dir))}


def epoch_sums(metrics: Path) -> dict:
    """Seconds of every epoch in a metrics.jsonl, and of its loader waits and validation passes."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return {"epochs": len(rows), "epochs_s": sum(r["seconds"] for r in rows),
            "loader_wait_s": sum(r.get("loader_wait_seconds", 0.0) for r in rows),
            "validation_s": sum(r.get("val_seconds", 0.0) for r in rows)}


def parts(stage: str, checkpoint: bool, run: RunDir) -> list[dict]:
    """Where a finished run's time went: one entry per stage and the final network's accuracy, or one for e2e."""
    cfg = Config.from_dict(read_json(run.config))
    results = collect_results(cfg, resolve(cfg), run)
    if stage == "e2e":
        record = results["e2e_checkpoint" if checkpoint else "e2e"]
        return [{"part": "e2e+ckpt" if checkpoint else "e2e", "train_s": record["train_seconds"], "cache_s": 0.0,
                 "test_acc": record["test_acc"], **epoch_sums(run.e2e_home(checkpoint) / "metrics.jsonl")}]
    return [{"part": f"stage {s['stage']}", "train_s": s["train_seconds"], "cache_s": s["cache_seconds"],
             "test_acc": s["test_acc"], **epoch_sums(run.stage(s["stage"]) / "metrics.jsonl")}
            for s in results["stages"]] + [{"part": "final network", "train_s": 0.0, "cache_s": 0.0,
                                            "test_acc": results["final"]["test_acc"], "epochs": 0, "epochs_s": 0.0,
                                            "loader_wait_s": 0.0, "validation_s": 0.0}]


def step_time(loss_fn, steps: int, device: torch.device) -> float:
    """Mean seconds of `loss_fn().backward()`, after one warm-up call (the allocator, the kernels' first use)."""
    loss_fn().backward()
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss_fn().backward()
    sync()
    return (time.perf_counter() - t0) / steps


def head_shares(cfg: Config, steps: int = 5) -> list[dict]:
    """Each stage's auxiliary head: its share of one training step (forward and backward), on random inputs
    of the stage's shape at the run's batch size and on its device, timed after a warm-up step."""
    layout, device = resolve(cfg), resolve_device(cfg.device)
    classes = dataset_info(cfg)["num_classes"]
    out, shape = [], tuple(layout.in_shape)
    for k in range(layout.num_stages):
        block, out_shape = build_stage(cfg, layout, k, shape)
        model = StageModel(block, build_head(cfg, out_shape[0], classes, layout.specs_after(k))).to(device)
        x = torch.randn(cfg.batch_size, *shape, device=device)
        y = torch.randint(0, classes, (cfg.batch_size,), device=device)
        feats = model.block(x).detach().requires_grad_()
        whole = step_time(lambda: F.cross_entropy(model(x), y), steps, device)  # noqa: B023 (called at once)
        head = step_time(lambda: F.cross_entropy(model.head(feats), y), steps, device)  # noqa: B023
        out.append({"stage": k, "step_ms": round(1000 * whole, 1), "head_ms": round(1000 * head, 1),
                    "head_share": round(head / whole, 3)})
        shape = out_shape
    return out


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per way: the mean wall-clock over the rounds and the mean of each part's figures."""
    out = {}
    for way, rounds in runs.items():
        walls = [r["wall_s"] for r in rounds]
        names = [p["part"] for p in rounds[0]["parts"]]
        waits = [r["cpu_wait_share"] for r in rounds]
        out[way] = {"wall_s": round(statistics.mean(walls), 1), "rounds_s": walls,
                    # the share of the time some task waited for a CPU: near 0 when the way ran alone
                    "cpu_wait": "n/a" if None in waits else f"{100 * max(waits):.0f}%",
                    # to a tenth of a millisecond: a small run's validation takes a few milliseconds
                    "parts": [{"part": name, **{key: round(statistics.mean(r["parts"][i][key] for r in rounds), 4)
                                                for key in
                                                ("train_s", "cache_s", "epochs_s", "loader_wait_s", "validation_s")},
                               "test_acc": rounds[0]["parts"][i]["test_acc"],
                               "epochs": rounds[0]["parts"][i]["epochs"]} for i, name in enumerate(names)]}
    return out


def judge(runs: dict[str, list[dict]], summary: dict) -> dict[str, dict]:
    """Each target's ratio of mean wall-clocks, judged only when both ways ran (near) alone: `judged` is False
    when some round of either waited for a CPU more than CONTENDED of its time."""
    out = {}
    for name in TARGETS:
        a, b = name.split(" / ")
        if a not in runs or b not in runs:  # --ways left one of them out
            continue
        waits = [r["cpu_wait_share"] for way in (a, b) for r in runs[way] if r["cpu_wait_share"] is not None]
        out[name] = {**target(name, round(summary[a]["wall_s"] / summary[b]["wall_s"], 3), TARGETS),
                     "cpu_wait": max(waits, default=None), "judged": max(waits, default=0.0) <= CONTENDED}
    return out


def ratio(wall: float, e2e: float | None) -> str:
    """A way's wall-clock over end to end's, or a dash when --ways left end to end out."""
    return f"{wall / e2e:5.2f}" if e2e else f"{'-':>5}"


def table(summary: dict, heads: list[dict]) -> str:
    e2e = summary["e2e"]["wall_s"] if "e2e" in summary else None
    lines = ["way        wall s (rounds)           / e2e  training s  of which loader waits  validation  caching s"
             "  test acc  CPU wait"] if summary else []
    for way, s in summary.items():
        train = sum(p["train_s"] for p in s["parts"])
        lines.append(f"{way[:9]:9s}  {s['wall_s']:7.1f} ({', '.join(f'{w:.0f}' for w in s['rounds_s'])})"
                     f"{'':{max(1, 16 - 5 * len(s['rounds_s']))}}{ratio(s['wall_s'], e2e)}  {train:10.1f}  "
                     f"{sum(p['loader_wait_s'] for p in s['parts']):21.1f}  "
                     f"{sum(p['validation_s'] for p in s['parts']):10.1f}  "
                     f"{sum(p['cache_s'] for p in s['parts']):9.1f}  {s['parts'][-1]['test_acc']:.4f}  "
                     f"{s['cpu_wait']}")
    lines.append("head's share of a training step, per stage: " + ", ".join(
        f"stage {h['stage']} {100 * h['head_share']:.0f}% ({h['head_ms']:.0f} of {h['step_ms']:.0f} ms)"
        for h in heads))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                epilog="Every other flag is passed to each seqtrain command, e.g. --head-pool 8.")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds of the ways (default: 2)")
    p.add_argument("--ways", default=",".join(WAYS), help=f"which of the four ways to run, comma-separated "
                   f"(default: {','.join(WAYS)}); a target is judged only when both of its ways ran")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/timing"), help="output directory")
    p.add_argument("--also", action="append", default=[], metavar="NAME=FLAGS", help="one more way, interleaved "
                   "with the four, e.g. 'all, full-resolution head=--stage all --head-pool 0' (its flags override "
                   "the common ones)")
    p.add_argument("--heads-only", action="store_true", help="only time each stage's head against its step (seconds)")
    args, flags = p.parse_known_args(argv)
    chosen = [w.strip() for w in args.ways.split(",") if w.strip()]
    if not chosen or set(chosen) - set(WAYS):
        p.error(f"--ways {args.ways!r}: choose among {', '.join(WAYS)}")
    ways = {w: WAYS[w] for w in WAYS if w in chosen}
    for also in args.also:
        name, sep, extra = also.partition("=")
        if not sep or not extra.strip():
            p.error(f"--also {also!r}: give NAME=FLAGS, e.g. 'all, head 0=--stage all --head-pool 0'")
        if name.strip() in WAYS:  # the targets compare the four ways: none of them may be replaced
            p.error(f"--also {also!r}: {name.strip()!r} is one of the four ways ({', '.join(WAYS)}); "
                    "name yours otherwise")
        ways[name.strip()] = extra.split()
    flags = ["--device", "cpu", *flags]  # the CPU unless the flags say otherwise (the last --device counts)
    out = args.out.absolute()
    cfg = parse_config(flags, out / "runs" / "flags")  # a mistake in the flags stops here, before any run
    if args.heads_only:
        heads = head_shares(cfg, steps=10)
        print(table({}, heads))
        print(json.dumps({"benchmark": "timing-heads", "torch": torch.__version__, "flags": flags,
                          "device_name": device_description(cfg.device), "heads": heads}))
        return {"heads": heads}
    load_raw(cfg)  # the dataset is made once, outside every timed run
    (out / "runs").mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {way: [] for way in ways}
    for r in range(args.rounds):
        for i, way in enumerate(list(ways) if r % 2 == 0 else list(reversed(ways))):
            run_dir = out / "runs" / f"round{r}-{i}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            runs[way].append(run_way(way, run_dir, flags, out / "timing.log", ways))
            print(f"  round {r + 1} {way}: {runs[way][-1]['wall_s']} s", file=sys.stderr, flush=True)
    summary = summarize(runs)
    heads = head_shares(cfg)
    result = {"benchmark": "timing", "torch": torch.__version__, "device_name": device_description(cfg.device),
              "flags": flags, "rounds": args.rounds, "threads": torch.get_num_threads(), "ways": summary,
              "runs": runs, "heads": heads, "targets": judge(runs, summary)}
    write_json(out / "timing.json", result)
    print(table(summary, heads))
    if not result["targets"]:
        print(f"no target judged: each compares two of the ways ({', '.join(TARGETS)}), and --ways ran "
              f"{', '.join(ways)}")
    for name, t in result["targets"].items():
        verdict = "met" if t["met"] else "MISSED"
        if not t["judged"]:
            verdict += f", not judged: up to {100 * t['cpu_wait']:.0f}% CPU wait from other work; rerun alone"
        print(f"{name}: {t['value']:.3f} (target {t['target']}: {verdict})")
    print(json.dumps({k: result[k] for k in ("benchmark", "torch", "device_name", "flags", "rounds", "targets")}))
    return result


if __name__ == "__main__":
    main()
