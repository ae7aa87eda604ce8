"""The run directory (docs/design.md, "The run directory"): its paths, its lock, and what in it is current.

Stage k is complete exactly when `stage_kk/cache/manifest.json` is valid, was made with this run's
configuration, and from the input that exists now: stage 0's input is the dataset, stage k's the cache
of stage k-1 (identified by its manifest's fingerprint). Re-training a stage therefore makes every later
stage stale whenever its features changed, without any bookkeeping beyond the manifests.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import torch

from seqtrain import distributed
from seqtrain.cache import CorruptCache, read_manifest, require_filter, verify_shards
from seqtrain.config import Config, shaping_dict
from seqtrain.contract import SPLITS, Manifest, StageResult
from seqtrain.data import RawData, source_fingerprint
from seqtrain.errors import UserError
from seqtrain.files import read_json, sha256_json, sha256_state_dict, write_json
from seqtrain.integrity import check_metrics, read_e2e_results, read_final_results, read_weights
from seqtrain.layout import StageLayout


class RunDir:
    """The paths of the run-directory contract, and what this run has read of its input."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.config = self.root / "config.json"
        self.final = self.root / "final"
        self.e2e = self.root / "e2e"
        self.e2e_checkpoint = self.root / "e2e_checkpoint"  # the baseline with activation checkpointing
        # Stage 0's input fingerprint, computed once per RunDir (listing a large image folder is not free)
        # and not once per process: a second train_stages() call must see files added in between.
        self.input_fingerprints: dict[str, str | None] = {}

    def e2e_home(self, checkpoint: bool) -> Path:
        return self.e2e_checkpoint if checkpoint else self.e2e

    def stage(self, k: int) -> Path:
        return self.root / f"stage_{k:02d}"

    def cache(self, k: int) -> Path:
        return self.stage(k) / "cache"


def rebuild_hint(run: RunDir, k: int) -> str:
    return f"python -m seqtrain.run --stage {k} --run-dir {run.root}"


def corrupt(e: CorruptCache, run: RunDir, k: int) -> UserError:
    """A damaged cache of stage k, as the user's one line: what is wrong and the command that rebuilds it."""
    return UserError(f"{e}; rebuild the stage with: {rebuild_hint(run, k)}")


# --------------------------------------------------------------------------------------------------------
# Making, locking and describing a run directory


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


# --------------------------------------------------------------------------------------------------------
# What is current


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


def stage_manifest(cfg: Config, layout: StageLayout, run: RunDir, k: int) -> tuple[Manifest | None, str]:
    """(manifest, "") when stage k is complete and current, else (None, why not) in words for the user."""
    try:
        manifest = read_manifest(run.cache(k))
        if manifest is not None and (manifest.stage != k or manifest.result is None):
            raise CorruptCache(f"{run.cache(k) / 'manifest.json'} is not a valid seqtrain manifest of stage {k}")
    except CorruptCache as e:
        raise corrupt(e, run, k) from None
    if manifest is None:
        return None, f"stage {k} has no complete cache"
    if manifest.identity.config_hash != layout.config_hash:
        return None, f"stage {k}'s cache was made with another configuration"
    if k == 0:
        expected = dataset_fingerprint(cfg, run) or manifest.identity.input_fingerprint  # no image folder: trust it
    else:
        previous, why = stage_manifest(cfg, layout, run, k - 1)
        if previous is None:
            return None, why
        expected = previous.fingerprint
    if manifest.identity.input_fingerprint != expected:
        return None, f"stage {k}'s cache is stale: it was made from an earlier version of its input"
    return manifest, ""


def require_input_cache(cfg: Config, layout: StageLayout, run: RunDir, k: int, checksums: bool = True) -> Manifest:
    """The complete (and checksum-verified) cache of stage k-1, or a UserError naming the stage to run first.

    Under torchrun each rank checksums its own shards (r, r + W, ...), and a damaged shard any rank finds
    is every rank's error: the same line, and no rank left waiting for the others."""
    manifest, why = stage_manifest(cfg, layout, run, k - 1)
    if manifest is None:
        raise UserError(f"stage {k} reads the cache of stage {k - 1}, but {why} in {run.root}: "
                        f"run --stage {k - 1} first (or --stage all)")
    require_filter(manifest.compression)  # a cache written with hdf5plugin's filters
    error = None
    try:
        verify_shards(run.cache(k - 1), manifest, checksums, share=(distributed.rank(), distributed.world_size()))
    except CorruptCache as e:
        error = str(corrupt(e, run, k - 1))
    errors = [e for e in distributed.gather(error) if e is not None]
    if errors:
        raise UserError(errors[0])
    return manifest


def load_weights(path: Path, k: int, run: RunDir) -> dict:
    return read_weights(path, f"rebuild the stage with {rebuild_hint(run, k)}")


