"""The run directory's contract as types: what a stage publishes and the next one reads.

One definition each of the records that cross a process boundary through files (docs/design.md, "The run
directory"): a cache's `Manifest` (its split table of `SplitInfo` and `ShardInfo`, the `Identity` of the
stage that made it, and that stage's `StageResult`), and e2e's result, which is a `StageResult` too.
Every file is read and written only through `to_dict` / `from_dict`, so the JSON keys live here and
nowhere else. `from_dict` checks the types it reads and raises ValueError on anything else (callers name
the file); it accepts the files of earlier seqtrain versions (fields they lacked get their defaults).
Imports nothing of the package, so every module may use these types.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


def _number(value, name: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return value


def _count(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a count, got {value!r}")
    return value


def _text(value, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {value!r}")
    return value


def _figures(value, keys: tuple[str, ...], name: str) -> dict:
    """A dict whose `keys` are numbers (other keys are kept as they are: memory figures grow over versions)."""
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object, got {value!r}")
    for k in keys:
        _number(value.get(k), f"{name}.{k}")
    return value


# --------------------------------------------------------------------------------------------------------
# Identity: which configuration and which input made a stage


@dataclass(frozen=True)
class Identity:
    """What a checkpoint, a cache and a result were made from: checkpoints resume, and caches count as
    current, only when their identity equals this run's."""

    config_hash: str  # config.config_hash(cfg, stage sizes): every setting that shapes the numbers
    input_fingerprint: str | None  # the dataset's (stage 0, e2e) or the previous cache's fingerprint
    stage: int | str  # k, or "e2e"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Identity:
        fp = d.get("input_fingerprint")
        if fp is not None:
            _text(fp, "input_fingerprint")
        stage = d.get("stage")
        if not (stage == "e2e" or (isinstance(stage, int) and not isinstance(stage, bool))):
            raise ValueError(f"stage must be a number or 'e2e', got {stage!r}")
        return cls(_text(d.get("config_hash"), "config_hash"), fp, stage)


# --------------------------------------------------------------------------------------------------------
# A stage's (or e2e's) figures


READ_FIGURES = ("rank0", "max")  # MB of cached features an epoch read: rank 0's, and the most any rank read


@dataclass
class StageResult:
    """The figures of one trained stage (or of e2e): the summary table's row and results.json's record."""

    val_acc: float
    test_acc: float
    epochs: int  # epochs run in all, over every resumed part
    best_epoch: int  # 1-based epoch whose weights were kept
    train_seconds: float  # training wall time, summed over every resumed part
    parameters: int
    peak_tensor_mb: float  # the largest tensor peak of training and caching
    peak_rss_mb: float
    train_memory: dict = field(default_factory=dict)  # memory.PeakMemory.as_dict() of training
    cache_seconds: float = 0.0  # e2e: 0, it caches nothing
    cache_memory: dict | None = None
    read_mb_per_rank_epoch: dict | None = None  # stages k > 0: MB read per epoch (older manifests lack it)
    checkpoint: bool = False  # trained with activation checkpointing of every block

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict) -> StageResult:
        if not isinstance(d, dict):
            raise ValueError(f"a result must be an object, got {d!r}")
        read = d.get("read_mb_per_rank_epoch")
        cache_memory = d.get("cache_memory")
        return cls(
            val_acc=_number(d.get("val_acc"), "val_acc"), test_acc=_number(d.get("test_acc"), "test_acc"),
            epochs=_count(d.get("epochs"), "epochs"), best_epoch=_count(d.get("best_epoch"), "best_epoch"),
            train_seconds=_number(d.get("train_seconds"), "train_seconds"),
            parameters=_count(d.get("parameters", 0), "parameters"),
            peak_tensor_mb=_number(d.get("peak_tensor_mb"), "peak_tensor_mb"),
            peak_rss_mb=_number(d.get("peak_rss_mb"), "peak_rss_mb"),
            train_memory=d.get("train_memory") or {},
            cache_seconds=_number(d.get("cache_seconds", 0.0), "cache_seconds"),
            cache_memory=None if cache_memory is None else _figures(cache_memory, (), "cache_memory"),
            read_mb_per_rank_epoch=None if read is None else _figures(read, READ_FIGURES, "read_mb_per_rank_epoch"),
            checkpoint=bool(d.get("checkpoint", False)))

    @property
    def seconds(self) -> float:
        """Training and caching: what the stage cost."""
        return self.train_seconds + self.cache_seconds


