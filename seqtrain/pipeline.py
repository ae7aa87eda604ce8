"""The order of stages: what is complete, what to skip, what to resume, and the final assembly.

Stage k is complete exactly when `stage_kk/cache/manifest.json` is valid, was made with this run's
configuration, and from the input that exists now: stage 0's input is the dataset, stage k's the cache
of stage k-1 (identified by its manifest's fingerprint). Re-training a stage therefore makes every later
stage stale whenever its features changed, without any bookkeeping beyond the manifests.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from seqtrain import distributed
from seqtrain.archs import specs_after
from seqtrain.augment import AugmentedBatches, ViewBatches, augment_for
from seqtrain.batches import ImageBatches
from seqtrain.cache import (
    SPLITS,
    CorruptCache,
    cache_bytes,
    clear_cache,
    merge_tables,
    publish_manifest,
    read_manifest,
    read_manifest_after_barrier,
    require_filter,
    verify_shards,
    write_shards,
)
from seqtrain.config import Config, config_hash, shaping_dict
from seqtrain.data import RawData, source_fingerprint
from seqtrain.errors import UserError
from seqtrain.files import read_json, save_torch, sha256_json, sha256_state_dict, write_json
from seqtrain.integrity import (
    check_manifest_fields,
    check_metrics,
    read_e2e_results,
    read_final_results,
    read_weights,
)
from seqtrain.loader import CachedBatches, local_batch
from seqtrain.log import log
from seqtrain.memory import PeakMemory
from seqtrain.models import SequentialNet, StageModel, build_head, build_network, build_stage
from seqtrain.plan import free_disk, predicted_cache_bytes
from seqtrain.splitting import stage_shapes
from seqtrain.train import autocast_for, evaluate, fit


class RunDir:
    """The paths of the run-directory contract (docs/design.md), and what this run has read of its input."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.final = self.root / "final"
        self.e2e = self.root / "e2e"
        # Stage 0's input fingerprint, computed once per RunDir (listing a large image folder is not free)
        # and not once per process: a second train_stages() call must see files added in between.
        self.input_fingerprints: dict[str, str | None] = {}

    def stage(self, k: int) -> Path:
        return self.root / f"stage_{k:02d}"

    def cache(self, k: int) -> Path:
        return self.stage(k) / "cache"


def dataset_fingerprint(cfg: Config, run: RunDir) -> str | None:
    """Identifies stage 0's input (the dataset, its image size and validation split, an image folder's files);
    None when an image folder is not here, so that later stages can run from the caches alone."""
    key = sha256_json([cfg.data_dir, shaping_dict(cfg)])
    if key not in run.input_fingerprints:
        try:
            run.input_fingerprints[key] = sha256_json(source_fingerprint(cfg))[:16]
        except UserError:
            if cfg.dataset not in ("imagefolder", "imagenet"):
                raise
            run.input_fingerprints[key] = None
    return run.input_fingerprints[key]


def rebuild_hint(run: RunDir, k: int) -> str:
    return f"python -m seqtrain.run --stage {k} --run-dir {run.root}"


# --------------------------------------------------------------------------------------------------------
# Stage state


def stage_manifest(cfg: Config, run: RunDir, k: int) -> tuple[dict | None, str]:
    """(manifest, "") when stage k is complete and current, else (None, why not) in words for the user."""
    try:
        manifest = read_manifest(run.cache(k))
        if manifest is not None:
            check_manifest_fields(manifest, run.cache(k) / "manifest.json", k)
    except CorruptCache as e:
        raise UserError(f"{e}; rebuild the stage with: {rebuild_hint(run, k)}") from None
    if manifest is None:
        return None, f"stage {k} has no complete cache"
    if manifest["config_hash"] != config_hash(cfg):
        return None, f"stage {k}'s cache was made with another configuration"
    if k == 0:
        expected = dataset_fingerprint(cfg, run) or manifest["input_fingerprint"]  # no image folder: trust stage 0
    else:
        previous, why = stage_manifest(cfg, run, k - 1)
        if previous is None:
            return None, why
        expected = previous["fingerprint"]
    if manifest["input_fingerprint"] != expected:
        return None, f"stage {k}'s cache is stale: it was made from an earlier version of its input"
    return manifest, ""


def final_results(run: RunDir) -> dict | None:
    return read_final_results(run.final / "results.json", f"--stage all --run-dir {run.root}")


