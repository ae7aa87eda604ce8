"""One stage: train its block and head to convergence, freeze the block, cache its output, publish the manifest.

Only stage k's block and head are built: the process never sees blocks 0..k-1. Stage 0 reads the raw
dataset, stage k > 0 the verified cache of stage k-1 and nothing else (streams.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from seqtrain import distributed
from seqtrain.balance import block_costs
from seqtrain.cache import clear_cache, merge_tables, publish_manifest, read_manifest_after_barrier, write_shards
from seqtrain.config import Config
from seqtrain.contract import SPLITS, Identity, Manifest, SplitTable, StageResult
from seqtrain.data import RawData
from seqtrain.errors import UserError
from seqtrain.files import save_torch, sha256_state_dict
from seqtrain.layout import StageLayout
from seqtrain.log import log
from seqtrain.memory import PeakMemory, out_of_memory_as
from seqtrain.models import StageModel, build_head
from seqtrain.network import build_stage
from seqtrain.plan import free_disk, predicted_cache_bytes
from seqtrain.recompute import checkpointed
from seqtrain.rundir import RunDir, dataset_fingerprint, require_input_cache
from seqtrain.splitting import stage_shapes
from seqtrain.streams import (
    cached_batches,
    frozen_cached_batches,
    frozen_image_batches,
    image_batches,
    read_per_epoch,
    release,
    require_full_batch,
)
from seqtrain.train import autocast_for, evaluate, fit


def run_stage(cfg: Config, layout: StageLayout, run: RunDir, k: int, raw: RawData | None, device: torch.device,
              block: torch.nn.Module | None = None, input_just_written: bool = False) -> Manifest:
    """Train stage k to convergence (resuming a checkpoint when one matches), freeze it, cache its output.

    `block` is stage k's module when the caller holds it (seqtrain.train_stages); otherwise it is built from
    the layout. `input_just_written`: this process has just published stage k-1's cache, its checksums taken
    from the files as written, so they are not read and hashed a second time. Returns the stage's published
    manifest.
    """
    inputs = stage_inputs(cfg, layout, run, k, raw, device, checksums=not input_just_written)
    given = block is not None
    torch.manual_seed(cfg.seed * 1000 + k)  # the same initialisation whatever ran before in this process
    if block is None:
        block, out_shape = build_stage(cfg, layout, k, inputs.in_shape)
    else:
        out_shape = stage_shapes([block], inputs.in_shape)[0]
    # Every rank checks (cheap, one filesystem), so under torchrun all refuse together instead of hanging.
    check_disk(run, k, predicted_cache_bytes(tuple(out_shape), cfg, inputs.counts))
    head = build_head(cfg, out_shape[0], inputs.num_classes, layout.specs_after(k))
    model = StageModel(block, head).to(device)
    identity = Identity(layout.config_hash, inputs.fingerprint, k)

    unpublish_stage(run, k)  # stage k is incomplete from here until its new manifest is published
    log(f"stage {k}/{layout.num_stages - 1}: {len(block) if isinstance(block, torch.nn.Sequential) else 1} "
        f"block(s), {sum(p.numel() for p in block.parameters()):,} parameters, input {inputs.in_shape}")
    with out_of_memory_as(f"stage {k}", memory_fixes(cfg), predicted_peak(cfg, layout, k)):
        result = train_stage(cfg, layout, run, k, model, inputs, identity, device)
        # The caching pass holds the frozen block alone, so that its peak is its own work: the head (saved in
        # block.pt) and the last step's gradients would otherwise stay on the device through it.
        del model, head
        for p in block.parameters():
            p.grad = None
        table, result = cache_stage(cfg, run, k, block, inputs, device, result)
    manifest = publish_stage(run, k, block, identity, inputs.num_classes, table, result)
    if given:  # seqtrain.train_stages: the caller's block leaves the device, out of the next stages' peaks
        block.cpu()
    return manifest


def memory_fixes(cfg: Config) -> list[str]:
    """What makes a stage fit a GPU that it did not fit."""
    fixes = ["more --stages (or --stages auto --memory-budget with your GPU's memory)"]
    return fixes + ([] if cfg.checkpoint else ["--checkpoint"]) + ["a smaller --batch-size"]


def predicted_peak(cfg: Config, layout: StageLayout, k: int) -> int | None:
    """The cut's own prediction of stage k's tensor peak (balance.py); None for networks it does not cost."""
    if not layout.own_blocks:
        return None
    start = layout.starts()[k]
    return block_costs(cfg, layout.in_shape).stage_bytes(start, start + layout.sizes[k] - 1)


@dataclass
class StageInputs:
    """What stage k reads: batch streams to train and evaluate on, and to cache; the input's shape and identity."""

    in_shape: tuple[int, ...]  # C, H, W of one input sample
    num_classes: int
    fingerprint: str | None  # the dataset's (stage 0) or the previous cache's
    counts: dict[str, int]  # samples per split
    batches: dict  # split -> batches to train on (train: shuffled, augmented) or evaluate on
    frozen: dict  # split -> this rank's slice, in order, every view: what the caching pass reads


