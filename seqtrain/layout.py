"""The stage layout: where the network is cut into stages, and what each stage's blocks are.

`Config` is a record of settings; everything derived from it that needs the network (and torch) is
resolved here, once, by `resolve_layout(cfg, in_shape)`: the checks of --arch torchvision:NAME and
--downsample against the input size, the stage sizes (`--stages K` cut by `--balance`, `--stages auto
--memory-budget`, or a list), each stage's convolution intensity, and the configuration hash that every
cache and checkpoint carries. run.py and api.py reach it through job.py, and everything after that step
takes the `StageLayout` it returns: nothing re-derives a cut.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, replace

from seqtrain.archs import (
    BlockSpec,
    block_specs,
    even_sizes,
    exact_reductions,
    feature_shape,
    standard_specs,
)
from seqtrain.balance import (
    BudgetTooSmall,
    balanced_sizes,
    block_costs,
    fewest_stages,
    largest_block_bytes,
)
from seqtrain.config import Config, config_hash, flag, network_hash, parse_size
from seqtrain.errors import UserError
from seqtrain.splitting import check_torchvision, torchvision_num_stages, torchvision_stage_shapes


@dataclass(frozen=True)
class StageLayout:
    """The resolved cut of a network into trainable stages, for inputs of `in_shape`."""

    in_shape: tuple[int, int, int]  # C, H, W of the images the network sees
    sizes: tuple[int, ...]  # blocks in each stage (a torchvision or custom network: one "block" per stage)
    specs: tuple[tuple[BlockSpec, ...], ...]  # each stage's blocks, intensity applied; () for torchvision/custom
    how: str  # how --stages was turned into sizes: "list", "memory", "blocks", "auto" or "fixed"
    config_hash: str  # of the settings that shape the numbers and of the sizes chosen
    network_hash: str  # of the settings and the whole network's blocks, whatever the cut: e2e's identity

    @property
    def num_stages(self) -> int:
        return len(self.sizes)

    @property
    def own_blocks(self) -> bool:
        """True for seqtrain's own networks (built from specs), False for torchvision:NAME and custom:HASH."""
        return bool(self.specs)

    def specs_after(self, k: int) -> list[BlockSpec]:
        """The blocks of the stages after stage k, in order: what an --head aug head copies from."""
        return [s for group in self.specs[k + 1:] for s in group]

    def starts(self) -> list[int]:
        """The global index of each stage's first block."""
        return [sum(self.sizes[:m]) for m in range(len(self.sizes))]


def resolve_layout(cfg: Config, in_shape: tuple[int, int, int]) -> StageLayout:
    """Check what needs the network and cut it into stages; UserError naming the flag when it cannot be done.

    `cfg` must have passed Config.validate()."""
    in_shape = tuple(in_shape)
    if ":" in cfg.arch:
        total = check_external_arch(cfg, in_shape)
        if str(cfg.stages) not in (Config.stages, str(total)):
            raise UserError(f"--stages {cfg.stages} does not apply to --arch {cfg.arch}, which has {total} "
                            "stages: place them with --split")
        sizes, how, specs = (1,) * total, "fixed", ()
    else:
        if cfg.split:
            raise UserError("--split places the stages of --arch torchvision:NAME only; for seqtrain's own "
                            "networks use --stages")
        check_downsample(cfg, in_shape)
        sizes, how = stage_sizes(cfg, in_shape)
        specs = stage_specs(cfg, in_shape[0], sizes)
    blocks = [dataclasses.astuple(s) for group in specs for s in group]
    return StageLayout(in_shape, tuple(sizes), specs, how, config_hash(cfg, list(sizes)), network_hash(cfg, blocks))


# --------------------------------------------------------------------------------------------------------
# The cut