def load_weights(path: Path, k: int, run: RunDir) -> dict:
    return read_weights(path, f"rebuild the stage with {rebuild_hint(run, k)}")


def require_input_cache(cfg: Config, run: RunDir, k: int, checksums: bool = True) -> dict:
    """The complete (and checksum-verified) cache of stage k-1, or a UserError naming the stage to run first.

    Under torchrun each rank checksums its own shards (r, r + W, ...), and a damaged shard any rank finds
    is every rank's error: the same line, and no rank left waiting for the others."""
    manifest, why = stage_manifest(cfg, run, k - 1)
    if manifest is None:
        raise UserError(f"stage {k} reads the cache of stage {k - 1}, but {why} in {run.root}: "
                        f"run --stage {k - 1} first (or --stage all)")
    require_filter(manifest.get("compression", "none"))  # a cache written with hdf5plugin's filters
    error = None
    try:
        share = (distributed.rank(), distributed.world_size())
        verify_shards(run.cache(k - 1), manifest, checksums, share=share)
    except CorruptCache as e:
        error = f"{e}; rebuild it with: {rebuild_hint(run, k - 1)}"
    errors = [e for e in distributed.gather(error) if e is not None]
    if errors:
        raise UserError(errors[0])
    return manifest


# --------------------------------------------------------------------------------------------------------
# One stage


def run_stage(cfg: Config, run: RunDir, k: int, raw: RawData | None, device: torch.device,
              block: torch.nn.Module | None = None) -> dict:
    """Train stage k to convergence (resuming a checkpoint when one matches), freeze it, cache its output.

    `block` is stage k's module when the caller holds it (seqtrain.train_stages); otherwise it is built from cfg.
    Returns the stage's published manifest.
    """
    inputs = stage_inputs(cfg, run, k, raw, device)
    # Only this stage's block and head are built: the process never sees blocks 0..k-1.
    torch.manual_seed(cfg.seed * 1000 + k)  # the same initialisation whatever ran before in this process
    if block is None:
        block, out_shape = build_stage(cfg, k, inputs.in_shape)
    else:
        out_shape = stage_shapes([block], inputs.in_shape)[0]
    # Every rank checks (cheap, one filesystem), so under torchrun all refuse together instead of hanging.
    check_disk(run, k, predicted_cache_bytes(tuple(out_shape), cfg, inputs.counts))
    head = build_head(cfg, out_shape[0], inputs.num_classes, specs_after(cfg, k) if ":" not in cfg.arch else [])
    model = StageModel(block, head).to(device)
    identity = {"config_hash": config_hash(cfg), "input_fingerprint": inputs.fingerprint, "stage": k}

    unpublish_stage(run, k)  # stage k is incomplete from here until its new manifest is published
    log(f"stage {k}/{cfg.num_stages - 1}: {len(block) if isinstance(block, torch.nn.Sequential) else 1} block(s), "
        f"{sum(p.numel() for p in block.parameters()):,} parameters, input {inputs.in_shape}")
    result = train_stage(cfg, run, k, model, inputs, identity, device)
    table, cache_result = cache_stage(cfg, run, k, block, inputs, device)
    return publish_stage(run, k, block, identity, inputs.num_classes, table, {**result, **cache_result})


@dataclass
class StageInputs:
    """What stage k reads: batch streams to train and evaluate on, and to cache; the input's shape and identity."""

    in_shape: tuple[int, ...]  # C, H, W of one input sample
    num_classes: int
    fingerprint: str | None  # the dataset's (stage 0) or the previous cache's
    counts: dict[str, int]  # samples per split
    batches: dict  # split -> batches to train on (train: shuffled, augmented) or evaluate on
    frozen: dict  # split -> this rank's slice, in order, every view: what the caching pass reads


