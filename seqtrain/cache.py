"""A stage's cached output features: HDF5 shards per split, and the manifest that makes them a cache.

Layout (docs/design.md, "The run directory"): `cache/{split}-{index:05d}.h5` holds `features` [n, C, H, W]
(float16 by default), `labels` [n] and `ids` [n], with a fixed number of samples per shard (the last
one of a split may hold fewer). An int8 shard also holds its per-channel `scale` [C] (float32) and
`zero_point` [C] (int8), computed from its own features: x ~ (q - zero_point) * scale (`quantize`).
With --cache-views V > 1 the train split's features are [n, V, C, H, W]: V augmented views per sample,
view 0 plain (augment.py). Under torchrun each rank writes the shards of its own contiguous slice of
samples, `{split}-rank{r}-{index:05d}.h5`, and rank 0 writes the manifest. `cache/manifest.json` is
written last: a stage is complete exactly when a valid manifest exists. Shards are chunked along the
sample axis only and uncompressed by default: float16 reads at 1.5-2.1 GB/s here, gzip and lzf at
120-160 MB/s; hdf5plugin's LZ4 and Zstd store as small as lzf and gzip and read 3-5x faster than them
(docs/design.md, "Storage").
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import torch

from seqtrain import distributed
from seqtrain.contract import MANIFEST_FORMAT, SPLITS, Identity, Manifest, ShardInfo, SplitInfo, SplitTable, StageResult
from seqtrain.errors import UserError
from seqtrain.files import (
    publish,
    read_json,
    remove_tmp_files,
    sha256_file,
    sha256_json,
    tmp_path,
    write_json,
)
from seqtrain.log import bar

with contextlib.suppress(ImportError):  # registers the LZ4 and Zstd filters with HDF5 in every process that reads
    import hdf5plugin

MANIFEST = "manifest.json"
FLOAT16_MAX = float(torch.finfo(torch.float16).max)  # 65504
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
CHUNK_BYTES = 1 << 20  # ~1 MiB HDF5 chunks: large enough for full-speed reads, small enough to be cheap
# The dtype a shard's rows wait in until it is written (int8: as float32, see ShardWriter)
PENDING_DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.float32}


# --compression: h5py's own filters, and hdf5plugin's (an optional dependency) at the settings measured
# in docs/design.md ("Storage")
PLUGIN_FILTERS = {"lz4": lambda: hdf5plugin.LZ4(), "zstd": lambda: hdf5plugin.Zstd(clevel=3)}


def require_filter(compression: str) -> None:
    """A UserError naming the install when --compression (or a cache's) needs hdf5plugin and it is missing."""
    if compression in PLUGIN_FILTERS and importlib.util.find_spec("hdf5plugin") is None:
        raise UserError(f"--compression {compression} needs the hdf5plugin package: pip install hdf5plugin "
                        '(or pip install -e ".[compression]"), or use --compression none, lzf or gzip')


def filter_options(compression: str) -> dict:
    """create_dataset's keyword arguments for a --compression value."""
    if compression in PLUGIN_FILTERS:
        require_filter(compression)
        return dict(PLUGIN_FILTERS[compression]())
    return {} if compression == "none" else {"compression": compression}


class CorruptCache(UserError):
    """A cache that exists but cannot be trusted: missing, truncated or altered files, or a bad manifest."""


class FeatureOverflow(UserError):
    """Features that do not fit the cache dtype; stored as inf they would poison every later stage."""


# --------------------------------------------------------------------------------------------------------
# int8: per-channel affine quantization


def quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 features [..., C, H, W] as (int8 codes, scale [C] float32, zero_point [C] int8), from the range
    of each channel over every other axis, so that |dequantize(...) - x| <= scale / 2 per channel.

    Each channel's range is widened to hold 0, as torch.ao's min-max observers do: the zero point is then an
    integer code, ReLU's zeros stay exactly 0, and dequantizing never subtracts two large numbers. The cost
    is resolution on a channel whose values all lie far from 0 (post-ReLU features start at 0). A channel of
    zeros gets the smallest normal scale instead of dividing by zero. FeatureOverflow when a channel's range
    is too wide for its dequantized values to be finite float32.
    """
    axes = tuple(i for i in range(x.ndim) if i != x.ndim - 3)  # every axis but the channels'
    lo = np.minimum(x.min(axis=axes), 0).astype(np.float64)
    hi = np.maximum(x.max(axis=axes), 0).astype(np.float64)
    if (hi - lo).max(initial=0) > FLOAT32_MAX:
        c = int((hi - lo).argmax())
        raise FeatureOverflow(f"features of channel {c} span {lo[c]:.3g} to {hi[c]:.3g}, a range int8 cannot "
                              "scale within float32; rerun with --cache-dtype float32")
    scale = np.maximum((hi - lo) / 255, np.finfo(np.float32).tiny).astype(np.float32)
    zero = np.clip(np.round(-128 - lo / scale), -128, 127)
    shape = (-1, 1, 1)  # C -> C, 1, 1: broadcast over the rows, views and positions
    q = x / scale.reshape(shape)  # in place from here: one float32 copy of the shard at a time
    np.rint(q, out=q)
    q += zero.astype(np.float32).reshape(shape)
    return np.clip(q, -128, 127, out=q).astype(np.int8), scale, zero.astype(np.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """int8 codes [..., C, H, W] as float32: (q - zero_point) * scale, with scale and zero_point [C] for a whole
    shard or [B, C] for rows from several shards (a batch of the loader)."""
    between = q.ndim - 3 - (scale.ndim - 1)  # axes between the rows' and the channels': the views
    shape = (*scale.shape[:-1], *[1] * between, scale.shape[-1], 1, 1)
    return q.float().sub_(zero_point.reshape(shape)).mul_(scale.reshape(shape))


# --------------------------------------------------------------------------------------------------------
# Writing


class ShardWriter:
    """Collects one split's features and publishes them as fixed-size shards (write .tmp, then rename)."""

    def __init__(self, cache_dir: Path, split: str, samples_per_shard: int, dtype: str, compression: str,
                 prefix: str = ""):
        self.cache_dir, self.split, self.per_shard, self.prefix = cache_dir, split, samples_per_shard, prefix
        self.dtype, self.filter = np.dtype(dtype), filter_options(compression)
        # int8 is quantized per shard, from the shard's own range: until then its rows wait as float32 (up to
        # one shard, 4x --shard-mb of host memory)
        self.pending_torch = PENDING_DTYPES[self.dtype.name]
        self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self.pending_count = 0
        self.shards: list[dict] = []

    def add(self, features: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor) -> None:
        x = features.detach()
        # One pass for both checks (inf and nan reach the min or the max), and the conversion to the stored
        # dtype by torch, on the device: numpy's float32 -> float16 cast took 5.3 ms of a batch that torch
        # converts in 0.4 ms (stage 0's output, 2 CPU cores), and a float16 copy halves the bytes to the host.
        lo, hi = torch.stack(torch.aminmax(x)).tolist() if x.numel() else (0.0, 0.0)  # one device sync
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise FeatureOverflow(f"{self.split} features contain inf or nan: the block itself is unstable; "
                                  "retrain this stage with a lower --lr")
        peak = max(-lo, hi)
        if self.dtype == np.float16 and peak > FLOAT16_MAX:
            raise FeatureOverflow(f"{self.split} features reach |x| = {peak:.3g}, beyond float16's "
                                  f"{FLOAT16_MAX:.0f}; rerun with --cache-dtype float32")
        # a copy on the CPU too: the block's output may be a tensor its module keeps (a buffer, its input)
        rows = x.to(self.pending_torch, copy=x.device.type == "cpu").cpu()
        self.pending.append((rows.numpy(), labels.cpu().numpy(), ids.cpu().numpy()))
        self.pending_count += len(labels)
        while self.pending_count >= self.per_shard:
            self._flush(self.per_shard)

    def close(self) -> list[ShardInfo]:
        if self.pending_count:
            self._flush(self.pending_count)
        return self.shards

    def _flush(self, n: int) -> None:
        x, y, ids = (np.concatenate(parts) for parts in zip(*self.pending))
        keep = (x[n:], y[n:], ids[n:])
        self.pending, self.pending_count = ([keep] if len(keep[1]) else []), len(keep[1])
        name = f"{self.split}-{self.prefix}{len(self.shards):05d}.h5"
        path = self.cache_dir / name
        tmp = tmp_path(path)
        x, quant = x[:n], {}
        if self.dtype == np.int8:
            try:
                x, scale, zero = quantize(x)
            except FeatureOverflow as e:
                raise FeatureOverflow(f"{self.split} {e}") from None
            quant = {"scale": scale, "zero_point": zero}
        chunk_rows = max(1, min(n, CHUNK_BYTES // max(1, x[0].nbytes)))
        try:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("features", data=x, chunks=(chunk_rows, *x.shape[1:]), **self.filter)
                for key, value in quant.items():
                    f.create_dataset(key, data=value)
                f.create_dataset("labels", data=y[:n].astype(np.int64))
                f.create_dataset("ids", data=ids[:n].astype(np.int64))
            publish(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # e.g. ENOSPC mid-write: leave no temporary file behind
            raise
        self.shards.append(ShardInfo(name, n, path.stat().st_size, sha256_file(path)))


def samples_per_shard(feature_shape: tuple[int, ...], dtype: str, shard_mb: int) -> int:
    per_sample = int(np.prod(feature_shape)) * np.dtype(dtype).itemsize
    return max(1, shard_mb * 2**20 // per_sample)


def clear_cache(cache_dir: Path) -> None:
    """Unpublish a cache: the manifest goes first, so a crash midway leaves an incomplete cache, never a
    complete-looking one with missing shards."""
    (cache_dir / MANIFEST).unlink(missing_ok=True)
    if cache_dir.exists():
        shutil.rmtree(cache_dir)


@torch.no_grad()
def write_shards(block: torch.nn.Module, batches: dict, cache_dir: Path, *, dtype: str, shard_mb: int,
                 compression: str, autocast, prefix: str = "", memory=None) -> SplitTable:
    """Run every split through the frozen `block` in order and write its shards; returns the split table.

    `batches[split]` yields (x, y, ids) in a fixed order, x [B, C, H, W] or, for the train split's views,
    [B, V, C, H, W]; `autocast` is a context manager factory; `prefix` keeps ranks' shard names apart;
    `memory` (a memory.PeakMemory) watches the tensors of the batches it asks for.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not prefix:
        remove_tmp_files(cache_dir)
    block.eval()  # BatchNorm uses its frozen running statistics, as in every later use of these features
    splits, shape, views = {}, None, 1
    for split in SPLITS:
        writer = None
        for x, y, ids in bar(batches[split], f"cache {split}"):
            with memory.watch(block, x) if memory else contextlib.nullcontext(), autocast():
                if x.ndim == 5:  # B, V, C, H, W: every view of a sample goes through the block
                    views = x.shape[1]
                    out = block(x.flatten(0, 1)).unflatten(0, x.shape[:2])
                else:
                    out = block(x)
            if writer is None:
                shape = tuple(out.shape[1:]) if out.ndim == 4 else tuple(out.shape[2:])
                writer = ShardWriter(cache_dir, split, samples_per_shard(tuple(out.shape[1:]), dtype, shard_mb),
                                     dtype, compression, prefix)
            writer.add(out, y, ids)
        shards = writer.close() if writer else []
        splits[split] = SplitInfo(sum(s.count for s in shards), tuple(shards))
    return SplitTable(shape, views, dtype, compression, splits)


def merge_tables(tables: list[SplitTable]) -> SplitTable:
    """One split table from the tables of ranks that each cached a contiguous slice (in rank order)."""
    first = next(t for t in tables if t.feature_shape is not None)
    splits = {split: SplitInfo(sum(t.splits[split].count for t in tables),
                               tuple(s for t in tables for s in t.splits[split].shards)) for split in SPLITS}
    return SplitTable(first.feature_shape, max(t.views for t in tables), first.dtype, first.compression, splits)


def publish_manifest(cache_dir: Path, *, identity: Identity, weights_hash: str, num_classes: int,
                     table: SplitTable, result: StageResult | None) -> Manifest:
    """Write the manifest, last: from here on the cache is complete (contract.Manifest says what it holds)."""
    manifest = Manifest(identity, weights_hash, num_classes, tuple(table.feature_shape), table.views, table.dtype,
                        table.compression, table.splits, result, fingerprint="")
    manifest = dataclasses.replace(manifest, fingerprint=fingerprint(manifest.to_dict()))
    write_json(cache_dir / MANIFEST, manifest.to_dict())
    return manifest


def fingerprint(manifest: dict) -> str:
    """Hash of what determines the features (not of timings): equal fingerprints mean equal caches."""
    keys = ("config_hash", "input_fingerprint", "weights_hash", "feature_shape", "views", "dtype", "splits")
    return sha256_json({k: manifest[k] for k in keys})[:16]


# --------------------------------------------------------------------------------------------------------
# Reading and checking


def read_manifest(cache_dir: Path) -> Manifest | None:
    """The cache's manifest, None when there is none (the stage is incomplete); CorruptCache if damaged."""
    path = cache_dir / MANIFEST
    if not path.exists():
        return None
    try:
        raw = read_json(path)
        if raw.get("format") != MANIFEST_FORMAT:
            raise CorruptCache(f"{path} has format {raw.get('format')}, this seqtrain reads {MANIFEST_FORMAT}")
        if raw["fingerprint"] != fingerprint(raw):
            raise CorruptCache(f"{path} was altered: its fingerprint does not match its content")
        if raw.get("result") and "cache_seconds" not in raw["result"]:
            raise ValueError("a stage's result records its caching time")
        return Manifest.from_dict(raw)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise CorruptCache(f"{path} is not a valid seqtrain manifest") from None


def read_manifest_after_barrier(cache_dir: Path) -> Manifest:
    """The manifest rank 0 has just published, read by every rank once rank 0 has written it."""
    distributed.barrier()
    manifest = read_manifest(cache_dir)
    assert manifest is not None, f"{cache_dir / MANIFEST} was not published"
    return manifest


def verify_shards(cache_dir: Path, manifest: Manifest, checksums: bool = True,
                  share: tuple[int, int] = (0, 1)) -> None:
    """Check that every shard exists with its recorded size (and checksum); CorruptCache names the first bad one.

    `share` = (r, W): checksum only shards r, r + W, ... of the manifest's list (splits in order), a rank's
    part of the reading when W ranks check one cache together."""
    r, w = share
    shards = [s for split in SPLITS for s in manifest.splits[split].shards]
    for i, shard in enumerate(shards):
        path = cache_dir / shard.file
        if not path.exists():
            raise CorruptCache(f"{path} is missing")
        if path.stat().st_size != shard.bytes:
            raise CorruptCache(f"{path} has {path.stat().st_size} bytes, the manifest says {shard.bytes}")
        if checksums and i % w == r and sha256_file(path) != shard.sha256:
            raise CorruptCache(f"{path} is corrupt: its checksum differs from the manifest's")


def read_shard(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A whole shard in one contiguous read: features (stored dtype; int8 dequantized to float32), labels, ids
    as CPU tensors.

    Never fancy-index a chunked dataset (measured ~50x slower than contiguous reads, docs/design.md).
    """
    try:
        with h5py.File(path, "r") as f:
            x, y, ids = f["features"][...], f["labels"][...], f["ids"][...]
            quant = read_quantization(f, path)
    except (OSError, KeyError) as e:
        raise CorruptCache(f"{path} cannot be read ({e})") from None
    x = torch.from_numpy(x)
    return dequantize(x, *quant) if quant else x, torch.from_numpy(y), torch.from_numpy(ids)


def read_quantization(f: h5py.File, path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """An int8 shard's (scale [C], zero_point [C]) as float32 tensors; None for a float shard."""
    if f["features"].dtype != np.int8:
        return None
    scale, zero = f["scale"][...], f["zero_point"][...]
    channels = f["features"].shape[-3]
    if scale.shape != (channels,) or zero.shape != (channels,) or not np.isfinite(scale).all():
        raise CorruptCache(f"{path} has no valid int8 scale and zero point for its {channels} channels")
    return torch.from_numpy(scale.astype(np.float32)), torch.from_numpy(zero.astype(np.float32))