def check_weights(saved: dict, manifest: Manifest, path: Path, run: RunDir, k: int) -> None:
    """block.pt must hold the weights that made stage k's cache (the manifest records their hash)."""
    if sha256_state_dict(saved["block"]) != manifest.weights_hash:
        raise UserError(f"{path} does not hold the weights that made stage {k}'s cache; "
                        f"rebuild the stage with: {rebuild_hint(run, k)}")


def final_results(run: RunDir) -> dict | None:
    return read_final_results(run.final / "results.json", f"--stage all --run-dir {run.root}")


def collect_results(cfg: Config, layout: StageLayout, run: RunDir) -> dict:
    """Every figure of the summary table, from the manifests and result files on disk."""
    stages = []
    for k in range(layout.num_stages):
        manifest, _ = stage_manifest(cfg, layout, run, k)
        if manifest is not None:
            stages.append({"stage": k, **manifest.result.to_dict(), "cache_mb": round(manifest.bytes / 2**20, 2),
                           "feature_shape": list(manifest.feature_shape)})
    final = (final_results(run) or {}).get("final")
    baselines = {}
    for key, checkpoint in (("e2e", False), ("e2e_checkpoint", True)):
        flag = " --checkpoint" if checkpoint else ""
        record = read_e2e_results(run.e2e_home(checkpoint) / "results.json",
                                  f"--stage e2e{flag} --run-dir {run.root}")
        baselines[key] = record if record and is_baseline_of(record, layout) else None
    results = {"stages": stages, "final": final, **baselines, "arch": cfg.arch, "config_hash": layout.config_hash,
               "torch": torch.__version__}
    return {**results, "versus": versus(results)}


def versus(results: dict) -> dict:
    """The answer a run is for, against each baseline it has: the final network's accuracy gap in points, its
    largest stage's tensor peak and its stages' time (training and caching) as multiples of the baseline's."""
    stages, final, out = results["stages"], results["final"], {}
    for key in ("e2e", "e2e_checkpoint"):
        base = results.get(key)
        if not (base and final and stages):
            continue
        seconds = sum(StageResult.from_dict(s).seconds for s in stages)
        out[key] = {"points": round(100 * (final["test_acc"] - base["test_acc"]), 2),
                    "memory": round(max(s["peak_tensor_mb"] for s in stages) / base["peak_tensor_mb"], 3)
                    if base["peak_tensor_mb"] else None,
                    "time": round(seconds / base["train_seconds"], 3) if base["train_seconds"] else None}
    return out


def is_baseline_of(record: dict, layout: StageLayout) -> bool:
    """An e2e result belongs to this run when it was made of the same network and settings; results written
    before e2e was identified by its network (not by the cut) carry the configuration hash alone."""
    if "network_hash" in record:
        return record["network_hash"] == layout.network_hash
    return record.get("config_hash") == layout.config_hash


def e2e_record(result: StageResult, layout: StageLayout) -> dict:
    """An e2e results.json: the baseline's figures and the hashes it was made with."""
    return {**result.to_dict(), "config_hash": layout.config_hash, "network_hash": layout.network_hash}


def verify_run(cfg: Config, layout: StageLayout, run: RunDir) -> tuple[list[str], list[str]]:
    """Check a whole run directory (manifests, every shard's sha256, weights, epoch logs): one line per part,
    and the parts that are incomplete ("stage 1", "the final network").

    Damage raises UserError naming the file and the command that rebuilds it.
    """
    lines, incomplete = [], []
    for k in range(layout.num_stages):
        manifest, why = stage_manifest(cfg, layout, run, k)
        if manifest is None:
            lines.append(f"stage {k}: incomplete ({why})")
            incomplete.append(f"stage {k}")
            continue
        t0 = time.perf_counter()
        try:
            verify_shards(run.cache(k), manifest)
        except CorruptCache as e:
            raise corrupt(e, run, k) from None
        block = run.stage(k) / "block.pt"
        check_weights(load_weights(block, k, run), manifest, block, run, k)
        check_metrics(run.stage(k) / "metrics.jsonl", manifest.result.epochs,
                      f"rebuild the stage with: {rebuild_hint(run, k)}")
        n = sum(len(manifest.splits[s].shards) for s in SPLITS)
        lines.append(f"stage {k}: complete, {n} shards ({manifest.bytes / 2**20:.1f} MB), weights and "
                     f"epoch log verified in {time.perf_counter() - t0:.2f}s")
    saved = final_results(run)
    last, _ = stage_manifest(cfg, layout, run, layout.num_stages - 1)
    if last is not None and saved and saved["final"]["fingerprint"] == last.fingerprint:
        lines.append("final: complete")
    else:
        lines.append("final: not assembled from the current stages")
        incomplete.append("the final network")
    return lines, incomplete