def stage_inputs(cfg: Config, run: RunDir, k: int, raw: RawData | None, device) -> StageInputs:
    """Stage 0 reads the raw dataset; stage k > 0 the verified cache of stage k-1, and nothing else."""
    if k == 0:
        assert raw is not None, "stage 0 reads the raw dataset"
        inputs = StageInputs(
            tuple(raw.in_shape), raw.num_classes, dataset_fingerprint(cfg, run),
            {s: len(getattr(raw, s)) for s in SPLITS},
            {s: image_batches(cfg, raw, s, device, train=s == "train") for s in SPLITS},
            {s: frozen_image_batches(cfg, raw, s, device) for s in SPLITS})
    else:
        prev = require_input_cache(cfg, run, k)
        inputs = StageInputs(
            tuple(prev["feature_shape"]), prev["num_classes"], prev["fingerprint"],
            {s: prev["splits"][s]["count"] for s in SPLITS},
            {s: cached_batches(cfg, run.cache(k - 1), prev, s, device, train=s == "train") for s in SPLITS},
            {s: frozen_cached_batches(cfg, run.cache(k - 1), prev, s, device) for s in SPLITS})
    require_full_batch(cfg, inputs.batches["train"], inputs.counts["train"])
    return inputs


def require_full_batch(cfg: Config, batches, count: int) -> None:
    """Training drops an incomplete last batch: a --batch-size above the training split would train nothing."""
    if len(batches) == 0:
        per_worker = f" for each of the {cfg.workers} --workers (each batches its own shards)" if cfg.workers else ""
        raise UserError(f"--batch-size {cfg.batch_size} leaves no full batch of the {count} "
                        f"training samples{per_worker}; lower it" + (" or --workers" if cfg.workers else ""))


def check_inputs(cfg: Config, run: RunDir, stage: int | str, raw: RawData | None, device) -> None:
    """What the first stage to train reads, checked before anything is written to the run directory (so that
    a refused run leaves nothing behind that would remember its flags): the batch size against the data,
    stage K's input cache, and the disk that stage 0's cache needs."""
    if raw is not None:
        require_full_batch(cfg, image_batches(cfg, raw, "train", device, train=True), len(raw.train))
    if isinstance(stage, int) and stage > 0:
        prev = require_input_cache(cfg, run, stage, checksums=False)
        require_full_batch(cfg, cached_batches(cfg, run.cache(stage - 1), prev, "train", device, train=True),
                           prev["splits"]["train"]["count"])
    if stage in ("all", 0) and (stage == 0 or stage_manifest(cfg, run, 0)[0] is None):
        with torch.device("meta"):  # the output shape only: nothing is allocated
            _, out_shape = build_stage(cfg, 0, tuple(raw.in_shape))
        check_disk(run, 0, predicted_cache_bytes(tuple(out_shape), cfg, {s: len(getattr(raw, s)) for s in SPLITS}))


def unpublish_stage(run: RunDir, k: int) -> None:
    """Stage k's cache and weights go before it trains; under torchrun rank 0 does it and the others wait."""
    if distributed.is_main():
        clear_cache(run.cache(k))
        (run.stage(k) / "block.pt").unlink(missing_ok=True)
        run.stage(k).mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def train_stage(cfg: Config, run: RunDir, k: int, model: StageModel, inputs: StageInputs, identity: dict,
                device) -> dict:
    """Train block + head to convergence, score the head on the test split, save block.pt; the result's figures."""
    desc = f"stage {k}/{cfg.num_stages - 1}"
    with PeakMemory(device) as memory:
        trained = fit(model, inputs.batches["train"], inputs.batches["val"], cfg, workdir=run.stage(k),
                      identity=identity, device=device, desc=desc, memory=memory)
        release(inputs.batches["train"], inputs.batches["val"])  # splits kept in memory go once trained on
        _, test_acc = evaluate(model, inputs.batches["test"], autocast_for(device, cfg.bf16))
        release(inputs.batches["test"])
    if distributed.is_main():
        save_torch(run.stage(k) / "block.pt", {"block": model.block.state_dict(), "head": model.head.state_dict(),
                                               "identity": identity, "config": cfg.to_dict()})
    read = read_per_epoch(inputs.batches["train"])
    log(f"{desc}: trained | val acc {trained.best_val_acc:.4f} | test acc {test_acc:.4f}"
        + (f" | read {read['rank0']:.1f} MB per rank and epoch" if read else ""))
    return {"val_acc": trained.best_val_acc, "test_acc": test_acc, "epochs": trained.epochs,
            "best_epoch": trained.best_epoch, "train_seconds": round(trained.train_seconds, 2),
            "parameters": sum(p.numel() for p in model.block.parameters()), "train_memory": memory.as_dict(),
            **({"read_mb_per_rank_epoch": read} if read else {})}


