"""Kill a tiny `--stage all` run with SIGKILL at N random moments, rerun until it completes, and compare the
result with an uninterrupted run of the same seed.

    python scripts/killtest.py --kills 20             # about 3 minutes on 2 CPU cores
    python scripts/killtest.py --kills 20 --ranks 2   # under torchrun, 2 gloo ranks: about 5 minutes

With --ranks N every run is `torchrun --standalone --nproc-per-node N` (gloo on the CPU, one thread per
rank), and each kill is a SIGKILL of torchrun and of every rank at once, as a lost machine or a scheduler's
kill would be; the reference is an uninterrupted N-rank run.

After every kill it checks that the run directory holds no torn state: every published manifest is intact
and every shard it names has its recorded size and checksum. Whenever a rerun completes (before its kill
came, or at the end), every stage's weights, every cache's fingerprint (which covers the sha256 of every
shard) and the final accuracy must equal the uninterrupted run's; the next kills then start on a fresh
run directory. Prints one line per kill and, last, a JSON summary; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from seqtrain.cache import read_manifest, verify_shards  # noqa: E402
from seqtrain.files import load_torch  # noqa: E402

# --device cpu, also with --ranks 1: the comparison is bit for bit, which the CPU's arithmetic guarantees and
# cuDNN's default algorithms do not; and --device auto would make --ranks 2 NCCL ranks on a GPU machine,
# which stop at local rank 1 where there is one GPU.
TINY = ["--stage", "all", "--n-train", "600", "--n-test", "200", "--width", "4", "--head-width", "8",
        "--stages", "3", "--max-epochs", "3", "--batch-size", "32", "--shard-mb", "1", "--device", "cpu"]


def command(base: Path, ranks: int) -> list[str]:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "seqtrain.run", *TINY, "--run-dir", str(base / "run"),
            "--data-dir", str(base / "data")]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per rank, as torchrun itself advises


def run_to_end(base: Path, ranks: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(command(base, ranks), check=True, capture_output=True, cwd=ROOT, env=ENV if ranks > 1 else None)
    return time.perf_counter() - t0


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the process and all its descendants at once (torchrun starts each rank in a session of its own,
    so a signal to torchrun's process group would not reach them)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait()
    psutil.wait_procs(family, timeout=30)


def check_consistent(run: Path) -> None:
    """Whatever a kill left must be either complete and intact, or recognisably incomplete."""
    for cache in sorted(run.glob("stage_*/cache")):
        manifest = read_manifest(cache)  # raises CorruptCache on a torn or altered manifest
        if manifest is not None:
            verify_shards(cache, manifest)
    for ckpt in run.glob("**/*.pt"):
        load_torch(ckpt)  # a published checkpoint always loads


def outcome(run: Path) -> dict:
    stages = sorted(run.glob("stage_*"))
    return {
        "weights": [load_torch(s / "block.pt") for s in stages],
        "fingerprints": [read_manifest(s / "cache").fingerprint for s in stages],
        "final": json.loads((run / "final" / "results.json").read_text())["final"],
    }


def same(a: dict, b: dict) -> bool:
    if a["fingerprints"] != b["fingerprints"] or a["final"] != b["final"]:
        return False
    return all(torch.equal(x[part][k], y[part][k]) for x, y in zip(a["weights"], b["weights"])
               for part in ("block", "head") for k in x[part])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kills", type=int, default=20, help="number of SIGKILLs, each at a random moment")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--ranks", type=int, default=1, help="ranks under torchrun (gloo, CPU); 1 runs without torchrun")
    args = p.parse_args()
    rng = random.Random(args.seed)

    with tempfile.TemporaryDirectory() as tmp:
        reference, victim = Path(tmp) / "reference", Path(tmp) / "victim"
        duration = run_to_end(reference, args.ranks)
        print(f"uninterrupted run: {duration:.1f}s")
        expected = outcome(reference / "run")
        kills, completions, differing = 0, 0, 0
        while kills < args.kills:
            delay = rng.uniform(0.5, duration)
            proc = subprocess.Popen(command(victim, args.ranks), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                    cwd=ROOT, env=ENV if args.ranks > 1 else None)
            try:
                proc.wait(timeout=delay)
            except subprocess.TimeoutExpired:
                kill_job(proc)
                kills += 1
                check_consistent(victim / "run")
                done = sorted(p.parent.parent.name for p in (victim / "run").glob("stage_*/cache/manifest.json"))
                print(f"kill {kills:2d} at {delay:5.2f}s: complete stages {done or 'none'}")
                continue
            # The rerun completed before its kill came: it must match, then the next kills start afresh.
            assert proc.returncode == 0, f"a rerun failed with exit status {proc.returncode}"
            completions += 1
            differing += not same(expected, outcome(victim / "run"))
            shutil.rmtree(victim / "run")
        run_to_end(victim, args.ranks)
        completions += 1
        differing += not same(expected, outcome(victim / "run"))
    identical = differing == 0
    summary = {"kills": kills, "ranks": args.ranks, "completed_runs_compared": completions, "differing": differing,
               "identical": identical, "torch": torch.__version__}
    print(f"{kills} kills, {completions} resumed runs completed: "
          + ("all identical to the uninterrupted run" if identical else f"{differing} DIFFERENT"))
    print(json.dumps(summary))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
