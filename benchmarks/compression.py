"""Compression of cached features: size on disk and read throughput of each HDF5 filter, on a real cache.

    pip install hdf5plugin                                   # optional: Blosc, LZ4 and Zstd filters for HDF5
    python -m benchmarks.compression RUN_DIR/stage_00/cache  # any complete stage's cache

Every train shard of the cache is rewritten with each filter, chunked as seqtrain writes shards (~1 MiB
chunks of whole rows), into a temporary directory; then each copy is read back whole (`read_direct` into one
preallocated array, as the loader reads a shard) --repeats times, from the page cache, so the read figure is
the decompression cost, not the disk's. Reported per filter: bytes against the uncompressed shards (the
ratio), write and read MB/s of uncompressed feature bytes, and the read speed against no compression.
seqtrain offers `--compression none|lzf|gzip`; the hdf5plugin filters are measured to decide whether to
offer them, and are skipped with a note when hdf5plugin is not installed. Output: the table and, last, a
JSON line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from seqtrain.cache import CHUNK_BYTES, read_manifest
from seqtrain.memory import device_description


def filters() -> dict[str, dict | None]:
    """Filter name -> h5py create_dataset keyword arguments (None: hdf5plugin missing)."""
    out: dict[str, dict | None] = {"none": {}, "lzf": {"compression": "lzf"},
                                   "gzip-4": {"compression": "gzip", "compression_opts": 4}}
    plugin = importlib.import_module("hdf5plugin") if importlib.util.find_spec("hdf5plugin") else None
    plugins = {
        "blosc-lz4": lambda p: p.Blosc(cname="lz4", clevel=5, shuffle=p.Blosc.SHUFFLE),
        "blosc-zstd": lambda p: p.Blosc(cname="zstd", clevel=3, shuffle=p.Blosc.SHUFFLE),
        "lz4": lambda p: p.LZ4(),
        "zstd-3": lambda p: p.Zstd(clevel=3),
    }
    for name, make in plugins.items():
        out[name] = dict(make(plugin)) if plugin else None
    return out


def measure(shards: list[np.ndarray], kwargs: dict, tmp: Path, repeats: int) -> dict:
    raw = sum(x.nbytes for x in shards)
    paths = [tmp / f"{i:05d}.h5" for i in range(len(shards))]
    t0 = time.perf_counter()
    for x, path in zip(shards, paths):
        with h5py.File(path, "w") as f:
            rows = max(1, min(len(x), CHUNK_BYTES // max(1, x[0].nbytes)))
            f.create_dataset("features", data=x, chunks=(rows, *x.shape[1:]), **kwargs)
    write_s = time.perf_counter() - t0
    disk = sum(p.stat().st_size for p in paths)
    buffers = [np.empty_like(x) for x in shards]
    times = []
    for _ in range(repeats + 1):  # the first pass warms the page cache and is not counted
        t0 = time.perf_counter()
        for path, out in zip(paths, buffers):
            with h5py.File(path, "r") as f:
                f["features"].read_direct(out)
        times.append(time.perf_counter() - t0)
    assert all(np.array_equal(a, b) for a, b in zip(shards, buffers)), "a filter changed the features"
    for p in paths:
        p.unlink()
    read_s = min(times[1:])
    return {"ratio": disk / raw, "disk_bytes": disk, "write_mb_s": raw / 2**20 / write_s,
            "read_mb_s": raw / 2**20 / read_s}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache", type=Path, help="a complete stage cache directory, RUN_DIR/stage_KK/cache")
    p.add_argument("--repeats", type=int, default=3, help="timed reads of every copy; the fastest counts")
    p.add_argument("--max-shards", type=int, default=4, help="train shards to use, at most (default 4)")
    args = p.parse_args(argv)
    try:
        manifest = read_manifest(args.cache)
    except Exception as e:  # a damaged cache: say which, no traceback
        sys.exit(f"compression: {args.cache} is not a complete seqtrain cache ({e})")
    if manifest is None:
        sys.exit(f"compression: {args.cache} is not a complete seqtrain cache (no manifest.json)")
    files = [args.cache / s.file for s in manifest.splits["train"].shards][:args.max_shards]
    shards = []
    for path in files:
        with h5py.File(path, "r") as f:
            shards.append(f["features"][...])
    print(f"compression: {len(shards)} train shards of {args.cache}, {shards[0].dtype}, "
          f"{sum(x.nbytes for x in shards) / 2**20:.1f} MB, rows of {shards[0].shape[1:]}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory(dir=args.cache.parent) as tmp:  # the cache's disk, not /tmp's
        for name, kwargs in filters().items():
            results[name] = None if kwargs is None else measure(shards, kwargs, Path(tmp), args.repeats)
    base = results["none"]["read_mb_s"]
    print(f"{'filter':<12} {'size ratio':>10} {'write MB/s':>11} {'read MB/s':>10} {'read vs none':>13}")
    for name, r in results.items():
        if r is None:
            print(f"{name:<12} (hdf5plugin is not installed: pip install hdf5plugin)")
            continue
        print(f"{name:<12} {r['ratio']:>10.3f} {r['write_mb_s']:>11.0f} {r['read_mb_s']:>10.0f} "
              f"{r['read_mb_s'] / base:>13.2f}")
    print(json.dumps({"benchmark": "compression", "cache": str(args.cache), "dtype": str(shards[0].dtype),
                      "shards": len(shards), "torch": torch.__version__, "h5py": h5py.__version__,
                      "machine": device_description("cpu"), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
