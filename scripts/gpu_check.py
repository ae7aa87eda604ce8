"""The first GPU check: on a machine with a CUDA GPU, run in one go what only a GPU can show, and write every
figure into one JSON (docs/gpu.md).

    scripts/gpu_check.sh OUT               # OUT/gpu_check.json; each step's output in OUT/logs/
    scripts/gpu_check.sh OUT --rehearse    # every step on the CPU at toy sizes: a check of this script itself

Steps, each timed and each with a time limit inside a total of 9.5 minutes (estimated at 5 to 7 minutes on
one H100/H200; not yet timed on a GPU). A step that fails or runs out of time is recorded, with the end of
its output, and the others still run; the exit status is 1 if any step failed or a check did not hold:

  environment  torch, CUDA and cuDNN versions, the GPUs, the driver, the commit
  probe        what the libraries allocate beside the tensors: cuBLAS's workspace after the first matmul,
               the transient extra of a convolution's forward and backward (cuDNN workspaces)
  plan         python -m seqtrain.run --plan --json on the small preset: every stage's predicted peak
  stages       python -m seqtrain.run --stage all on the small preset, then --stage e2e: per stage the
               measured tensor peak (CUDA allocator) against the plan, training and caching seconds and
               samples per second
  cuda_init    whether --plan with --device cpu leaves CUDA uninitialised (issue 24, item 3)
  bench        python benchmarks/memory.py --device cuda --quick: ratios (peak, floor, loader efficiency), rows
  budget       the same with --budget-mb 64 over --depths 8,20,56 (GPU_CHECK_DEPTHS to change them)
  torchrun     --stage all as 2 NCCL ranks, where 2 GPUs are visible; skipped on one
  tests        the CUDA-relevant tests: the fake-CUDA runs, the memory windows, and the launches that must
               stay on the CPU while a GPU is visible (the gloo torchrun tests among them)

With no GPU visible it stops at once with one line and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOTAL_S = 570  # the whole check: under 10 minutes with room for the environment and the JSON
MB = 2**20

# The small preset: the README's run (CIFAR ResNet-20 in 4 stages on the embedded synthetic data) at 4 epochs.
PRESET = ["--n-train", "10000", "--n-test", "2000", "--stages", "4", "--max-epochs", "4", "--batch-size", "128"]
# --rehearse: the tests' tiny configuration (tests/conftest.py) and benchmark (tests/test_memory_benchmark.py)
TOY = ["--n-train", "400", "--n-test", "100", "--width", "4", "--head-width", "8", "--stages", "2",
       "--max-epochs", "1", "--batch-size", "32", "--shard-mb", "1"]
TOY_BENCH = ["--arch", "resnet20", "--width", "4", "--stages", "2", "--batch-size", "16", "--steps", "2",
             "--warmup", "1", "--samples", "128"]
CUDA_TESTS = ["tests/test_fake_cuda.py", "tests/test_memory.py", "tests/test_distributed.py",
              "tests/test_rank_reading.py", "tests/test_errors.py", "tests/test_variants_benchmark.py"]


# --------------------------------------------------------------------------------------------------------
# Running the steps


class Steps:
    """Runs commands against one deadline, each in its own process group, logging to OUT/logs/NAME.log."""

    def __init__(self, out: Path):
        self.out, self.logs = out, out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + TOTAL_S
        self.record: dict[str, dict] = {}

    def run(self, name: str, argv: list[str], cap_s: float, env: dict | None = None) -> dict:
        left = self.deadline - time.monotonic()
        if left < 20:
            self.record[name] = {"ok": False, "skipped": "out of time", "command": shlex.join(argv)}
            return self.record[name]
        log = self.logs / f"{name}.log"
        t0 = time.perf_counter()
        with open(log, "w") as f:
            # A session of its own: on timeout the whole group goes (torchrun's ranks, the benchmark's children).
            path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # this checkout's seqtrain
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                                    env={**os.environ, "PYTHONPATH": path, **(env or {})})
            try:
                code = proc.wait(timeout=min(cap_s, left))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                code = None
        text = log.read_text(errors="replace")
        self.record[name] = {"ok": code == 0, "exit_status": code, "timed_out": code is None,
                             "seconds": round(time.perf_counter() - t0, 1), "command": shlex.join(argv),
                             "log": str(log.relative_to(self.out)), **({} if code == 0 else {"tail": text[-2000:]})}
        return self.record[name]

    def output(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")


# --------------------------------------------------------------------------------------------------------
# Figures


def stage_figures(plan: dict, results: dict, e2e: dict | None) -> dict:
    """Every stage's measured peaks against the plan's prediction, its times and its throughput."""
    train_n = plan["splits"]["train"]
    rows = []
    for s in results["stages"]:
        p = plan["stages"][s["stage"]]
        tm, cm = s["train_memory"], s["cache_memory"]
        cached = train_n * plan["cache_views"] + plan["splits"]["val"] + plan["splits"]["test"]
        rows.append({
            "stage": s["stage"], "blocks": p["blocks"],
            "train_peak_mb": tm["peak_tensor_mb"], "predicted_train_mb": round(p["train_bytes"] / MB, 1),
            "train_peak_over_predicted": ratio(tm["peak_tensor_mb"], p["train_bytes"] / MB),
            "train_allocated_at_start_mb": tm.get("cuda_at_start_mb"), "train_reserved_mb": tm.get("cuda_reserved_mb"),
            "train_peak_above_start_over_predicted": ratio(tm["peak_tensor_mb"] - (tm.get("cuda_at_start_mb") or 0),
                                                           p["train_bytes"] / MB),
            "cache_peak_mb": cm["peak_tensor_mb"], "predicted_cache_pass_mb": round(p["caching_pass_bytes"] / MB, 1),
            "cache_peak_over_predicted": ratio(cm["peak_tensor_mb"], p["caching_pass_bytes"] / MB),
            "cache_allocated_at_start_mb": cm.get("cuda_at_start_mb"), "cache_reserved_mb": cm.get("cuda_reserved_mb"),
            "tensor_source": tm.get("tensor_source"),
            "epochs": s["epochs"], "train_seconds": s["train_seconds"], "cache_seconds": s["cache_seconds"],
            # wall time of training, evaluation after every epoch included
            "train_samples_per_s": ratio(train_n * s["epochs"], s["train_seconds"]),
            "cache_samples_per_s": ratio(cached, s["cache_seconds"]),
            "cache_mb": s["cache_mb"], "predicted_cache_mb": round(p["cache_bytes"] / MB, 1),
            "test_acc": s["test_acc"]})
    out = {"stages": rows, "final_test_acc": (results.get("final") or {}).get("test_acc")}
    if e2e:
        predicted = plan["e2e"]["train_bytes"] / MB
        out["e2e"] = {"train_peak_mb": e2e["peak_tensor_mb"], "predicted_train_mb": round(predicted, 1),
                      "train_peak_over_predicted": ratio(e2e["peak_tensor_mb"], predicted),
                      "train_allocated_at_start_mb": e2e["train_memory"].get("cuda_at_start_mb"),
                      "train_seconds": e2e["train_seconds"], "epochs": e2e["epochs"],
                      "train_samples_per_s": ratio(train_n * e2e["epochs"], e2e["train_seconds"]),
                      "test_acc": e2e["test_acc"]}
        largest = max(r["train_peak_mb"] for r in rows) if rows else None
        out["largest_stage_over_e2e"] = ratio(largest, e2e["peak_tensor_mb"]) if largest else None
        out["predicted_largest_stage_over_e2e"] = plan["largest_stage_ratio"]
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def publish_copy(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` through a temporary file and a rename, so `dest` is whole or absent."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, dest)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def first_json(text: str):
    """The JSON object a command printed, whatever warnings came before it (stderr shares the log)."""
    for m in re.finditer(r"^\{", text, re.MULTILINE):
        try:
            return json.JSONDecoder().raw_decode(text[m.start():])[0]
        except ValueError:
            continue
    return None


def last_json_line(text: str):
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def junit_counts(path: Path) -> dict | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    counts = {k: int(suite.get(k, 0)) for k in keys}
    counts["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                              if c.find("failure") is not None or c.find("error") is not None]
    return counts


# --------------------------------------------------------------------------------------------------------
# In a fresh process: what the CUDA libraries allocate beside the tensors


def probe() -> dict:
    """cuBLAS's workspace (kept from the first matmul on) and a convolution step's transient extra (cuDNN)."""
    import torch

    dev = torch.device("cuda")
    a, b = torch.randn(512, 512, device=dev), torch.randn(512, 512, device=dev)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    c = a @ b
    torch.cuda.synchronize()
    cublas = torch.cuda.memory_allocated() - before - c.nbytes
    # A CIFAR ResNet convolution at batch 128, forward and backward: its peak above the tensors it makes
    # (output, output gradient made contiguous, input and weight gradients) is cuDNN's workspace.
    conv = torch.nn.Conv2d(16, 16, 3, padding=1, bias=False).to(dev)
    x = torch.randn(128, 16, 32, 32, device=dev, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    conv(x).sum().backward()
    torch.cuda.synchronize()
    made = 2 * x.nbytes + x.grad.nbytes + conv.weight.grad.nbytes
    peak = torch.cuda.max_memory_allocated() - start
    return {"cublas_workspace_mb": round(cublas / MB, 2), "conv_step_peak_mb": round(peak / MB, 2),
            "conv_step_tensors_mb": round(made / MB, 2), "conv_step_extra_mb": round((peak - made) / MB, 2),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
            "cudnn_benchmark": torch.backends.cudnn.benchmark}


def cuda_init_after_plan() -> dict:
    """Does `--plan --device cpu` initialise CUDA? It must not (issue 24 item 3: hundreds of MB on GPU 0)."""
    import contextlib
    import io

    import torch

    from seqtrain.run import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main(["--plan", "--device", "cpu", "--run-dir", os.environ["GPU_CHECK_RUN_DIR"]])
    return {"exit_status": code, "cuda_initialized": torch.cuda.is_initialized()}


def environment(rehearse: bool) -> dict:
    import torch

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if not rehearse else [],
           "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "cpus": os.cpu_count(),
           "python": sys.version.split()[0], "rehearsal": rehearse}
    if not rehearse:
        props = torch.cuda.get_device_properties(0)
        env["gpu0_memory_mb"] = round(props.total_memory / MB)
        env["gpu0_capability"] = f"{props.major}.{props.minor}"
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["nvidia_smi"] = smi.stdout.strip().splitlines()
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    env["commit"] = git.stdout.strip() or None
    return env


def no_gpu_message() -> str | None:
    """None when torch sees a CUDA GPU; else why not, in one line."""
    try:
        import torch
    except ImportError:  # a python outside the environment seqtrain is installed in
        return (f"gpu_check: error: {sys.executable} has no torch; activate the environment seqtrain is installed "
                "in (. .venv/bin/activate) or name its python with PYTHON=.venv/bin/python")

    if torch.cuda.is_available():
        return None
    why = (f"torch {torch.__version__} is a CPU-only build" if torch.version.cuda is None
           else f"torch {torch.__version__} (CUDA {torch.version.cuda}) finds no usable GPU")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        why += f", CUDA_VISIBLE_DEVICES={visible!r}"
    if not shutil.which("nvidia-smi"):
        why += ", no nvidia-smi on PATH"
    return (f"gpu_check: error: no CUDA GPU is visible ({why}); run this on a machine with a GPU, or add "
            "--rehearse to try the script on the CPU")


# --------------------------------------------------------------------------------------------------------
# The check


def check(out: Path, rehearse: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    steps = Steps(out)
    device = "cpu" if rehearse else "cuda"
    flags = [*(TOY if rehearse else PRESET), "--device", device]
    preset = [*flags, "--data-dir", str(work / "data")]
    python = sys.executable
    me = [python, str(Path(__file__).resolve())]
    report: dict = {"environment": environment(rehearse), "steps": steps.record, "checks": {}}
    t0 = time.perf_counter()

    if not rehearse:
        steps.run("probe", [*me, str(out), "--part", "probe"], 60)
        report["probe"] = last_json_line(steps.output("probe"))

    run_dir = str(work / "run")
    steps.run("plan", [python, "-m", "seqtrain.run", "--plan", "--json", *preset, "--run-dir", run_dir], 60)
    plan = first_json(steps.output("plan"))
    steps.run("stages", [python, "-m", "seqtrain.run", "--stage", "all", *preset, "--run-dir", run_dir], 200)
    steps.run("e2e", [python, "-m", "seqtrain.run", "--stage", "e2e", *preset, "--run-dir", run_dir], 120)
    results = read_json(work / "run" / "final" / "results.json")
    e2e = read_json(work / "run" / "e2e" / "results.json")
    if plan and results:
        report["run"] = {"flags": flags, **stage_figures(plan, results, e2e)}
        report["checks"]["stage peaks come from the CUDA allocator"] = rehearse or all(
            r["tensor_source"] == "cuda allocator" for r in report["run"]["stages"])

    steps.run("cuda_init", [*me, str(out), "--part", "cuda_init"], 60,
              env={"GPU_CHECK_RUN_DIR": str(work / "plan-cpu")})
    report["cuda_init"] = last_json_line(steps.output("cuda_init"))
    if report["cuda_init"] and not rehearse:
        report["checks"]["--plan --device cpu leaves CUDA uninitialised"] = not report["cuda_init"]["cuda_initialized"]

    bench = ["--device", device, *(TOY_BENCH if rehearse else ["--quick"])]
    steps.run("bench", [python, "benchmarks/memory.py", *bench, "--out", str(work / "bench")], 150)
    saved = read_json(work / "bench" / "memory.json")
    if saved:
        report["bench"] = {"summary": saved["summary"],
                           "rows": {name: {"tensor_peak_mb": round(row["tensor"]["peak"] / MB, 1),
                                           "reserved_mb": mb(row["peak"]["cuda_reserved"]),
                                           "allocated_at_start_mb": row["tensor"].get("cuda_at_start_mb"),
                                           "step_ms": round(row["step_ms"], 2),
                                           "samples_per_s": round(row["samples_per_s"], 1)}
                                    for name, row in saved["rows"].items()}}
        publish_copy(work / "bench" / "memory.json", out / "memory.json")
    depths = os.environ.get("GPU_CHECK_DEPTHS", "8,14" if rehearse else "8,20,56")
    steps.run("budget", [python, "benchmarks/memory.py", *bench, "--budget-mb", "64", "--depths", depths,
                         "--out", str(work / "budget")], 180)
    saved = read_json(work / "budget" / "budget.json")
    if saved:
        report["budget"] = saved
        publish_copy(work / "budget" / "budget.json", out / "budget.json")

    gpus = 0 if rehearse else gpu_count()
    if gpus >= 2:
        steps.run("torchrun", [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
                               "seqtrain.run", "--stage", "all", *preset, "--run-dir", str(work / "torchrun")], 150)
        ranks = read_json(work / "torchrun" / "final" / "results.json")
        if plan and ranks:
            report["torchrun"] = stage_figures(plan, ranks, None)
    else:
        steps.record["torchrun"] = {"ok": True, "skipped": f"{gpus} GPU(s) visible; 2 NCCL ranks need 2"}

    tests = ["tests/test_memory.py"] if rehearse else CUDA_TESTS
    steps.run("tests", [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests,
                        "--junitxml", str(steps.logs / "tests.xml")], 240)
    report["tests"] = junit_counts(steps.logs / "tests.xml")

    report["headline"] = headline(report)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    failed = [n for n, s in steps.record.items() if not s["ok"]] + [c for c, ok in report["checks"].items() if not ok]
    report["failed"] = failed
    tmp = out / "gpu_check.json.tmp"  # written whole, then renamed: a killed check leaves no torn JSON
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "gpu_check.json")
    shutil.rmtree(work, ignore_errors=True)  # caches and data: gigabytes, and every figure is in the JSON
    print(f"gpu_check: {len(steps.record)} steps in {report['seconds']:.0f} s; "
          + (f"FAILED: {', '.join(failed)}" if failed else "all passed") + f"; figures in {out / 'gpu_check.json'}")
    return 1 if failed else 0


def headline(report: dict) -> dict:
    """The figures to read first: how far the measured peaks are from the plan, and what the libraries add."""
    run, bench = report.get("run") or {}, (report.get("bench") or {}).get("summary") or {}
    train = [r["train_peak_over_predicted"] for r in run.get("stages", []) if r["train_peak_over_predicted"]]
    return {"largest_stage_over_e2e": run.get("largest_stage_over_e2e"),
            "predicted_largest_stage_over_e2e": run.get("predicted_largest_stage_over_e2e"),
            "stage_peak_over_predicted_max": max(train, default=None),
            "stage_peak_over_predicted_min": min(train, default=None),
            "cublas_workspace_mb": (report.get("probe") or {}).get("cublas_workspace_mb"),
            "bench_floor_ratio": bench.get("floor_ratio"), "bench_peak_ratio": bench.get("peak_ratio"),
            "bench_loader_efficiency": bench.get("loader_efficiency"),
            "budget_depth_ratio": ((report.get("budget") or {}).get("summary") or {}).get("depth_ratio")}


def mb(n: int | None) -> float | None:
    return None if n is None else round(n / MB, 1)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu_check.json and the logs (created)")
    p.add_argument("--rehearse", action="store_true", help="every step on the CPU at toy sizes")
    p.add_argument("--part", choices=("probe", "cuda_init"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.part:  # one measurement in a fresh process; its JSON is the last line
        print(json.dumps(probe() if args.part == "probe" else cuda_init_after_plan()))
        return 0
    if not args.rehearse and (message := no_gpu_message()):
        print(message, file=sys.stderr)
        return 2
    return check(args.out, args.rehearse)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # seqtrain, when the script runs from elsewhere
    sys.exit(main())