def stage_inputs(cfg: Config, layout: StageLayout, run: RunDir, k: int, raw: RawData | None, device,
                 checksums: bool = True) -> StageInputs:
    """Stage 0 reads the raw dataset; stage k > 0 the verified cache of stage k-1 (its shards' sizes, and their
    checksums unless `checksums` is False), and nothing else."""
    if k == 0:
        assert raw is not None, "stage 0 reads the raw dataset"
        inputs = StageInputs(
            tuple(raw.in_shape), raw.num_classes, dataset_fingerprint(cfg, run),
            {s: len(getattr(raw, s)) for s in SPLITS},
            {s: image_batches(cfg, raw, s, device, train=s == "train") for s in SPLITS},
            {s: frozen_image_batches(cfg, raw, s, device) for s in SPLITS})
    else:
        prev = require_input_cache(cfg, layout, run, k, checksums)
        inputs = StageInputs(
            tuple(prev.feature_shape), prev.num_classes, prev.fingerprint,
            {s: prev.splits[s].count for s in SPLITS},
            {s: cached_batches(cfg, run.cache(k - 1), prev, s, device, train=s == "train") for s in SPLITS},
            {s: frozen_cached_batches(cfg, run.cache(k - 1), prev, s, device) for s in SPLITS})
    require_full_batch(cfg, inputs.batches["train"], inputs.counts["train"])
    return inputs


def unpublish_stage(run: RunDir, k: int) -> None:
    """Stage k's cache and weights go before it trains; under torchrun rank 0 does it and the others wait."""
    if distributed.is_main():
        clear_cache(run.cache(k))
        (run.stage(k) / "block.pt").unlink(missing_ok=True)
        run.stage(k).mkdir(parents=True, exist_ok=True)
    distributed.barrier()


def train_stage(cfg: Config, layout: StageLayout, run: RunDir, k: int, model: StageModel, inputs: StageInputs,
                identity: Identity, device) -> StageResult:
    """Train block + head to convergence, score the head on the test split, save block.pt; the stage's figures."""
    desc = f"stage {k}/{layout.num_stages - 1}"
    with PeakMemory(device) as memory, checkpointed([model.block], cfg.checkpoint):
        trained = fit(model, inputs.batches["train"], inputs.batches["val"], cfg, workdir=run.stage(k),
                      identity=identity, device=device, desc=desc, memory=memory)
        release(inputs.batches["train"], inputs.batches["val"])  # splits kept in memory go once trained on
        _, test_acc = evaluate(model, inputs.batches["test"], autocast_for(device, cfg.bf16))
        release(inputs.batches["test"])
    if distributed.is_main():
        save_torch(run.stage(k) / "block.pt", {"block": model.block.state_dict(), "head": model.head.state_dict(),
                                               "identity": identity.to_dict(), "config": cfg.to_dict()})
    read = read_per_epoch(inputs.batches["train"])
    log(f"{desc}: trained | val acc {trained.best_val_acc:.4f} | test acc {test_acc:.4f}"
        + (f" | read {read['rank0']:.1f} MB per rank and epoch" if read else ""))
    figures = memory.as_dict()
    return StageResult(val_acc=trained.best_val_acc, test_acc=test_acc, epochs=trained.epochs,
                       best_epoch=trained.best_epoch, train_seconds=round(trained.train_seconds, 2),
                       parameters=sum(p.numel() for p in model.block.parameters()),
                       peak_tensor_mb=figures["peak_tensor_mb"], peak_rss_mb=figures["peak_rss_mb"],
                       train_memory=figures, read_mb_per_rank_epoch=read, checkpoint=cfg.checkpoint)


def cache_stage(cfg: Config, run: RunDir, k: int, block: torch.nn.Module, inputs: StageInputs, device,
                result: StageResult) -> tuple[SplitTable, StageResult]:
    """Push every split through the frozen block into this rank's shards; (merged split table, the result with
    the caching pass's time and memory, its peaks the larger of training's and caching's).

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
    caching = memory.as_dict()
    result.cache_seconds, result.cache_memory = round(time.perf_counter() - t0, 2), caching
    result.peak_tensor_mb = max(result.peak_tensor_mb, caching["peak_tensor_mb"])
    result.peak_rss_mb = max(result.peak_rss_mb, caching["peak_rss_mb"])
    return merge_tables(tables), result


def publish_stage(run: RunDir, k: int, block: torch.nn.Module, identity: Identity, num_classes: int,
                  table: SplitTable, result: StageResult) -> Manifest:
    """Rank 0 writes the manifest (the stage is complete from here) and drops the checkpoint; every rank
    returns the published manifest."""
    if distributed.is_main():
        publish_manifest(run.cache(k), identity=identity, weights_hash=sha256_state_dict(block.state_dict()),
                         num_classes=num_classes, table=table, result=result)
        (run.stage(k) / "checkpoint.pt").unlink(missing_ok=True)  # block.pt supersedes it
    manifest = read_manifest_after_barrier(run.cache(k))
    log(f"stage {k}: cached | {manifest.bytes / 2**20:.1f} MB | tensor peak {result.peak_tensor_mb:.1f} MB")
    return manifest


def check_disk(run: RunDir, k: int, need: int) -> None:
    """Refuse before training when the stage's cache cannot fit, rather than fail hours later mid-write."""
    where, free = free_disk(run.root)  # the run directory, or where it will be made
    if need > free:
        raise UserError(f"stage {k}'s cache needs {need / 2**20:,.0f} MB but {where} has {free / 2**20:,.0f} MB "
                        "free: free some space or use another --run-dir")