def release(*streams) -> None:
    """Let cached-feature streams drop the splits they keep in memory (CachedBatches.release)."""
    for batches in streams:
        if isinstance(batches, CachedBatches):
            batches.release()


def read_per_epoch(batches) -> dict | None:
    """MB of cached features one epoch of training read from HDF5, rank 0's and the most any rank read; None
    for raw images (held in RAM) or when no epoch was iterated here (a resume after the last one)."""
    here = isinstance(batches, CachedBatches) and batches.passes
    every = distributed.gather(batches.bytes_read / batches.passes / 2**20 if here else None)
    return None if None in every else {"rank0": round(every[0], 3), "max": round(max(every), 3)}


def cache_stage(cfg: Config, run: RunDir, k: int, block: torch.nn.Module, inputs: StageInputs,
                device) -> tuple[dict, dict]:
    """Push every split through the frozen block into this rank's shards; (merged split table, figures).

    Under torchrun every rank caches its own slice; a rank's error (e.g. float16 overflow) stops them all.
    """
    t0 = time.perf_counter()
    prefix = f"rank{distributed.rank()}-" if distributed.world_size() > 1 else ""
    with PeakMemory(device) as memory:
        try:
            table, error = write_shards(block, inputs.frozen, run.cache(k), dtype=cfg.cache_dtype,
                                        shard_mb=cfg.shard_mb, compression=cfg.compression,
                                        autocast=autocast_for(device, cfg.bf16), prefix=prefix, memory=memory), None
        except UserError as e:
            table, error = None, e
    tables = distributed.gather(table if error is None else str(error))  # also a barrier: every shard exists
    if error is not None or any(isinstance(t, str) for t in tables):
        raise error or UserError(next(t for t in tables if isinstance(t, str)))
    return merge_tables(tables), {"cache_seconds": round(time.perf_counter() - t0, 2),
                                  "cache_memory": memory.as_dict()}


def publish_stage(run: RunDir, k: int, block: torch.nn.Module, identity: dict, num_classes: int, table: dict,
                  result: dict) -> dict:
    """Rank 0 writes the manifest (the stage is complete from here) and drops the checkpoint; every rank
    returns the published manifest."""
    peaks = [result["train_memory"], result["cache_memory"]]
    result = {**result, "peak_tensor_mb": max(m["peak_tensor_mb"] for m in peaks),
              "peak_rss_mb": max(m["peak_rss_mb"] for m in peaks)}
    if distributed.is_main():
        publish_manifest(run.cache(k), identity=identity, weights_hash=sha256_state_dict(block.state_dict()),
                         num_classes=num_classes, table=table, result=result)
        (run.stage(k) / "checkpoint.pt").unlink(missing_ok=True)  # block.pt supersedes it
    manifest = read_manifest_after_barrier(run.cache(k))
    log(f"stage {k}: cached | {cache_bytes(manifest) / 2**20:.1f} MB | tensor peak {result['peak_tensor_mb']:.1f} MB")
    return manifest


def check_disk(run: RunDir, k: int, need: int) -> None:
    """Refuse before training when the stage's cache cannot fit, rather than fail hours later mid-write."""
    where, free = free_disk(run.root)  # the run directory, or where it will be made
    if need > free:
        raise UserError(f"stage {k}'s cache needs {need / 2**20:,.0f} MB but {where} has {free / 2**20:,.0f} MB "
                        "free: free some space or use another --run-dir")


def image_batches(cfg: Config, raw: RawData, split: str, device, train: bool):
    """Raw-image batches to train on (shuffled, augmented as --augment says) or to evaluate on, this rank's share."""
    batches = ImageBatches(getattr(raw, split), raw.mean, raw.std, cfg.batch_size, shuffle=train, seed=cfg.seed,
                           drop_last=train, device=device, rank=distributed.rank(), world=distributed.world_size())
    aug = augment_for(cfg)
    if train and aug.active:
        batches = AugmentedBatches(batches, aug, cfg.seed, distributed.rank())
    return batches


