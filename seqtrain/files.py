"""Crash-safe publishing: every file is written to `NAME.tmp`, flushed, then renamed over `NAME`.

A reader therefore sees either the old complete file or the new complete file, never a partial one
(`os.replace` is atomic on POSIX within one filesystem). Leftover `*.tmp` files belong to a killed
writer and are ignored by every reader and removed by the next writer of the same directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    return path.with_name(path.name + TMP_SUFFIX)


def publish(tmp: Path, path: Path) -> None:
    """Make a fully written `tmp` visible as `path` (fsync first, so a power cut cannot publish garbage)."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_bytes(path: Path, data: bytes) -> None:
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # e.g. ENOSPC: leave no temporary file behind
        raise


def write_json(path: Path, obj) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def save_torch(path: Path, obj) -> None:
    """torch.save through a temp file; `obj` must hold only tensors and primitives (weights_only loads)."""
    import torch  # here, not at the top: the command line's --help and errors come before torch loads

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def load_torch(path: Path, map_location="cpu"):
    import torch

    return torch.load(path, map_location=map_location, weights_only=True)


def remove_tmp_files(directory: Path) -> None:
    """Delete what a killed writer left behind in `directory` (never a published file)."""
    if directory.is_dir():
        for p in directory.glob("*" + TMP_SUFFIX):
            p.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj) -> str:
    """A stable hash of a JSON-able object (sorted keys), for configuration and fingerprint hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def sha256_state_dict(state: dict) -> str:
    """Hash of a state dict's names, dtypes, shapes and bytes: identifies the weights that made a cache."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