# --------------------------------------------------------------------------------------------------------
# A cache: its shards, splits and manifest


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name inside the cache directory, e.g. train-00003.h5 or train-rank1-00000.h5
    count: int  # samples
    bytes: int  # file size
    sha256: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ShardInfo:
        if not isinstance(d, dict):
            raise ValueError(f"a shard must be an object, got {d!r}")
        name = _text(d.get("file"), "file")
        if "/" in name or name in ("", ".", ".."):  # a shard lives inside its cache directory
            raise ValueError(f"shard file {name!r} is not a file name")
        return cls(name, _count(d.get("count"), "count"), _count(d.get("bytes"), "bytes"),
                   _text(d.get("sha256"), "sha256"))


@dataclass(frozen=True)
class SplitInfo:
    count: int  # samples in the split: the sum of its shards'
    shards: tuple[ShardInfo, ...]

    def to_dict(self) -> dict:
        return {"count": self.count, "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: dict) -> SplitInfo:
        if not isinstance(d, dict) or not isinstance(d.get("shards"), list):
            raise ValueError(f"a split must be an object with a list of shards, got {d!r}")
        info = cls(_count(d.get("count"), "count"), tuple(ShardInfo.from_dict(s) for s in d["shards"]))
        if info.count != sum(s.count for s in info.shards):
            raise ValueError("a split's count is not the sum of its shards'")
        return info

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)


@dataclass(frozen=True)
class SplitTable:
    """What the caching pass wrote (cache.write_shards): the features' shape and storage, and every split."""

    feature_shape: tuple[int, ...] | None  # C, H, W of one view of one sample; None when nothing was written
    views: int  # views per training sample (1: plain)
    dtype: str  # float16, float32 or int8
    compression: str
    splits: dict[str, SplitInfo]


MANIFEST_FORMAT = 2  # 2: views per training sample; rank-sliced shards


@dataclass(frozen=True)
class Manifest:
    """A complete stage cache (cache/manifest.json, written last): who made it, what it holds, its figures.

    `fingerprint` identifies what shapes the features (not the timings beside them): equal fingerprints mean
    equal caches, and stage k+1's identity names stage k's fingerprint as its input."""

    identity: Identity
    weights_hash: str  # files.sha256_state_dict of the frozen block that made the features
    num_classes: int
    feature_shape: tuple[int, ...]
    views: int
    dtype: str
    compression: str
    splits: dict[str, SplitInfo]
    result: StageResult | None  # None for a cache written outside a stage (benchmarks/memory.py's inputs)
    fingerprint: str
    format: int = MANIFEST_FORMAT

    @property
    def stage(self) -> int | str:
        return self.identity.stage

    @property
    def bytes(self) -> int:
        """Every shard's bytes on disk."""
        return sum(self.splits[s].bytes for s in SPLITS)

    def to_dict(self) -> dict:
        return {**self.identity.to_dict(), "weights_hash": self.weights_hash, "num_classes": self.num_classes,
                "feature_shape": list(self.feature_shape), "views": self.views, "dtype": self.dtype,
                "compression": self.compression, "splits": {s: i.to_dict() for s, i in self.splits.items()},
                "result": self.result.to_dict() if self.result else {}, "format": self.format,
                "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        if not isinstance(d, dict):
            raise ValueError("a manifest must be an object")
        shape = d.get("feature_shape")
        if not (isinstance(shape, list) and shape and all(isinstance(n, int) and n > 0 for n in shape)):
            raise ValueError(f"feature_shape must be a list of sizes, got {shape!r}")
        splits = d.get("splits")
        if not isinstance(splits, dict):
            raise ValueError("splits must be an object")
        num_classes = _count(d.get("num_classes"), "num_classes")
        if num_classes < 1:
            raise ValueError("num_classes must be at least 1")
        return cls(identity=Identity.from_dict(d), weights_hash=_text(d.get("weights_hash"), "weights_hash"),
                   num_classes=num_classes, feature_shape=tuple(shape),
                   views=_count(d.get("views", 1), "views"), dtype=_text(d.get("dtype"), "dtype"),
                   compression=_text(d.get("compression", "none"), "compression"),
                   splits={s: SplitInfo.from_dict(splits.get(s)) for s in SPLITS},
                   result=StageResult.from_dict(d["result"]) if d.get("result") != {} else None,
                   fingerprint=_text(d.get("fingerprint"), "fingerprint"), format=d.get("format"))