def cached_batches(cfg: Config, cache_dir: Path, manifest: dict, split: str, device, train: bool) -> CachedBatches:
    """Cached-feature batches to train on (one random view per sample) or to evaluate on: this rank reads
    only its share, its range of each epoch's rows to train on, its contiguous part to evaluate."""
    r, w = distributed.rank(), distributed.world_size()
    if train:
        return CachedBatches(cache_dir, manifest, split, cfg.batch_size, shuffle=True,
                             seed=cfg.seed * 1000 + manifest["stage"] + 1, drop_last=True, shuffle_mb=cfg.shuffle_mb,
                             workers=cfg.workers, device=device, rank=r, world=w)
    # Evaluation sums counts over the ranks (train.evaluate): any disjoint parts will do, and contiguous ones
    # are whole-shard reads. Batches of the rank's rows of the global batch hold its memory to training's.
    rows = distributed.contiguous_part(manifest["splits"][split]["count"])
    return CachedBatches(cache_dir, manifest, split, local_batch(cfg.batch_size, r, w), shuffle_mb=cfg.shuffle_mb,
                         workers=cfg.workers, device=device, views="plain", rows=rows)


def frozen_image_batches(cfg: Config, raw: RawData, split: str, device):
    """What stage 0 caches: this rank's contiguous slice of the split, with every view for train.

    The train split is cached in a random order (seeded by --data-seed): datasets often come sorted by class
    (an image folder always), and a shuffle window of a few shards must hold every class, not one or two."""
    whole = getattr(raw, split)
    order = cached_train_order(cfg, len(whole)) if split == "train" else torch.arange(len(whole))
    batches = ImageBatches(whole, raw.mean, raw.std, cfg.batch_size, device=device,
                           rows=order[slice(*distributed.contiguous_part(len(whole)))])
    if split == "train" and cfg.cache_views > 1:
        return ViewBatches(batches, cfg.cache_views, cfg.seed, augment_for(cfg))
    return batches


def cached_train_order(cfg: Config, n: int) -> torch.Tensor:
    """The order in which stage 0 caches the n rows of the train split: a permutation fixed by --data-seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(cfg.data_seed))


def frozen_cached_batches(cfg: Config, cache_dir: Path, manifest: dict, split: str, device) -> CachedBatches:
    """What stage k > 0 caches: this rank's contiguous slice of the previous cache, every view of each sample."""
    rows = distributed.contiguous_part(manifest["splits"][split]["count"])
    # read once: nothing to keep for a later epoch
    return CachedBatches(cache_dir, manifest, split, cfg.batch_size, shuffle_mb=cfg.shuffle_mb,
                         workers=cfg.workers, device=device, views="all", rows=rows, keep=False)


# --------------------------------------------------------------------------------------------------------
# Final network and e2e baseline


def final_head(cfg: Config, run: RunDir) -> torch.nn.Module:
    """The last stage's trained auxiliary head: the composed network's classifier."""
    manifest, why = stage_manifest(cfg, run, cfg.num_stages - 1)
    if manifest is None:
        raise UserError(f"the final network needs every stage: {why}; run --stage all")
    head = build_head(cfg, manifest["feature_shape"][0], manifest["num_classes"])
    head.load_state_dict(load_weights(run.stage(cfg.num_stages - 1) / "block.pt", cfg.num_stages - 1, run)["head"])
    return head


def assemble_final(cfg: Config, run: RunDir, manifests: list[dict], raw: RawData, device,
                   blocks: list[torch.nn.Module] | None = None) -> dict:
    """Compose frozen blocks 0..K-1 and the last head, evaluate on raw test images, save final/model.pt."""
    if blocks is None:
        net = build_network(cfg, raw.in_shape[0], raw.num_classes)
    else:
        net = SequentialNet(blocks, build_head(cfg, manifests[-1]["feature_shape"][0], raw.num_classes))
    for k, manifest in enumerate(manifests):
        path = run.stage(k) / "block.pt"
        saved = load_weights(path, k, run)
        if sha256_state_dict(saved["block"]) != manifest["weights_hash"]:
            raise UserError(f"{path} does not hold the weights that made stage {k}'s cache: "
                            f"rebuild the stage with {rebuild_hint(run, k)}")
        net.stages[k].load_state_dict(saved["block"])
    net.head.load_state_dict(saved["head"])
    net.to(device)
    _, acc = evaluate(net, image_batches(cfg, raw, "test", device, train=False), autocast_for(device, cfg.bf16))
    cached_acc = manifests[-1]["result"]["test_acc"]
    if distributed.is_main():
        save_model(run.final / "model.pt", net, cfg, raw)
    final = {"test_acc": acc, "cached_path_test_acc": cached_acc, "fingerprint": manifests[-1]["fingerprint"]}
    # The cached path sees every cache's rounding. int8 rounds to 1/255 of each channel's range: on stage 0's
    # features of the tests' tiny run (tests/conftest.py) its relative RMS error was 6.5e-3 against float16's
    # 2.1e-4, and it flipped 4 of 500 predictions where float16 flipped none. So 2 points for int8, half of one
    # otherwise: a guide for the note, not a bound (several int8 caches in a row add their errors).
    tolerance = 0.02 if cfg.cache_dtype == "int8" else 0.005
    note = "" if abs(acc - cached_acc) <= tolerance else f" (differs by more than {cfg.cache_dtype} rounding explains)"
    log(f"final: composed network test acc {acc:.4f} on raw images, {cached_acc:.4f} on cached features{note}")
    return final


