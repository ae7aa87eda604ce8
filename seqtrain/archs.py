"""Architectures as plain data: block tables, block counts, downsampling schedules, feature shapes.

Imports nothing of the package and nothing that imports torch, so the command line (and `--help`) can name
the architectures and count their blocks without loading torch, and every module may import it;
models.py turns these specs into modules, layout.py groups them into stages.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # n = (d-2)/6; any
# depth 6n+2 (resnet8, resnet1202, ...) is also a CIFAR ResNet: cifar_resnet_n() reads n from the name
IMAGENET_STYLE_RESNETS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
VGGS = {  # channel multipliers of the first width; "M" = 2x2 max-pool after the previous conv
    "vgg11": (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M"),
    "vgg16": (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M"),
}
ARCHS = (*CIFAR_RESNETS, *IMAGENET_STYLE_RESNETS, *VGGS)


@dataclass(frozen=True)
class BlockSpec:
    kind: str  # "stem" (conv-BN-ReLU), "basic" (ResNet basic block) or "conv" (VGG conv-BN-ReLU [+ pool])
    in_ch: int
    out_ch: int
    stride: int = 1  # spatial reduction by the block's first convolution (ResNet blocks and stems)
    pool: int = 1  # VGG: spatial reduction by a max-pool after the convolution(s)
    convs: int = 0  # 3x3 convolution layers; 0 = the kind's usual (USUAL_CONVS): --stage-convs sets it
    op: str = "stride"  # how a ResNet block or stem reduces (--downsample-op): "stride", "pool", "space-to-depth"

    @property
    def reduction(self) -> int:
        return self.stride * self.pool

    @property
    def num_convs(self) -> int:
        return self.convs or USUAL_CONVS[self.kind]


USUAL_CONVS = {"stem": 1, "basic": 2, "conv": 1}


def block_specs(arch: str, width: int = 0, in_channels: int = 3, downsample: str = "standard",
                op: str = "stride") -> list[BlockSpec]:
    """The ordered blocks of a network, with its spatial reductions placed by `downsample` (see schedule())
    and made by `op` (ResNets; VGG always reduces by its max-pools):

    - "stride": the block's first convolution (and its shortcut) is strided, as in He et al. 2016;
    - "pool": 2x2 average pooling (per factor of 2) before the block, which then runs at stride 1;
    - "space-to-depth": the invertible pixel-unshuffle (C, H, W) -> (4C, H/2, W/2) before the block, as in
      Belilovsky et al.'s greedy CNNs and i-RevNet: no input information is lost at the reduction, and
      the block's first convolution sees 4x the channels (16x for a 4x reduction).
    """
    specs = standard_specs(arch, width, in_channels)
    if downsample != "standard":
        placed = schedule(specs, downsample)
        if specs[0].kind == "conv":  # VGG reduces by max-pooling after a block's convolution
            return [replace(s, pool=placed.get(i, 1)) for i, s in enumerate(specs)]
        specs = [replace(s, stride=placed.get(i, 1)) for i, s in enumerate(specs)]
    if op != "stride" and specs[0].kind != "conv":
        specs = [replace(s, op=op) for s in specs]
    return specs


def reductions(specs: list[BlockSpec]) -> dict[int, int]:
    """{block index: spatial reduction factor} for every block that reduces."""
    return {i: s.reduction for i, s in enumerate(specs) if s.reduction > 1}


def schedule(specs: list[BlockSpec], downsample: str) -> dict[int, int]:
    """Where the network reduces resolution: "accelerated", or an explicit "BLOCK:FACTOR,..." list.

    Accelerated downsampling (Ma, Yu, Li, Wang 2020) moves the learning away from the poorly separable
    shallow, high-resolution layers. Our rule, the same for every network: each reduction moves to the
    block where the previous reduction was, and the first one moves into the stem (block 0). The final
    resolution is unchanged; it is reached after fewer blocks. For CIFAR ResNets (reductions at the
    first blocks of groups 2 and 3) it gives a stride-2 stem and group 2's first block reducing; the
    last group runs at the final resolution.
    """
    if downsample == "accelerated":
        positions = [i for i, f in reductions(specs).items() for _ in range(f.bit_length() - 1)]  # one per 2x
        placed: dict[int, int] = {}
        for new in [0, *positions[:-1]]:
            placed[new] = placed.get(new, 1) * 2
        return placed
    placed = {}
    for item in downsample.split(","):
        block, factor = (int(v) for v in item.split(":"))
        placed[block] = placed.get(block, 1) * factor
    return placed


def cifar_resnet_n(arch: str) -> int | None:
    """n of a CIFAR ResNet named by its depth 6n + 2 (resnet20: 3, resnet1202: 200); None for other names.
    resnet18 and resnet34 are not of this form: they are the ImageNet-style networks."""
    depth = arch.removeprefix("resnet")
    if arch.startswith("resnet") and depth.isdigit() and int(depth) >= 8 and (int(depth) - 2) % 6 == 0:
        return (int(depth) - 2) // 6
    return None


def is_known_arch(arch: str) -> bool:
    return arch in ARCHS or cifar_resnet_n(arch) is not None


def standard_specs(arch: str, width: int = 0, in_channels: int = 3) -> list[BlockSpec]:
    """The network's blocks with its usual downsampling; `width` 0 means its standard first width."""
    if cifar_resnet_n(arch):
        n, w = cifar_resnet_n(arch), width or 16
        specs = [BlockSpec("stem", in_channels, w)]
        for group, mult in enumerate((1, 2, 4)):
            for i in range(n):
                stride = 2 if group > 0 and i == 0 else 1
                specs.append(BlockSpec("basic", specs[-1].out_ch, w * mult, stride))
        return specs
    if arch in IMAGENET_STYLE_RESNETS:
        w = width or 64  # 3x3 stem without max-pool, as is usual for 32x32 inputs
        specs = [BlockSpec("stem", in_channels, w)]
        for group, count in enumerate(IMAGENET_STYLE_RESNETS[arch]):
            for i in range(count):
                stride = 2 if group > 0 and i == 0 else 1
                specs.append(BlockSpec("basic", specs[-1].out_ch, w * 2**group, stride))
        return specs
    if arch in VGGS:
        w, specs, ch = width or 64, [], in_channels
        for item in VGGS[arch]:
            if item == "M":
                specs[-1] = BlockSpec("conv", specs[-1].in_ch, specs[-1].out_ch, pool=2)
            else:
                specs.append(BlockSpec("conv", ch, w * item))
                ch = w * item
        return specs
    raise ValueError(f"unknown arch {arch!r}")


