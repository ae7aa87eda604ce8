"""`--plan`: what a configuration will cost before anything is trained: memory per stage and cache disk.

    python -m seqtrain.run --plan [flags]      # prints the table and exits: loads no data, trains nothing

Per stage: its parameters, output feature shape, the analytic training memory at the configured batch
size (memory.analytic_step on the "meta" device: one real forward/backward/optimizer step that computes
nothing, about a second for a ResNet-18), the host memory of its input, and the bytes its cache will
take on disk (every split, in the cache dtype, int8 with each shard's per-channel scale and zero point;
the train split holds --cache-views V views of each sample, [n, V, C, H, W], so its bytes grow V-fold
and its shards hold V-fold fewer samples; val and test hold one). Then the end-to-end baseline, the
totals, the free space where the run directory is, or will be, and every block's output resolution,
stage by stage, so that schedules can be compared (--downsample standard against accelerated: where the
resolution drops, and how many blocks run at each resolution).

The analytic figure is a floor, not the peak: the transient gradients of activations during backward,
allocator caches and library workspaces come on top (benchmarks/memory.py measures the ratio). With
--bf16 on CUDA the activations are bfloat16 and smaller than predicted here (float32). Cache sizes are
those of seqtrain.cache's own layout, byte for byte for uncompressed shards of up to 64 chunks with HDF5 2.0
(tests/test_memory_benchmark.py); other HDF5 versions may differ by their metadata.
"""
from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import torch

from seqtrain.archs import USUAL_CONVS, BlockSpec, even_sizes, feature_shape
from seqtrain.balance import block_costs, library_bytes, runs_on_cuda, step_temporary_bytes
from seqtrain.cache import CHUNK_BYTES, samples_per_shard
from seqtrain.config import Config
from seqtrain.contract import SPLITS
from seqtrain.data import dataset_info, input_shape
from seqtrain.layout import StageLayout, resolve_layout
from seqtrain.loader import window_rows
from seqtrain.memory import TRANSIENT_ACTIVATIONS, StepBytes, analytic_step
from seqtrain.meta import quick_meta
from seqtrain.models import SequentialNet, StageModel, build_head, build_stage_block
from seqtrain.recompute import checkpointed, recompute_extra_bytes
from seqtrain.report import aligned, mb, shape_text
from seqtrain.splitting import is_torchvision, torchvision_stage_names, torchvision_stage_shapes
from seqtrain.splitting import meta_stages as torchvision_meta_stages
from seqtrain.train import make_optimizer

# Bytes of one HDF5 shard beyond its data, measured with h5py 3.16 / HDF5 2.0 for shards of up to 64
# chunks (--shard-mb 64 or less): superblock, three object headers, the chunk index. Larger shards add
# a few KB per further 64 chunks of 1 MB, under 0.01%.
SHARD_OVERHEAD = 7104
LABEL_ID_BYTES = 16  # int64 label + int64 sample id per sample
QUANT_BYTES = 5  # an int8 shard's float32 scale and int8 zero point per channel (their headers fit in the above)
VIEW_INDEX_BYTES = 520  # [n, V, C, H, W] features: the chunk index's 65 keys are 8 bytes wider (measured)


def split_counts(cfg: Config) -> dict[str, int]:
    """Samples per split, carved as data.load_raw carves them: val = round(n_train * val_fraction)."""
    info = dataset_info(cfg)
    n_train, n_test = info["n_train"], info["n_test"]
    n_val = round(n_train * cfg.val_fraction)
    return {"train": n_train - n_val, "val": n_val, "test": n_test}


# --------------------------------------------------------------------------------------------------------
# Predictions


def step_bytes(cfg: Config, model: torch.nn.Module, in_shape: tuple[int, ...]) -> StepBytes:
    """Analytic bytes of one training step of `model` (built on the meta device) at cfg.batch_size."""
    x = torch.empty(cfg.batch_size, *in_shape, device="meta")  # B, C, H, W
    y = torch.zeros(cfg.batch_size, dtype=torch.long, device="meta")
    return analytic_step(model, make_optimizer(cfg, model), x, y)


