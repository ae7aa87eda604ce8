"""Peak memory, step time and cache disk of every stage of sequential training, against end-to-end
back-propagation with and without activation checkpointing: the measurement behind seqtrain's claim.

Run from the repository root (matplotlib draws the plots: pip install -e ".[bench]"):

    python -m benchmarks.memory                           # CIFAR ResNet-18, 4 stages, batch 128, CUDA if any
    python -m benchmarks.memory --device cpu --quick      # ResNet-20, width 16, batch 64: ~1 min, 2 cores
    python -m benchmarks.memory --quick --budget-mb 64    # deeper than memory allows: e2e vs --stages auto
    python -m benchmarks.memory_report OUT                # reprint and redraw from OUT's JSON, measuring nothing

(`python benchmarks/memory.py ...` works the same.)

Each configuration runs in a fresh subprocess (this script with --child), so every peak is its own:
  e2e       the whole network (network.build_network) trained by train.train_step
  e2e+ckpt  the same with every block checkpointed as --checkpoint does it (recompute.py)
  cache k   stage k's caching pass: its frozen block over every split, written by cache.write_shards, reading
            stage k-1's cache through loader.CachedBatches (stage 0: raw images); it makes stage k+1's input
  stage k   block k + its head trained from stage k-1's cache through the streaming loader, built by
            streams.cached_batches, so the loader's buffers count (stage 0: from raw images)
  ram k     stage k fed from the same features preloaded into RAM as float32 (its peak holds the whole split
            in RAM, so only its speed is compared); then, in the same process, stage k trained from the cache
            and from RAM in alternating blocks of steps: loader_efficiency

It measures memory and speed, not accuracy: images are random uint8 tensors held in memory (batches.ImageBatches
normalises them as it does real ones) and every block is freshly initialised rather than trained; neither
changes a shape, a byte or a FLOP. Caches are read right after they are written, so from the page cache.

Per configuration: the tensor-level peak, the figure every ratio compares (CUDA: max_memory_allocated, with
max_memory_reserved beside it; CPU: MemTracker's count of live tensors over 2 steady training steps watched
apart from the timed ones, or over the caching pass's first batches, see memory.PeakMemory); the process's
resident set above its imports beside it (memory.ProcessPeak); the analytic bytes of its first step
(memory.analytic_step) beside plan.py's prediction; the median step time (the next batch included);
samples/s over the total time (so the loader's stalls count); the share of time tasks waited for a CPU
(other jobs make timings meaningless; flagged above 25%); each cache's bytes on disk beside plan.py's.
Output: a table, a verdict (each ratio that matters against its target or its alternative), the paths of
OUT/memory.json (every figure) and OUT/memory.png and, last, a JSON line with the ratios:
  peak_ratio         largest sequential tensor peak (a stage or a caching pass) / e2e tensor peak
  ckpt_ratio         e2e+ckpt peak / e2e peak; ckpt_time_ratio its step time / e2e step time
  floor_ratio        tensor peak of the largest training stage / plan.py's predicted peak  (target <= 1.15)
  rss_peak_ratio     the same as peak_ratio, with process RSS above imports
  rss_floor_ratio    RSS of the largest stage / (its analytic bytes + its input's host memory)  (target <= 1.5,
                     with --release-memory only: without it the target is not judged, "met": null)
  loader_efficiency  the lowest over stages k >= 1 of samples/s from the cache / from RAM (target >= 0.95),
                     both timed in the ram k process, in alternating blocks of 5 steps

--budget-mb measures, at each of --depths, end to end and every stage cut by --stages auto --memory-budget,
and writes OUT/budget.json and OUT/budget.png. Both sides are judged alike: a configuration fits when its
tensor peak (CUDA: max_memory_allocated; CPU: MemTracker) is at most the budget. Depths above --sample-above
(ResNet-1202: 150 stages) are sampled, and the table says so: end to end's peaks are --plan's predictions,
and of the stages only the training peaks of the 3 that --plan predicts to be the largest and of evenly
spaced others are measured, each on random features of its input's shape (no cache is written: a caching
pass holds less than training, with no gradients, optimizer state or saved activations). Nothing is capped: a cap
(set_per_process_memory_fraction) could only act on reserved memory, which the allocator rounds up to
2 and 20 MiB segments, and it would hold e2e alone to that other figure. A configuration that runs out of
the GPU's own memory is recorded as OOM, a stage's as not fitting. The JSON is written before anything is drawn (by
memory_report.py). A missed target is printed and marked, never dropped. Every child applies seqtrain's
host memory policy: by default glibc's adaptive mmap threshold, which keeps freed activations resident (the
RSS figures); --release-memory (seqtrain/allocator.py) returns them at once.
"""