def num_blocks(arch: str, width: int = 0) -> int:
    """Blocks of one of seqtrain's own networks (torchvision and custom networks: layout.py counts their stages)."""
    return len(standard_specs(arch, width))


def even_sizes(total: int, k: int) -> list[int]:
    """`total` blocks in `k` stages of (nearly) equal counts; earlier stages get the extra blocks: they run at
    the highest resolution, where blocks are cheap in parameters."""
    return [total // k + (1 if i < total % k else 0) for i in range(k)]


def head_specs(after: list[BlockSpec], in_ch: int, blocks: int, fraction: float) -> list[BlockSpec]:
    """An --head aug head's blocks: the first `blocks` of `after` with `fraction` of their channels, chained
    from the stage's `in_ch` output channels (their reductions kept)."""
    out, ch = [], in_ch
    for s in after[:blocks]:
        width = max(1, round(s.out_ch * fraction))
        out.append(replace(s, in_ch=ch, out_ch=width))
        ch = width
    return out


def feature_shape(specs: list[BlockSpec], in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Output shape (C, H, W) of `specs` applied to inputs of `in_shape`, without building anything."""
    c, h, w = in_shape
    for s in specs:
        # A strided 3x3 convolution with padding 1 (and its strided 1x1 shortcut) rounds up; max-pool rounds down.
        h, w = -(-h // s.stride) // s.pool, -(-w // s.stride) // s.pool
        c = s.out_ch
    return c, h, w


def exact_reductions(specs: list[BlockSpec], in_shape: tuple[int, int, int]) -> str | None:
    """Why pooling or space-to-depth cannot make these reductions on `in_shape` inputs (a side that does not
    divide), or None when they can. Strided convolutions round up instead and always can."""
    h = in_shape[1]
    for i, s in enumerate(specs):
        if s.op != "stride" and s.stride > 1 and h % s.stride:
            return f"block {i} reduces {h}x{h} by {s.stride} with {s.op}, which needs a side divisible by {s.stride}"
        h = -(-h // s.stride) // s.pool
    return None