def shard_bytes(n: int, row_bytes: int, extra: int = 0) -> int:
    """File size of one shard of `n` samples, mirroring ShardWriter's layout: HDF5 stores whole chunks;
    `extra`: the bytes shard_extra adds to a float shard of [n, C, H, W] features."""
    chunk_rows = max(1, min(n, CHUNK_BYTES // max(1, row_bytes)))
    return math.ceil(n / chunk_rows) * chunk_rows * row_bytes + n * LABEL_ID_BYTES + SHARD_OVERHEAD + extra


def shard_extra(row_shp: tuple[int, ...], dtype: str) -> int:
    """Per-shard bytes beyond a float shard of [n, C, H, W]: int8's scale and zero point of each of the C
    channels, and a wider chunk index for each further axis (the views of [n, V, C, H, W])."""
    return (QUANT_BYTES * row_shp[-3] if dtype == "int8" else 0) + VIEW_INDEX_BYTES * (len(row_shp) - 3)


def row_shape(shape: tuple[int, ...], cfg: Config, split: str) -> tuple[int, ...]:
    """The stored shape of one sample of `split`: [V, C, H, W] for the train split's views, else [C, H, W]."""
    return (cfg.cache_views, *shape) if split == "train" and cfg.cache_views > 1 else tuple(shape)


def predicted_cache_bytes(shape: tuple[int, ...], cfg: Config, counts: dict[str, int]) -> int:
    """Bytes on disk of one stage's cache of `shape` features, every split (train with its views), uncompressed."""
    total = 0
    for split in SPLITS:
        row_shp = row_shape(shape, cfg, split)
        row = int(np.prod(row_shp)) * np.dtype(cfg.cache_dtype).itemsize
        per_shard = samples_per_shard(row_shp, cfg.cache_dtype, cfg.shard_mb)
        full, rest = divmod(counts[split], per_shard)
        extra = shard_extra(row_shp, cfg.cache_dtype)
        total += full * shard_bytes(per_shard, row, extra) + (shard_bytes(rest, row, extra) if rest else 0)
    return total


def input_bytes(cfg: Config, k: int, in_shape: tuple[int, ...], counts: dict[str, int]) -> int:
    """Host memory of stage k's input beside the step: for stage 0 (and e2e) the raw uint8 dataset, held
    whole in RAM; for later stages the train and val loaders' two pools each (--shuffle-mb each, at least a
    shard, at most the split, each with room for a batch of leftover rows), as loader.CachedBatches sizes
    them; a split that fits in them is kept whole instead."""
    if k == 0:
        return sum(counts.values()) * int(np.prod(in_shape))
    return sum(loader_bytes(cfg, in_shape, split, counts[split]) for split in ("train", "val"))


def loader_bytes(cfg: Config, in_shape: tuple[int, ...], split: str, count: int) -> int:
    """Host memory of the loader of one split while a stage trains: two pools, or the split if it fits in them
    (kept whole). Training and validation loaders live together; the test split is read once trained."""
    row_shp = row_shape(in_shape, cfg, split)  # with --cache-views, a train sample's row holds all its views
    row = int(np.prod(row_shp)) * np.dtype(cfg.cache_dtype).itemsize
    per_shard = min(count, samples_per_shard(row_shp, cfg.cache_dtype, cfg.shard_mb))
    pool = max(min(window_rows(cfg.shuffle_mb, row, cfg.batch_size), count), per_shard)
    return min(count, 2 * (pool + cfg.batch_size)) * row


def free_disk(path: str | Path) -> tuple[str, int]:
    """Free bytes on the filesystem of `path`, or of its nearest existing parent for a run not yet made."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return str(p), shutil.disk_usage(p).free


def block_rows(k: int, first: int, specs: list[BlockSpec], in_shape: tuple[int, ...]) -> list[dict]:
    """One dict per block of stage k (global index from `first`): kind, channels, reduction, convs, output."""
    rows, shape = [], tuple(in_shape)
    for i, s in enumerate(specs):
        shape = feature_shape([s], shape)
        rows.append({"index": first + i, "stage": k, "kind": s.kind, "in_ch": s.in_ch, "out_ch": s.out_ch,
                     "stride": s.stride, "pool": s.pool, "convs": s.num_convs, "op": s.op, "out_shape": list(shape)})
    return rows


def meta_stages(cfg: Config, layout: StageLayout) -> tuple[list[torch.nn.Module], list[int], list[dict]]:
    """Every stage's module on the meta device, its number of blocks, and one row per block (block_rows).

    A torchvision:NAME network (seqtrain.splitting) has one row per stage: its first..last module names.
    """
    in_shape = layout.in_shape
    if is_torchvision(cfg.arch):
        modules, rows, shape = torchvision_meta_stages(cfg.arch, cfg.split), [], tuple(in_shape)
        names = torchvision_stage_names(cfg.arch, cfg.split)
        for k, (module, out) in enumerate(zip(modules, torchvision_stage_shapes(cfg.arch, cfg.split, in_shape))):
            kind = names[k][0] if len(names[k]) == 1 else f"{names[k][0]}..{names[k][-1]}"
            rows.append({"index": k, "stage": k, "kind": kind, "in_ch": shape[0], "out_ch": out[0],
                         "stride": max(1, round(shape[1] / out[1])), "pool": 1, "out_shape": list(out),
                         "convs": sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())})
            shape = out
        return modules, [len(n) for n in names], rows
    groups, rows, shape = [list(g) for g in layout.specs], [], tuple(in_shape)
    for k, specs in enumerate(groups):
        rows += block_rows(k, len(rows), specs, shape)
        shape = feature_shape(specs, shape)
    with torch.device("meta"):
        return [build_stage_block(specs) for specs in groups], [len(specs) for specs in groups], rows


@quick_meta()
def plan(cfg: Config, layout: StageLayout | None = None, num_classes: int | None = None,
         n_samples: dict[str, int] | None = None) -> dict:
    """Every figure of the plan; builds the network on the meta device only, loads no data, trains nothing.

    `layout` defaults to the one resolved for data.input_shape(cfg) (as job.resolve), `num_classes` to the
    dataset's and `n_samples` (per split) to split_counts(cfg).
    """
    layout = layout or resolve_layout(cfg, input_shape(cfg))
    in_shape = layout.in_shape
    num_classes = num_classes or dataset_info(cfg)["num_classes"]
    counts = n_samples or split_counts(cfg)
    modules, sizes, blocks = meta_stages(cfg, layout)
    cut = stage_cut(cfg, layout)
    caching = cut and cut.pop("caching_pass_bytes")
    stages, shape = [], tuple(in_shape)
    for k, block in enumerate(modules):
        own = [b for b in blocks if b["stage"] == k]
        out_shape = tuple(own[-1]["out_shape"])
        with torch.device("meta"):
            model = StageModel(block, build_head(cfg, out_shape[0], num_classes, layout.specs_after(k)))
        analytic, train = train_figures(cfg, model, [block], shape, own, cfg.checkpoint)
        stages.append({
            "stage": k, "blocks": sizes[k], "parameters": sum(p.numel() for p in block.parameters()),
            "head_parameters": sum(p.numel() for p in model.head.parameters()), "in_shape": list(shape),
            "feature_shape": list(out_shape), "analytic": analytic, "train_bytes": train,
            "checkpoint": cfg.checkpoint, "caching_pass_bytes": caching[k] if caching else None,
            "input_bytes": input_bytes(cfg, k, shape, counts),
            "cache_bytes": predicted_cache_bytes(out_shape, cfg, counts)})
        shape = out_shape
    with torch.device("meta"):
        net = SequentialNet(modules, build_head(cfg, shape[0], num_classes))  # = build_network(cfg), on meta
    e2e, e2e_checkpoint = ({"parameters": sum(p.numel() for p in net.parameters()),
                            "input_bytes": stages[0]["input_bytes"]} for _ in range(2))
    e2e["analytic"], e2e["train_bytes"] = train_figures(cfg, net, modules, in_shape, blocks, checkpoint=False)
    e2e_checkpoint["analytic"], e2e_checkpoint["train_bytes"] = train_figures(cfg, net, modules, in_shape, blocks,
                                                                              checkpoint=True)
    libraries = library_bytes(cfg.device)  # CUDA's workspaces, beside every step's tensors
    for record in (*stages, e2e, e2e_checkpoint):
        record["train_bytes"] += libraries
    largest = max(s["train_bytes"] for s in stages)
    disk_path, free = free_disk(cfg.run_dir)
    return {
        "arch": cfg.arch, "width": cfg.width, "stage_sizes": list(layout.sizes), "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer, "downsample": cfg.downsample, "in_shape": list(in_shape),
        "num_classes": num_classes, "splits": counts, "cache_views": cfg.cache_views, "cache_dtype": cfg.cache_dtype,
        "compression": cfg.compression, "bf16": cfg.bf16, "checkpoint": cfg.checkpoint,
        "library_workspace_bytes": libraries, "stages": stages,
        "blocks": blocks, "e2e": e2e, "e2e_checkpoint": e2e_checkpoint,
        "totals": {"parameters": sum(s["parameters"] for s in stages) + stages[-1]["head_parameters"],
                   "cache_bytes": sum(s["cache_bytes"] for s in stages), "largest_stage_bytes": largest},
        "disk": {"path": disk_path, "free_bytes": free}, "cut": cut,
        "largest_stage_ratio": largest / e2e["train_bytes"],
        "largest_stage_vs_checkpoint": largest / e2e_checkpoint["train_bytes"],
    }


def train_figures(cfg: Config, model: torch.nn.Module, stages: list[torch.nn.Module], in_shape: tuple[int, ...],
                  blocks: list[dict], checkpoint: bool) -> tuple[dict, int]:
    """(the analytic floor of one training step of `model` on the meta device, the predicted tensor peak).

    The peak is the floor plus backward's transient gradients (an activation's and its input's); with
    activation checkpointing of every block of `stages`, the floor holds only the blocks' inputs, and the
    peak adds what a block's recompute brings back (recompute.recompute_extra_bytes). Where the optimizer
    step holds more (weights, gradients, state, batch and the step's temporaries), its figure is the peak."""
    with checkpointed(stages, checkpoint):
        analytic = step_bytes(cfg, model, in_shape).as_dict()
    extra, transient = 0, transient_bytes(cfg, blocks)
    if checkpoint:
        x = torch.empty(cfg.batch_size, *in_shape, device="meta")  # B, C, H, W
        extra = recompute_extra_bytes(stages, model.head, x, transient)
    # The optimizer steps once backward has freed the activations: where weights dominate (a large network's
    # stage, a small batch), its peak is the step's.
    params = list(model.parameters())
    groups = [sum(p.nbytes for p in g["params"]) for g in make_optimizer(cfg, model).param_groups]
    temporaries = step_temporary_bytes(max((p.nbytes for p in params), default=0),
                                       groups if runs_on_cuda(cfg.device) else None)
    step = sum(analytic[k] for k in ("weights", "grads", "optimizer", "batch")) + temporaries
    return analytic, max(analytic["total"] + extra + transient, step)


def transient_bytes(cfg: Config, blocks: list[dict]) -> int:
    """Backward's transient gradients at their largest (memory.TRANSIENT_ACTIVATIONS float32 activations of
    the largest block output), as balance.BlockCosts.train_bytes counts them."""
    return TRANSIENT_ACTIVATIONS * 4 * cfg.batch_size * max(int(np.prod(b["out_shape"])) for b in blocks)


def stage_cut(cfg: Config, layout: StageLayout) -> dict | None:
    """How --stages was turned into block counts, with the block-count split's largest stage beside the chosen
    one; None for torchvision and custom networks, whose stages are their own."""
    if not layout.own_blocks:
        return None
    costs = block_costs(cfg, layout.in_shape)
    sizes = list(layout.sizes)
    even = even_sizes(len(costs.fixed), len(sizes))

    def largest(counts: list[int]) -> int:
        starts = [sum(counts[:m]) for m in range(len(counts))]
        return max(costs.stage_bytes(a, a + n - 1) for a, n in zip(starts, counts))

    starts = layout.starts()
    return {"how": layout.how, "sizes": sizes, "largest_bytes": largest(sizes), "blocks_sizes": even,
            "blocks_largest_bytes": largest(even), "budget": cfg.memory_budget or None,
            "caching_pass_bytes": [costs.caching_bytes(a, a + n - 1) for a, n in zip(starts, sizes)]}


# --------------------------------------------------------------------------------------------------------
# Report


def format_plan(p: dict) -> str:
    """The plan as a table for people: one row per stage and one for e2e, then totals and free disk."""
    n = p["splits"]
    views = f" x {p['cache_views']} views" if p["cache_views"] > 1 else ""
    lines = [f"plan: {p['arch']} in {len(p['stages'])} stages {p['stage_sizes']}, batch {p['batch_size']}, "
             f"{p['optimizer']}; {p['cache_dtype']} cache of {n['train']:,}{views}/{n['val']:,}/{n['test']:,} "
             "train/val/test samples"]
    rows = [["stage", "blocks", "params", "head params", "in", "out", "activ. MB", "weights+grads+opt MB", "batch MB",
             "floor MB", "peak MB", "input (host) MB", "cache MB"]]
    for s in p["stages"]:
        a = s["analytic"]
        rows.append([str(s["stage"]), str(s["blocks"]), f"{s['parameters']:,}", f"{s['head_parameters']:,}",
                     shape_text(s["in_shape"]),
                     shape_text(s["feature_shape"]), mb(a["saved"]), mb(a["weights"] + a["grads"] + a["optimizer"]),
                     mb(a["batch"]), mb(a["total"]), mb(s["train_bytes"]), mb(s["input_bytes"]), mb(s["cache_bytes"])])
    for name, key in (("e2e", "e2e"), ("e2e+ckpt", "e2e_checkpoint")):
        e2e = p[key]
        a = e2e["analytic"]
        rows.append([name, str(sum(s["blocks"] for s in p["stages"])), f"{e2e['parameters']:,}", "-",
                     shape_text(p["in_shape"]), "-", mb(a["saved"]), mb(a["weights"] + a["grads"] + a["optimizer"]),
                     mb(a["batch"]), mb(a["total"]), mb(e2e["train_bytes"]), mb(e2e["input_bytes"]), "-"])
    lines.append(aligned(rows))

    t, disk = p["totals"], p["disk"]
    short = t["cache_bytes"] > disk["free_bytes"]
    lines.append("floor MB: activations saved for backward + weights, grads, optimizer state + batch; peak MB: the "
                 "floor + backward's transient gradients (2 activations), the predicted tensor peak; e2e+ckpt: "
                 "every block activation-checkpointed (its inputs saved, its inside recomputed in backward)")
    lines.append("input (host) MB: the raw dataset in RAM (stage 0, e2e), else the train and val loaders' pools "
                 "(2 x --shuffle-mb each)")
    lines.append(f"largest stage {mb(t['largest_stage_bytes'])} MB = {p['largest_stage_ratio']:.2f} x e2e's "
                 f"{mb(p['e2e']['train_bytes'])} MB, {p['largest_stage_vs_checkpoint']:.2f} x e2e+ckpt's "
                 f"{mb(p['e2e_checkpoint']['train_bytes'])} MB (predicted peaks)"
                 + ("; stages with --checkpoint" if p["checkpoint"] else ""))
    if p["cut"]:
        lines.append(cut_text(p["cut"]))
    lines.append(f"caches {mb(t['cache_bytes'])} MB on disk in all; {mb(disk['free_bytes'])} MB free at "
                 f"{disk['path']}" + ("  <-- NOT ENOUGH DISK" if short else ""))
    if p["compression"] != "none":
        lines.append(f"cache sizes are uncompressed: an upper bound with --compression {p['compression']}")
    if p["library_workspace_bytes"]:
        lines.append(f"peak MB includes {mb(p['library_workspace_bytes'])} MB of CUDA library workspace (cuBLAS) "
                     "beside the tensors, as the CUDA allocator counts it")
    if p["bf16"]:
        lines.append("activations are predicted in float32: with --bf16 on CUDA they take about half")
    lines.append(f"blocks ({p['downsample']} downsampling, input {shape_text(p['in_shape'])}): index kind, "
                 "/N where it reduces the resolution N-fold (by a strided convolution, avg-pool or s2d: "
                 "space-to-depth), -> output channels @ H x W")
    lines += [f"  stage {k}: {line}" for k, line in enumerate(block_lines(p["blocks"]))]
    return "\n".join(lines)


def cut_text(cut: dict) -> str:
    """Why the stages hold the blocks they hold, in one line."""
    sizes, even = ",".join(map(str, cut["sizes"])), ",".join(map(str, cut["blocks_sizes"]))
    why = {"list": "as --stages lists them",
           "memory": "cut by memory (--balance memory)",
           "blocks": "cut into equal block counts (--balance blocks)",
           "auto": f"the fewest stages that each fit --memory-budget {cut['budget']}, cut by memory"}[cut["how"]]
    text = f"stages {sizes}: {why}; predicted peak of the largest {mb(cut['largest_bytes'])} MB"
    if cut["sizes"] != cut["blocks_sizes"]:
        text += f"; equal block counts {even}: {mb(cut['blocks_largest_bytes'])} MB"
    return text


def block_lines(blocks: list[dict]) -> list[str]:
    """One line per stage; runs of like blocks that keep the resolution share an entry ("1-2 basic -> 16@32x32")."""
    lines: dict[int, list[list]] = {}
    for b in blocks:
        entries, text = lines.setdefault(b["stage"], []), block_text(b)
        if entries and entries[-1][2] == text and b["stride"] * b["pool"] == 1:
            entries[-1][1] = b["index"]
        else:
            entries.append([b["index"], b["index"], text])
    return ["; ".join(f"{a}-{z} {text}" if z > a else f"{a} {text}" for a, z, text in entries)
            for _, entries in sorted(lines.items())]


def block_text(b: dict) -> str:
    """"basic (1 conv) /2 -> 32@16x16": the kind, its convs when not the usual, its reduction, its output."""
    text = b["kind"]
    if b["convs"] != USUAL_CONVS.get(b["kind"]):  # a torchvision stage: always its count
        text += f" ({b['convs']} conv{'s' if b['convs'] > 1 else ''})"
    if b["stride"] * b["pool"] > 1:
        text += f" /{b['stride'] * b['pool']}" + {"pool": " avg-pool", "space-to-depth": " s2d"}.get(b.get("op"), "")
    return text + f" -> {b['out_shape'][0]}@{shape_text(b['out_shape'][1:])}"