from __future__ import annotations

import argparse
import json
import operator
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

try:
    from benchmarks import memory_report
    from benchmarks.common import CpuWait, require_plotting, target
    from benchmarks.memory_report import peak_of
except ImportError:  # python benchmarks/memory.py: this folder is on sys.path, the repository root is not
    import memory_report
    from common import CpuWait, require_plotting, target
    from memory_report import peak_of
from seqtrain.allocator import release_freed_memory
from seqtrain.archs import block_specs, cifar_resnet_n, feature_shape
from seqtrain.cache import clear_cache, publish_manifest, read_manifest, read_shard, write_shards
from seqtrain.config import Config
from seqtrain.contract import SPLITS, Identity, Manifest
from seqtrain.data import RawData, Split
from seqtrain.distributed import resolve_device
from seqtrain.files import sha256_state_dict, write_json
from seqtrain.layout import StageLayout, resolve_layout
from seqtrain.memory import PeakMemory, ProcessPeak, analytic_step, device_description
from seqtrain.models import StageModel, build_head, build_stage_block
from seqtrain.network import build_network
from seqtrain.plan import plan, split_counts
from seqtrain.recompute import blocks_of, checkpoint_module
from seqtrain.report import MB
from seqtrain.rundir import RunDir
from seqtrain.streams import cached_batches, image_batches
from seqtrain.train import autocast_for, make_optimizer, train_step

IN_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
PRESETS = {  # samples: training images (val is carved from them, test is a quarter as many)
    "full": {"arch": "resnet18", "width": 0, "stages": "4", "batch_size": 128, "samples": 5120, "steps": 20,
             "warmup": 3, "shard_mb": 32},
    # Small shards, so that a small cache still has several. 30 timed steps: the loader's comparison with RAM
    # needs them (with 8, one run measured 0.93 to 1.03 for stages that all read alike).
    "quick": {"arch": "resnet20", "width": 16, "stages": "4", "batch_size": 64, "samples": 1024, "steps": 30,
              "warmup": 2, "shard_mb": 4},
}
TARGETS = {"floor_ratio": ("<=", 1.15), "rss_floor_ratio": ("<=", 1.5), "loader_efficiency": (">=", 0.95)}
# Targets met only with a flag the user opts into, judged only when it was given: with glibc's default the resident
# set holds freed activations, about 3x the tensors (docs/memory.md), a choice of speed rather than a failure.
OPT_IN = {"rss_floor_ratio": "release_memory"}
WATCHED_STEPS = 2  # steady training steps whose tensors MemTracker counts, apart from the timed ones


@dataclass
class Job:
    """One configuration, measured in a fresh process (this script with --child and the Job as JSON)."""

    cfg: dict  # Config.to_dict()
    device: str  # "cpu" or "cuda"
    run_dir: str  # where the caches go; stage k reads cache k-1
    steps: int  # timed steps after warm-up
    warmup: int  # untimed steps first; the first is counted by analytic_step
    kind: str = "e2e"  # e2e, ckpt (e2e+ckpt), cache (stage's caching pass), stage, ram (stage fed from RAM),
    # sample (a stage of a network too deep to cache every stage of: trained on random features of its input's
    # shape, which hold the same tensors as cached ones)
    stage: int = 0

    @property
    def name(self) -> str:
        return self.kind if self.kind in ("e2e", "ckpt") else f"{self.kind} {self.stage}"


# --------------------------------------------------------------------------------------------------------
# Inside a child: one configuration


def random_raw(cfg: Config) -> RawData:
    """Random uint8 images in every split, with the split sizes a real dataset of cfg's size would have."""
    g = torch.Generator().manual_seed(cfg.seed)

    def split(n: int) -> Split:
        x = torch.randint(0, 256, (n, *IN_SHAPE), dtype=torch.uint8, generator=g)  # N, C, H, W
        return Split(x, torch.randint(0, NUM_CLASSES, (n,), generator=g), torch.arange(n))

    counts = split_counts(cfg)
    return RawData(*(split(counts[s]) for s in SPLITS), mean=[0.5] * 3, std=[0.25] * 3, num_classes=NUM_CLASSES)