def stage_sizes(cfg: Config, in_shape: tuple[int, int, int]) -> tuple[list[int], str]:
    """Blocks in each trainable stage, from --stages (an explicit list, a count, or "auto") and how it was cut."""
    total = len(standard_specs(cfg.arch, cfg.width))
    text = str(cfg.stages).replace(" ", "")
    if text == "auto":
        # The cut is a function of the settings alone, never of the machine: --plan shows the CUDA libraries'
        # workspace beside it (balance.library_bytes), which a GPU run's budget must leave room for.
        costs, budget = block_costs(cfg, in_shape), parse_size(cfg.memory_budget)
        try:
            return balanced_sizes(costs, fewest_stages(costs, budget)), "auto"
        except BudgetTooSmall as e:
            raise UserError(f"--memory-budget {cfg.memory_budget} is too small: {e} at --batch-size "
                            f"{cfg.batch_size}; {budget_advice(cfg, in_shape, budget)}") from None
    parts = [int(p) for p in text.split(",")]  # Config.validate checked the syntax
    if len(parts) == 1:
        k = parts[0]
        if not 1 <= k <= total:
            raise UserError(f"--stages {k} is out of range: {cfg.arch} has {total} blocks, "
                            f"so use 1 to {total} stages")
        if cfg.balance == "memory":
            return balanced_sizes(block_costs(cfg, in_shape), k), "memory"
        return even_sizes(total, k), "blocks"
    if sum(parts) != total:
        raise UserError(f"--stages {cfg.stages} must list positive block counts adding up to "
                        f"{total}, the number of blocks of {cfg.arch}")
    return parts, "list"


def budget_advice(cfg: Config, in_shape: tuple[int, int, int], budget: int) -> str:
    """What makes --stages auto fit --memory-budget, each option checked by a cut on the meta device: a
    budget every block fits, the largest --batch-size (at least 2, the smallest accepted) at which every
    block fits this one, or --checkpoint when that alone makes every block fit."""
    need = largest_block_bytes(block_costs(cfg, in_shape))
    options = [f"give a budget of at least {math.ceil(need / 2**20):,} MB"]
    fits = next((b for b in batch_sizes_below(cfg.batch_size) if fits_budget(cfg, in_shape, b, budget)), None)
    if fits:
        options.append(f"a --batch-size of {fits} or less")
    if not cfg.checkpoint and fits_budget(dataclasses.replace(cfg, checkpoint=True), in_shape, cfg.batch_size, budget):
        options.append("add --checkpoint (each block keeps only its input for backward)")
    return ", or ".join(options)


def batch_sizes_below(batch_size: int) -> list[int]:
    """Candidate batch sizes, largest first: halvings down to 2 (each a cut on the meta device to check)."""
    out, b = [], batch_size // 2
    while b >= 2:
        out.append(b)
        b //= 2
    return out if not out or out[-1] == 2 else [*out, 2]


def fits_budget(cfg: Config, in_shape: tuple[int, int, int], batch_size: int, budget: int) -> bool:
    """Every block fits `budget` bytes at `batch_size`."""
    return largest_block_bytes(block_costs(dataclasses.replace(cfg, batch_size=batch_size), in_shape)) <= budget


def stage_specs(cfg: Config, in_channels: int, sizes: list[int]) -> tuple[tuple[BlockSpec, ...], ...]:
    """The network's blocks grouped into stages of `sizes`, with each stage's convolution intensity applied:
    --stage-convs sets the conv layers of its blocks (the ResNet stem keeps its one), --stage-width
    multiplies their output channels (rounded, at least 1); input channels follow."""
    convs = per_stage(cfg.stage_convs, "stage_convs", int, len(sizes))
    widths = per_stage(cfg.stage_width, "stage_width", float, len(sizes))
    if convs is not None and not all(1 <= v <= 4 for v in convs):
        raise UserError(f"--stage-convs {cfg.stage_convs}: each stage's conv layers per block are 1 to 4")
    if widths is not None and not all(0.05 <= v <= 8 for v in widths):
        raise UserError(f"--stage-width {cfg.stage_width}: multipliers are between 0.05 and 8")
    specs = block_specs(cfg.arch, cfg.width, in_channels, cfg.downsample, cfg.downsample_op)
    out, start, ch = [], 0, in_channels
    for k, size in enumerate(sizes):
        group = []
        for s in specs[start:start + size]:
            if convs is not None and s.kind != "stem":
                s = replace(s, convs=convs[k])
            out_ch = max(1, round(s.out_ch * widths[k])) if widths is not None else s.out_ch
            group.append(replace(s, in_ch=ch, out_ch=out_ch))
            ch = out_ch
        out.append(tuple(group))
        start += size
    return tuple(out)