def save_model(path: Path, net, cfg: Config, raw: RawData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(path, {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "config": cfg.to_dict(),
                      "in_channels": raw.in_shape[0], "num_classes": raw.num_classes,
                      "mean": raw.mean, "std": raw.std})


def run_e2e(cfg: Config, run: RunDir, raw: RawData, device) -> dict:
    """The same network trained end to end by back-propagation, same data and convergence rule."""
    main = distributed.is_main()
    if main:
        (run.e2e / "results.json").unlink(missing_ok=True)
        run.e2e.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    torch.manual_seed(cfg.seed)
    net = build_network(cfg, raw.in_shape[0], raw.num_classes).to(device)
    identity = {"config_hash": config_hash(cfg), "input_fingerprint": dataset_fingerprint(cfg, run), "stage": "e2e"}
    train, val = image_batches(cfg, raw, "train", device, True), image_batches(cfg, raw, "val", device, False)
    with PeakMemory(device) as mem:
        trained = fit(net, train, val, cfg, workdir=run.e2e, identity=identity, device=device, desc="e2e",
                      memory=mem)
    _, test_acc = evaluate(net, image_batches(cfg, raw, "test", device, False), autocast_for(device, cfg.bf16))
    result = {"val_acc": trained.best_val_acc, "test_acc": test_acc, "epochs": trained.epochs,
              "best_epoch": trained.best_epoch, "train_seconds": round(trained.train_seconds, 2),
              "parameters": sum(p.numel() for p in net.parameters()), "train_memory": mem.as_dict(),
              "peak_tensor_mb": mem.as_dict()["peak_tensor_mb"], "peak_rss_mb": mem.rss_mb,
              "config_hash": config_hash(cfg)}
    if main:
        save_model(run.e2e / "model.pt", net, cfg, raw)
        write_json(run.e2e / "results.json", result)
        (run.e2e / "checkpoint.pt").unlink(missing_ok=True)
    distributed.barrier()
    log(f"e2e: done | val acc {trained.best_val_acc:.4f} | test acc {test_acc:.4f} | "
        f"tensor peak {result['peak_tensor_mb']:.1f} MB")
    return result


# --------------------------------------------------------------------------------------------------------
# The whole run


def prepare_run_dir(cfg: Config) -> RunDir:
    run = RunDir(cfg.run_dir)
    if run.root.exists() and not run.root.is_dir():
        raise UserError(f"--run-dir {run.root} is a file; give a directory")
    try:
        run.root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --run-dir {run.root}: {e.strerror}") from None
    if not os.access(run.root, os.W_OK | os.X_OK):
        raise UserError(f"--run-dir {run.root} is not writable; choose another directory")
    return run


def write_run_config(run: RunDir, cfg: Config, raw: RawData | None) -> None:
    """config.json: the resolved configuration and the training split's normalization statistics (what
    model.pt's users normalise with; kept from the previous write when this process loaded no raw data)."""
    saved = cfg.to_dict()
    if raw is not None:
        saved["normalization"] = {"mean": raw.mean, "std": raw.std}
    elif run.config.exists():
        saved["normalization"] = read_json(run.config).get("normalization")
    write_json(run.config, saved)


class RunLock:
    """One process per run directory: an exclusive flock, released by the kernel when the holder dies."""

    def __init__(self, run: RunDir):
        self.path = run.root / ".lock"

    def __enter__(self):
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.path.parent} is in use by another seqtrain process (pid {holder}); "
                            "wait for it to finish or use another --run-dir") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()
        return self

    def __exit__(self, *exc):
        self.file.close()