class RamBatches:
    """A cache's train split preloaded into RAM as float32 and shuffled per epoch: what the loader is held to."""

    def __init__(self, cache_dir: Path, manifest: Manifest, cfg: Config, device: torch.device):
        parts = [read_shard(cache_dir / s.file) for s in manifest.splits["train"].shards]
        x, self.y, self.ids = (torch.cat(p) for p in zip(*parts))
        self.x = x.float()
        self.batch_size, self.seed, self.device, self.epoch = cfg.batch_size, cfg.seed, device, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.y) // self.batch_size

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        for b in range(len(self)):  # full batches only, as training drops the last partial one
            idx = perm[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[idx].to(self.device, non_blocking=True), self.y[idx].to(self.device), self.ids[idx]


class RandomFeatures(RamBatches):
    """Random float32 features of a stage's input shape in RAM, as the loader hands cached ones to training."""

    def __init__(self, shape: tuple[int, int, int], n: int, cfg: Config, device: torch.device):
        g = torch.Generator().manual_seed(cfg.seed)
        self.x = torch.randn(n, *shape, generator=g)
        self.y, self.ids = torch.randint(0, NUM_CLASSES, (n,), generator=g), torch.arange(n)
        self.batch_size, self.seed, self.device, self.epoch = cfg.batch_size, cfg.seed, device, 0


def training_job(cfg: Config, layout: StageLayout, run: RunDir, kind: str, k: int, device: torch.device):
    """The model and train batches of an e2e, ckpt, stage or ram configuration, built as the pipeline builds them;
    ckpt (e2e+ckpt), and a stage with --checkpoint, checkpoint their blocks as seqtrain does (recompute.py)."""
    if kind in ("e2e", "ckpt"):
        net = build_network(cfg, layout, IN_SHAPE[0], NUM_CLASSES)
        if kind == "ckpt":
            for block in (b for stage in net.stages for b in blocks_of(stage)):
                checkpoint_module(block)  # for the life of this one-configuration process
        return net.to(device), image_batches(cfg, random_raw(cfg), "train", device, train=True)
    specs = list(layout.specs[k])
    head = build_head(cfg, specs[-1].out_ch, NUM_CLASSES, layout.specs_after(k))
    model = StageModel(build_stage_block(specs), head).to(device)
    if cfg.checkpoint:
        for block in blocks_of(model.block):
            checkpoint_module(block)
    if k == 0:
        return model, image_batches(cfg, random_raw(cfg), "train", device, train=True)
    if kind == "sample":
        shape = feature_shape([s for group in layout.specs[:k] for s in group], IN_SHAPE)
        return model, RandomFeatures(shape, split_counts(cfg)["train"], cfg, device)
    manifest = read_manifest(run.cache(k - 1))
    if kind == "ram":
        return model, RamBatches(run.cache(k - 1), manifest, cfg, device)
    return model, cached_batches(cfg, run.cache(k - 1), manifest, "train", device, train=True)


def endless(batches):
    """Batches across as many epochs as asked for, reshuffled each epoch as in training."""
    assert len(batches) > 0, "--batch-size is larger than the training split: raise --samples"
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_training(model: nn.Module, batches, cfg: Config, device: torch.device, peak: ProcessPeak,
                     steps: int, warmup: int, memory: PeakMemory) -> dict:
    """Warm up (the first step counted by analytic_step), watch the tensors of WATCHED_STEPS steps (MemTracker
    slows the ops it sees, so these are not timed), reset the process peak, then time `steps` steps."""
    optimizer, autocast = make_optimizer(cfg, model), autocast_for(device, cfg.bf16)
    model.train()
    stream = endless(batches)
    x, y, _ = next(stream)
    analytic = analytic_step(model, optimizer, x, y, autocast)
    for _ in range(warmup - 1):
        x, y, _ = next(stream)
        train_step(model, x, y, optimizer, autocast)
    for _ in range(WATCHED_STEPS):
        x, y, _ = next(stream)
        with memory.watch(model, optimizer, x, y):
            train_step(model, x, y, optimizer, autocast)
    synchronize(device)
    peak.reset()
    times = []
    with CpuWait() as wait:
        for _ in range(steps):
            t0 = time.perf_counter()
            x, y, _ = next(stream)  # waiting for the loader is part of the step
            loss, _ = train_step(model, x, y, optimizer, autocast)
            synchronize(device)
            times.append(time.perf_counter() - t0)
    assert torch.isfinite(loss), f"the loss is {loss.item()}"
    # Throughput from the total time, not the median step: the loader's stalls come every few steps.
    return {"analytic": analytic.as_dict(), "step_ms": statistics.median(times) * 1e3,
            "samples_per_s": steps * cfg.batch_size / sum(times), "cpu_wait": wait.share}


def interleaved(model: nn.Module, first, second, cfg: Config, device: torch.device, steps: int,
                block: int = 5) -> list[float]:
    """Samples/s of training from each of two batch streams, timed in alternating blocks of `block` steps
    (which goes first alternates too) in one process: a change in the machine's speed, or in what a fresh
    process gets, hits both alike: measured in their own processes, a stage read from a kept split (no loader
    work but float16 to float32) and its RAM-fed twin differed by 40% in median step time here."""
    optimizer, autocast = make_optimizer(cfg, model), autocast_for(device, cfg.bf16)
    streams, seconds = [endless(first), endless(second)], [0.0, 0.0]
    for stream in streams:  # each stream's first batches (the kept split's one read) are not timed
        for _ in range(2):
            x, y, _ = next(stream)
            train_step(model, x, y, optimizer, autocast)
    for r, done in enumerate(range(0, steps, block)):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(min(block, steps - done)):
                x, y, _ = next(streams[j])
                train_step(model, x, y, optimizer, autocast)
            synchronize(device)
            seconds[j] += time.perf_counter() - t0
    return [steps * cfg.batch_size / t for t in seconds]


def measure_caching(cfg: Config, layout: StageLayout, run: RunDir, k: int, device: torch.device,
                    memory: PeakMemory) -> dict:
    """Stage k's caching pass, as stage.run_stage runs it, with a fresh block; publishes its manifest.
    Its first batches are watched by MemTracker, as in the pipeline, and counted in its time."""
    block = build_stage_block(list(layout.specs[k])).to(device)  # write_shards runs it under no_grad
    if k == 0:
        raw, input_fp = random_raw(cfg), "random-images"
        batches = {s: image_batches(cfg, raw, s, device, train=False) for s in SPLITS}
    else:
        prev = read_manifest(run.cache(k - 1))
        input_fp = prev.fingerprint
        batches = {s: cached_batches(cfg, run.cache(k - 1), prev, s, device, train=False) for s in SPLITS}
    clear_cache(run.cache(k))
    t0 = time.perf_counter()
    with CpuWait() as wait:  # write_shards returns once every feature is on disk: no device sync needed
        table = write_shards(block, batches, run.cache(k), dtype=cfg.cache_dtype, shard_mb=cfg.shard_mb,
                             compression=cfg.compression, autocast=autocast_for(device, cfg.bf16), memory=memory)
    seconds = time.perf_counter() - t0
    manifest = publish_manifest(  # no stage result: this cache is the next measurement's input, nothing more
        run.cache(k), identity=Identity(layout.config_hash, input_fp, k),
        weights_hash=sha256_state_dict(block.state_dict()), num_classes=NUM_CLASSES, table=table, result=None)
    samples = sum(table.splits[s].count for s in SPLITS)
    steps = sum(len(b) for b in batches.values())
    return {"analytic": None, "step_ms": seconds / steps * 1e3, "samples_per_s": samples / seconds,  # mean, not median
            "cpu_wait": wait.share, "cache_bytes": manifest.bytes}


def warm_up_libraries(cfg: Config, device: torch.device) -> None:
    """One step of a one-weight model, so that what torch loads on first use counts as imports, not as the
    configuration's memory: the first optimizer imports torch._dynamo (+150 MB of RSS, measured here), the
    first convolution loads its kernels, the first CUDA call creates the context."""
    tiny = nn.Sequential(nn.Conv2d(1, 1, 3), nn.BatchNorm2d(1), nn.Flatten()).to(device)
    x, y = torch.randn(2, 1, 3, 3, device=device), torch.zeros(2, dtype=torch.long, device=device)
    train_step(tiny, x, y, make_optimizer(cfg, tiny))


def child(job: Job) -> dict:
    """Measure one configuration in this (fresh) process; the result is printed as its last line."""
    device, cfg = torch.device(job.device), Config(**job.cfg)
    if cfg.release_memory:  # as seqtrain.run does (allocator.py): what the resident set shows depends on it
        release_freed_memory()
    warm_up_libraries(cfg, device)
    peak = ProcessPeak(device)  # everything from here on counts
    run, kind, k = RunDir(job.run_dir), job.kind, job.stage
    layout = resolve_layout(cfg, IN_SHAPE)
    torch.manual_seed(cfg.seed * 1000 + k)
    try:  # every measured call can run out of GPU memory: the model, the caching pass, training, the loader's
        with PeakMemory(device, watch_steps=WATCHED_STEPS) as memory:  # tensor level: what the ratios compare
            if kind == "cache":
                result = measure_caching(cfg, layout, run, k, device, memory)
            else:
                model, batches = training_job(cfg, layout, run, kind, k, device)
                result = measure_training(model, batches, cfg, device, peak, job.steps, job.warmup, memory)
                if kind == "ram":  # the loader's efficiency: the cache against RAM, timed in one process
                    prev = run.cache(k - 1)
                    cached = cached_batches(cfg, prev, read_manifest(prev), "train", device, train=True)
                    speeds = interleaved(model, cached, batches, cfg, device, job.steps)
                    result["cache_vs_ram_samples_per_s"] = speeds
    except torch.cuda.OutOfMemoryError:
        return {"oom": True, "device_name": device_description(device)}
    return {**result, "peak": peak.read(), "tensor": {"peak": memory.tensor_bytes, **memory.as_dict()},
            "device_name": device_description(device)}


# --------------------------------------------------------------------------------------------------------
# In the parent: the configurations in order


def spawn(job: Job) -> dict:
    """Run one configuration in a fresh process; its stderr is shown only when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(asdict(job))], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        sys.exit(f"benchmarks/memory.py: configuration {job.name!r} failed:\n{proc.stderr[-4000:]}")
    print(f"  {job.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure_all(cfg: Config, args: argparse.Namespace, run_dir: str) -> dict[str, dict]:
    """Every configuration: caches first (each stage's input), then each stage beside its RAM-fed twin, then e2e."""
    base = Job(cfg.to_dict(), args.device, run_dir, args.steps, args.warmup)
    rows = {}

    def measure(name: str, job: Job) -> None:
        rows[name] = spawn(job)
        if rows[name].get("oom"):  # every ratio needs every row
            sys.exit(f"benchmarks/memory.py: configuration {name!r} ran out of GPU memory; measure a smaller one "
                     "(--batch-size, --width, --arch) or use --budget-mb, which records OOM")

    num_stages = resolve_layout(cfg, IN_SHAPE).num_stages
    for k in range(num_stages):
        measure(f"cache {k}", replace(base, kind="cache", stage=k))
    for k in range(num_stages):  # back to back, so that a change in the machine's load hits both alike
        measure(f"stage {k}", replace(base, kind="stage", stage=k))
        if k > 0:
            measure(f"ram {k}", replace(base, kind="ram", stage=k))
    measure("e2e", base)
    measure("e2e+ckpt", replace(base, kind="ckpt"))
    return rows


def ratios(rows: dict[str, dict], p: dict) -> dict:
    K = len(p["stages"])
    peak = {name: peak_of(row) for name, row in rows.items()}
    rss = {name: row["peak"]["rss"] for name, row in rows.items()}
    sequential = max([f"stage {k}" for k in range(K)] + [f"cache {k}" for k in range(K)], key=peak.get)
    rss_sequential = max([f"stage {k}" for k in range(K)] + [f"cache {k}" for k in range(K)], key=rss.get)
    k = max(range(K), key=lambda j: peak[f"stage {j}"])
    analytic = rows[f"stage {k}"]["analytic"]["total"]
    predicted_peak = p["stages"][k]["train_bytes"]  # plan.py: backward's peak or the optimizer step's
    host = analytic + p["stages"][k]["input_bytes"]  # the resident set also holds the stage's input
    loader = {j: operator.truediv(*rows[f"ram {j}"]["cache_vs_ram_samples_per_s"]) for j in range(1, K)}
    return {
        "peak_ratio": peak[sequential] / peak["e2e"], "largest_sequential": sequential,
        "ckpt_ratio": peak["e2e+ckpt"] / peak["e2e"],
        "ckpt_time_ratio": rows["e2e+ckpt"]["step_ms"] / rows["e2e"]["step_ms"],
        "floor_ratio": peak[f"stage {k}"] / predicted_peak, "floor_only_ratio": peak[f"stage {k}"] / analytic,
        "largest_stage": f"stage {k}",
        "rss_peak_ratio": rss[rss_sequential] / rss["e2e"], "rss_largest_sequential": rss_sequential,
        "rss_floor_ratio": rss[f"stage {k}"] / host,
        "loader_efficiency": min(loader.values()), "loader_efficiency_by_stage": loader,
        "analytic_peak_ratio": p["largest_stage_ratio"],
        "max_cpu_wait": max((row["cpu_wait"] for row in rows.values() if row["cpu_wait"] is not None), default=None),
    }


def judged(name: str, value: float, args: argparse.Namespace) -> dict:
    """A ratio against its target; an opt-in target without its flag gets met None and the flag to opt in with."""
    t = target(name, value, TARGETS)
    if name in OPT_IN:
        t["opt_in"] = "--" + OPT_IN[name].replace("_", "-")
        if not getattr(args, OPT_IN[name]):
            t["met"] = None
    return t


# --------------------------------------------------------------------------------------------------------
# The two modes


def bench_config(args: argparse.Namespace, **overrides) -> Config:
    values = {"run_dir": str(args.out / "run"), "arch": args.arch, "width": args.width, "stages": args.stages,
              "batch_size": args.batch_size, "n_train": args.samples, "n_test": max(args.batch_size, args.samples // 4),
              "shard_mb": args.shard_mb, "shuffle_mb": args.shuffle_mb, "downsample": args.downsample,
              "device": args.device, "release_memory": args.release_memory, "head_pool": args.head_pool}
    return Config(**{**values, **overrides}).validate()


def environment(args: argparse.Namespace, row: dict) -> dict:
    """Where the numbers come from; `row` is any child's result (children name their device)."""
    return {"torch": torch.__version__, "device": args.device, "device_name": row["device_name"],
            "threads": torch.get_num_threads()}


def run_stages(args: argparse.Namespace) -> dict:
    """The main benchmark: every configuration of one network; returns the summary."""
    cfg = bench_config(args)
    layout = resolve_layout(cfg, IN_SHAPE)
    if layout.num_stages < 2:
        sys.exit("benchmarks/memory.py: --stages must give at least 2 stages (stage 1 reads the first cache)")
    p = plan(cfg, layout, NUM_CLASSES)
    finer = bench_config(args, stages=str(len(block_specs(cfg.arch, cfg.width))))
    finest = plan(finer, resolve_layout(finer, IN_SHAPE), NUM_CLASSES)
    with tempfile.TemporaryDirectory(dir=args.out, prefix="caches-") as run_dir:
        rows = measure_all(cfg, args, run_dir)
    r = {**ratios(rows, p), "finest_analytic_ratio": finest["largest_stage_ratio"]}
    targets = {name: judged(name, r[name], args) for name in TARGETS}
    settings = {"arch": cfg.arch, "stages": list(layout.sizes), **run_settings(args, cfg)}
    summary = {**environment(args, rows["e2e"]), "config": settings, **r, "targets": targets}
    write_json(args.out / "memory.json", {"summary": summary, "rows": rows, "plan": p})  # before anything is drawn
    memory_report.report(args.out)
    return summary


# --------------------------------------------------------------------------------------------------------
# Deeper than memory allows: --budget-mb


def measure_stages(base: Job, out: Path) -> list[dict]:
    """Every stage's caching and training peak, in a scratch run directory under `out`; a stage that runs out
    of memory ends the list (its successors have no input)."""
    stages = []
    with tempfile.TemporaryDirectory(dir=out, prefix="caches-") as run_dir:
        base = replace(base, run_dir=run_dir)
        for k in range(resolve_layout(Config(**base.cfg), IN_SHAPE).num_stages):
            cache = spawn(replace(base, kind="cache", stage=k))
            if cache.get("oom"):  # stage k+1 has no input: this depth does not fit
                stages.append({"train": None, "cache": None})
                break
            train = spawn(replace(base, kind="stage", stage=k))
            stages.append({"train": None if train.get("oom") else peak_of(train), "cache": peak_of(cache)})
    return stages


def sampled_stages(cfg: Config, layout: StageLayout, n: int) -> tuple[list[int], int]:
    """The stages to measure of a network too deep to measure every one: the 3 that --plan predicts to be the
    largest and evenly spaced others, at most `n` in all (fewer where the two coincide); and the largest
    predicted training peak (bytes)."""
    predicted = [s["train_bytes"] for s in plan(cfg, layout, NUM_CLASSES, split_counts(cfg))["stages"]]
    largest = sorted(range(len(predicted)), key=lambda k: -predicted[k])[:3]
    spaced = [round(i * (len(predicted) - 1) / max(1, n - 4)) for i in range(max(0, n - 3))]
    return sorted(set(largest) | set(spaced)), max(predicted)


def measure_sample(base: Job, layout: StageLayout, n: int) -> tuple[list[dict], int]:
    """Training peaks of a sample of the stages (sampled_stages), each in its own process."""
    ks, predicted = sampled_stages(Config(**base.cfg), layout, n)
    stages = []
    for k in ks:
        train = spawn(replace(base, kind="sample", stage=k))
        stages.append({"stage": k, "train": None if train.get("oom") else peak_of(train), "cache": None})
    return stages, predicted


def run_budget(args: argparse.Namespace) -> dict:
    """The deepest CIFAR ResNet whose end-to-end step fits the budget, against seqtrain's stages cut by
    `--stages auto --memory-budget` at every depth; every peak measured at tensor level, in its own process,
    and every one judged against the budget by that same figure."""
    budget = args.budget_mb * MB
    points, child = [], None  # child: any child's result, which names the device
    for depth in args.depths:
        cfg = bench_config(args, arch=f"resnet{depth}", stages="auto", memory_budget=f"{args.budget_mb}MB")
        base = Job(cfg.to_dict(), args.device, "", args.steps, args.warmup)
        sampled = depth > args.sample_above
        if sampled:  # end to end at such depths is predicted, its step being many GB and minutes on a CPU
            p = plan(cfg, resolve_layout(cfg, IN_SHAPE), NUM_CLASSES, split_counts(cfg))
            point = {"depth": depth, "e2e_peak": p["e2e"]["train_bytes"], "e2e_oom": False,
                     "e2e_checkpoint_peak": p["e2e_checkpoint"]["train_bytes"], "e2e_predicted": True}
        else:
            e2e, e2e_ckpt = spawn(base), spawn(replace(base, kind="ckpt"))
            child = e2e
            point = {"depth": depth, "e2e_peak": None if e2e.get("oom") else peak_of(e2e), "e2e_oom": e2e.get("oom"),
                     "e2e_checkpoint_peak": None if e2e_ckpt.get("oom") else peak_of(e2e_ckpt)}
        for name, checkpoint in (("", False), ("checkpoint_", True)):  # seqtrain, and seqtrain with --checkpoint
            staged = bench_config(args, arch=f"resnet{depth}", stages="auto", memory_budget=f"{args.budget_mb}MB",
                                  checkpoint=checkpoint)
            layout = resolve_layout(staged, IN_SHAPE)
            if sampled:
                stages, predicted = measure_sample(replace(base, cfg=staged.to_dict()), layout, args.sample_stages)
                measured = [s["train"] for s in stages]
                largest = None if None in measured else max(measured)
                point[f"{name}sampled"] = {"stages": [s["stage"] for s in stages],
                                           "predicted_largest_peak": predicted}
            else:
                stages = measure_stages(replace(base, cfg=staged.to_dict()), args.out)
                measured = [v for s in stages for v in s.values()]
                largest = None if None in measured or len(stages) < layout.num_stages else max(measured)  # OOM
            point.update({f"{name}stages": list(layout.sizes), f"{name}stage_peaks": stages,
                          f"{name}largest_stage_peak": largest,
                          f"{name}fits": largest is not None and largest <= budget})
        points.append(point)
    fitting = [pt["depth"] for pt in points if pt["e2e_peak"] is not None and pt["e2e_peak"] <= budget]
    fitting_ckpt = [pt["depth"] for pt in points if (pt["e2e_checkpoint_peak"] or budget + 1) <= budget]
    deepest = max((pt for pt in points if pt["fits"]), key=lambda pt: pt["depth"], default=None)
    multi = [pt["largest_stage_peak"] for pt in points if len(pt["stages"]) > 1 and pt["largest_stage_peak"]]
    spread = max(multi) / min(multi) - 1 if len(multi) > 1 else None
    found = {"seqtrain_depth": None, "seqtrain_stages": None, "seqtrain_max_stage_mb": None, "depth_ratio": None}
    if deepest is not None:  # None only if no depth's stages all fit: a budget below every single block
        found = {"seqtrain_depth": deepest["depth"], "seqtrain_stages": len(deepest["stages"]),
                 "seqtrain_max_stage_mb": round(deepest["largest_stage_peak"] / MB, 1),
                 "depth_ratio": deepest["depth"] / max(fitting) if fitting else None}
    child = child or {"device_name": device_description(args.device)}  # every depth sampled: this one's name
    summary = {**environment(args, child), "config": run_settings(args, cfg), "budget_mb": args.budget_mb,
               "depths": args.depths, "e2e_max_depth": max(fitting, default=None),
               "e2e_checkpoint_max_depth": max(fitting_ckpt, default=None),
               "seqtrain_checkpoint_max_depth": max((pt["depth"] for pt in points if pt["checkpoint_fits"]),
                                                    default=None), **found,
               "multi_stage_spread": spread}
    write_json(args.out / "budget.json", {"summary": summary, "points": points})  # before anything is drawn
    memory_report.report(args.out)
    return summary


def run_settings(args: argparse.Namespace, cfg: Config) -> dict:
    """The settings behind the numbers; `cfg` is any configuration measured (the sweep varies only arch and stages)."""
    keys = ("width", "batch_size", "samples", "steps", "warmup", "shard_mb", "shuffle_mb", "downsample", "quick",
            "release_memory", "head_pool")
    return {**{k: getattr(args, k) for k in keys}, "head": cfg.head, "optimizer": cfg.optimizer,
            "cache_dtype": cfg.cache_dtype, "bf16": cfg.bf16}


# --------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present")
    p.add_argument("--quick", action="store_true", help="ResNet-20 at width 16, batch 64, few steps: ~2 min on 2 cores")
    p.add_argument("--arch", help="network (default: resnet18, --quick resnet20)")
    p.add_argument("--width", type=int, help="first block's channels; 0 = standard (default: 0, --quick 16)")
    p.add_argument("--stages", help="stage count or blocks per stage, as seqtrain's --stages (default: 4)")
    p.add_argument("--batch-size", type=int, help="samples per step (default: 128, --quick 64)")
    p.add_argument("--samples", type=int, help="training images cached per stage; enough for several shards "
                   "(default: 5120, --quick 1024)")
    p.add_argument("--steps", type=int, help="timed steps per configuration after warm-up (default: 20, --quick 30)")
    p.add_argument("--warmup", type=int, help="untimed steps first, at least 1 (default: 3, --quick 2)")
    p.add_argument("--shard-mb", type=int, help="cache shard size (default: 32, --quick 4)")
    p.add_argument("--shuffle-mb", type=float, default=Config().shuffle_mb, help="as seqtrain's --shuffle-mb: a "
                   "split that fits in two windows is kept in memory, a larger one streamed; 4 with --quick streams "
                   "every stage")
    p.add_argument("--downsample", default="standard", help="as seqtrain's --downsample, e.g. accelerated")
    p.add_argument("--head-pool", type=int, default=Config().head_pool, help="as seqtrain's --head-pool: the conv "
                   "heads average their input down to at most this side; 0 keeps it whole (default: "
                   f"{Config().head_pool})")
    p.add_argument("--depths", help="with --budget-mb: the CIFAR ResNet depths (6n+2) to measure (default: "
                   "8,14,20,32,56,110)")
    p.add_argument("--budget-mb", type=int, help="the deepest ResNet end to end fits in this many MB (tensor peak), "
                   "against seqtrain's --stages auto --memory-budget at each of --depths (default 8,14,20,32,56,110)")
    p.add_argument("--release-memory", action=argparse.BooleanOptionalAction, default=False, help="as seqtrain's "
                   "--release-memory (off by default, as there): freed host memory leaves the resident set at once, "
                   "so the RSS figures follow the tensors, at about 2.4x the CPU step time")
    p.add_argument("--sample-above", type=int, default=110, help="with --budget-mb: depths above this measure a "
                   "sample of their stages, each trained on random features of its input's shape, and take end to "
                   "end's peaks from --plan (default: 110)")
    p.add_argument("--sample-stages", type=int, default=8, help="the stages measured at such a depth: the 3 that "
                   "--plan predicts to be the largest and evenly spaced others (default: 8)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/memory"), help="output directory")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.warmup < 1 or args.steps < 1:
        p.error("--warmup and --steps must be at least 1 (the first warm-up step is the analytic one)")
    if args.depths and not args.budget_mb:
        p.error("--depths goes with --budget-mb: each depth is cut by --stages auto --memory-budget")
    if args.sample_above < 8 or args.sample_stages < 4:
        p.error("--sample-above is a depth (at least 8) and --sample-stages at least 4 (the 3 largest and others)")
    if args.budget_mb and not args.depths:
        args.depths = "8,14,20,32,56,110"
    if args.depths:
        args.depths = sorted(int(d) for d in args.depths.split(","))
        unknown = [d for d in args.depths if not cifar_resnet_n(f"resnet{d}")]
        if unknown:
            p.error(f"--depths {unknown[0]} is not a CIFAR ResNet depth 6n+2 (8, 14, 20, 32, 56, 110, ...)")
    args.device = resolve_device(args.device).type
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(Job(**json.loads(args.child)))))
        return
    require_plotting("benchmarks/memory.py")
    args.out.mkdir(parents=True, exist_ok=True)
    # Each configuration is a process of its own, seconds to minutes: say where the results will be first.
    print(f"benchmarks/memory.py: measuring each configuration in a fresh process; results in {args.out}/",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    summary = run_budget(args) if args.budget_mb else run_stages(args)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