def per_stage(text: str, name: str, kind: type, num_stages: int) -> list | None:
    """A comma-separated list with one value per stage ("" = None), or a UserError naming the flag."""
    if not str(text).strip():
        return None
    try:
        values = [kind(v) for v in str(text).replace(" ", "").split(",")]
    except ValueError:
        raise UserError(f"{flag(name)} {text!r} is not a list of {kind.__name__}s such as "
                        f"{'1,2,2,2' if kind is int else '0.5,1,1,1'}") from None
    if len(values) != num_stages:
        raise UserError(f"{flag(name)} {text} has {len(values)} values but the run has {num_stages} stages "
                        "(--stages); give one per stage")
    return values


# --------------------------------------------------------------------------------------------------------
# Checks that need the network


def check_downsample(cfg: Config, in_shape: tuple[int, int, int]) -> None:
    """--downsample and --downsample-op against the network and the image size."""
    if cfg.downsample not in ("standard", "accelerated"):
        total = len(standard_specs(cfg.arch, cfg.width))
        for item in cfg.downsample.split(","):  # Config.validate checked the BLOCK:FACTOR syntax
            block, factor = (int(v) for v in item.split(":"))
            if not 0 <= block < total or factor < 2 or factor & (factor - 1):
                raise UserError(f"--downsample {block}:{factor}: blocks are 0 to {total - 1} and "
                                "factors powers of two (2, 4, ...)")
    size = in_shape[1]
    specs = block_specs(cfg.arch, cfg.width, 3, cfg.downsample, cfg.downsample_op)
    if min(feature_shape(specs, (3, size, size))[1:]) < 1:
        fits = smallest_side(specs)
        by = f"--downsample {cfg.downsample}" if cfg.downsample != "standard" else f"--arch {cfg.arch}"
        raise UserError(f"{by} reduces {size}x{size} images below one pixel: use --image-size {fits} or more, "
                        "or a --downsample that reduces less")
    if cfg.downsample_op != "stride" and specs[0].kind == "conv":
        raise UserError(f"--downsample-op {cfg.downsample_op} applies to ResNets; {cfg.arch} reduces by its own "
                        "max-pools: drop the flag")
    why = exact_reductions(specs, (3, size, size))
    if why:
        raise UserError(f"--downsample-op {cfg.downsample_op}: {why}; use an --image-size that divides, or "
                        "--downsample-op stride")


def smallest_side(specs: list[BlockSpec]) -> int:
    """The smallest image side that `specs` reduce to at least one pixel, exactly where pooling needs it."""
    for side in range(8, 1025):
        if min(feature_shape(specs, (3, side, side))[1:]) >= 1 and not exact_reductions(specs, (3, side, side)):
            return side
    return 1024


def check_external_arch(cfg: Config, in_shape: tuple[int, int, int]) -> int:
    """--arch torchvision:NAME (and --split) or a custom:HASH network; returns its number of stages."""
    if cfg.arch.startswith("custom:"):  # seqtrain.train_stages() sets --stages to the number of its modules
        return int(cfg.stages)
    check_torchvision(cfg.arch, cfg.split)
    torchvision_stage_shapes(cfg.arch, cfg.split, in_shape)
    return torchvision_num_stages(cfg.arch, cfg.split)