def collect_results(cfg: Config, run: RunDir) -> dict:
    """Every figure of the summary table, from the manifests and result files on disk."""
    stages = []
    for k in range(cfg.num_stages):
        manifest, _ = stage_manifest(cfg, run, k)
        if manifest is not None:
            stages.append({"stage": k, **manifest["result"], "cache_mb": round(cache_bytes(manifest) / 2**20, 2),
                           "feature_shape": manifest["feature_shape"]})
    final = (final_results(run) or {}).get("final")
    e2e = read_e2e_results(run.e2e / "results.json", f"--stage e2e --run-dir {run.root}")
    if e2e and e2e.get("config_hash") != config_hash(cfg):
        e2e = None
    return {"stages": stages, "final": final, "e2e": e2e, "config_hash": config_hash(cfg),
            "torch": torch.__version__}


def run_all(cfg: Config, run: RunDir, raw: RawData, device, blocks: list[torch.nn.Module] | None = None) -> dict:
    """Every stage in order (skipping complete ones, resuming interrupted ones), then the final network.

    `blocks`: the stages' modules when the caller holds them (seqtrain.train_stages); else each is built from cfg.
    """
    manifests = []
    for k in range(cfg.num_stages):
        manifest, why = stage_manifest(cfg, run, k)
        if manifest is not None:
            try:
                verify_shards(run.cache(k), manifest, checksums=False)  # sizes now; checksums when read
            except CorruptCache as e:
                raise UserError(f"{e}; rebuild the stage with: {rebuild_hint(run, k)}") from None
            log(f"stage {k}/{cfg.num_stages - 1}: complete, skipped")
            if blocks is not None:  # the caller's modules get the weights that made this cache
                blocks[k].load_state_dict(load_weights(run.stage(k) / "block.pt", k, run)["block"])
        else:
            log(f"stage {k}/{cfg.num_stages - 1}: {why}; training it")
            manifest = run_stage(cfg, run, k, raw, device, None if blocks is None else blocks[k])
        manifests.append(manifest)

    saved = final_results(run)
    if saved and saved["final"]["fingerprint"] == manifests[-1]["fingerprint"]:
        log("final: complete, skipped")
    else:
        final = assemble_final(cfg, run, manifests, raw, device, blocks)
        if distributed.is_main():
            write_json(run.final / "results.json", {**collect_results(cfg, run), "final": final})
        distributed.barrier()
    return collect_results(cfg, run)


def verify_run(cfg: Config, run: RunDir) -> tuple[list[str], list[str]]:
    """Check a whole run directory (manifests, every shard's sha256, weights, epoch logs): one line per part,
    and the parts that are incomplete ("stage 1", "the final network").

    Damage raises UserError naming the file and the command that rebuilds it.
    """
    lines, incomplete = [], []
    for k in range(cfg.num_stages):
        manifest, why = stage_manifest(cfg, run, k)
        if manifest is None:
            lines.append(f"stage {k}: incomplete ({why})")
            incomplete.append(f"stage {k}")
            continue
        t0 = time.perf_counter()
        try:
            verify_shards(run.cache(k), manifest)
        except CorruptCache as e:
            raise UserError(f"{e}; rebuild the stage with: {rebuild_hint(run, k)}") from None
        block = run.stage(k) / "block.pt"
        if sha256_state_dict(load_weights(block, k, run)["block"]) != manifest["weights_hash"]:
            raise UserError(f"{block} does not hold the weights that made stage {k}'s cache; "
                            f"rebuild the stage with: {rebuild_hint(run, k)}")
        check_metrics(run.stage(k) / "metrics.jsonl", manifest["result"]["epochs"],
                      f"rebuild the stage with: {rebuild_hint(run, k)}")
        n = sum(len(manifest["splits"][s]["shards"]) for s in manifest["splits"])
        lines.append(f"stage {k}: complete, {n} shards ({cache_bytes(manifest) / 2**20:.1f} MB), weights and "
                     f"epoch log verified in {time.perf_counter() - t0:.2f}s")
    saved = final_results(run)
    last, _ = stage_manifest(cfg, run, cfg.num_stages - 1)
    if last is not None and saved and saved["final"]["fingerprint"] == last["fingerprint"]:
        lines.append("final: complete")
    else:
        lines.append("final: not assembled from the current stages")
        incomplete.append("the final network")
    return lines, incomplete
