"""Networks as ordered lists of blocks, the auxiliary heads that train them, and the composed final network.

A network is described by a list of `BlockSpec`s (cheap plain data); a stage builds only the blocks it
trains, so stage k never constructs, let alone loads, blocks 0..k-1. The same specs compose the final
network and the end-to-end baseline, so all three share one definition.

Two per-stage knobs shape what each trainable stage can learn (stage_specs() applies them):
  - the downsampling schedule (`--downsample`, see schedule()): where resolution drops;
  - convolution intensity (`--stage-convs`, `--stage-width`): how much convolution a stage has. Here it
    means two things, per trainable stage: the number of 3x3 convolution layers in each of its blocks
    (a ResNet basic block's residual branch normally has 2, a VGG block 1; 1 to 4 allowed; the ResNet
    stem stays one convolution, so "2,2,2,2" on a ResNet is the architecture's own) and a multiplier of
    every block's output channels. Ma, Yu, Li, Wang (2020) verify their explanation (shallow features are
    poorly separable, and a strong local classifier there fits them to the local objective at the
    expense of later stages) by controlling the intensity of convolution in the local, shallow layers.
    Their text and code are not available to us, so this is our explicit version of that experiment:
    weaken the shallow stage (e.g. `--stage-convs 1,2,2,2`, `--stage-width 0.5,1,1,1`) or strengthen it
    (`--stage-convs 4,2,2,2`) with everything else fixed, and compare sequential against e2e accuracy
    (benchmarks/accuracy.py --stage-convs ...). Their account predicts that a weaker shallow stage loses
    less to e2e, the effect accelerated downsampling gets by spending fewer blocks at high resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn

from seqtrain.files import load_torch

CIFAR_RESNETS = {"resnet20": 3, "resnet32": 5, "resnet44": 7, "resnet56": 9, "resnet110": 18}  # n = (d-2)/6
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

    @property
    def reduction(self) -> int:
        return self.stride * self.pool

    @property
    def num_convs(self) -> int:
        return self.convs or USUAL_CONVS[self.kind]


USUAL_CONVS = {"stem": 1, "basic": 2, "conv": 1}


# --------------------------------------------------------------------------------------------------------
# Blocks


def conv_bn_relu(in_ch: int, out_ch: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)]


class BasicBlock(nn.Module):
    """He et al. 2016 basic block; a 1x1 projection shortcut when the shape changes (option B).

    The residual branch has `convs` conv3x3-BN layers (2 in the paper), ReLU between them; the first carries
    the stride. Layers are named conv1, bn1, conv2, bn2, ... so the usual block's weights keep their names.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, convs: int = 2):
        super().__init__()
        assert convs >= 1, f"a basic block needs at least one convolution, got {convs}"
        self.convs = convs
        for i in range(1, convs + 1):
            self.add_module(f"conv{i}", nn.Conv2d(in_ch if i == 1 else out_ch, out_ch, 3, stride if i == 1 else 1, 1,
                                                  bias=False))
            self.add_module(f"bn{i}", nn.BatchNorm2d(out_ch))
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for i in range(1, self.convs + 1):
            out = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(out))
            if i < self.convs:  # the last one is added to the shortcut before its ReLU
                out = torch.relu(out)
        return torch.relu(out + self.shortcut(x))


def build_block(spec: BlockSpec) -> nn.Module:
    if spec.kind == "basic":
        return BasicBlock(spec.in_ch, spec.out_ch, spec.stride, spec.num_convs)
    # A stem or VGG block: conv-BN-ReLU layers (the first carries the stride), then the max-pool if any.
    layers = conv_bn_relu(spec.in_ch, spec.out_ch, spec.stride)
    for _ in range(spec.num_convs - 1):
        layers += conv_bn_relu(spec.out_ch, spec.out_ch)
    if spec.pool > 1:
        layers.append(nn.MaxPool2d(spec.pool))
    return nn.Sequential(*layers)


def block_specs(arch: str, width: int = 0, in_channels: int = 3, downsample: str = "standard") -> list[BlockSpec]:
    """The ordered blocks of a network, with its spatial reductions placed by `downsample` (see schedule())."""
    specs = standard_specs(arch, width, in_channels)
    if downsample == "standard":
        return specs
    placed = schedule(specs, downsample)
    if specs[0].kind == "conv":  # VGG reduces by max-pooling after a block's convolution
        return [replace(s, pool=placed.get(i, 1)) for i, s in enumerate(specs)]
    return [replace(s, stride=placed.get(i, 1)) for i, s in enumerate(specs)]


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


def standard_specs(arch: str, width: int = 0, in_channels: int = 3) -> list[BlockSpec]:
    """The network's blocks with its usual downsampling; `width` 0 means its standard first width."""
    if arch in CIFAR_RESNETS:
        n, w = CIFAR_RESNETS[arch], width or 16
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


def num_blocks(cfg) -> int:
    """Blocks of the network; a torchvision:NAME or custom:HASH network has one block per stage."""
    if cfg.arch.startswith("torchvision:"):
        from seqtrain.splitting import torchvision_num_stages

        return torchvision_num_stages(cfg.arch, cfg.split)
    if cfg.arch.startswith("custom:"):  # seqtrain.train_stages() sets --stages to the number of modules it was given
        return int(cfg.stages)
    return len(standard_specs(cfg.arch, cfg.width))


def stage_specs(cfg, in_channels: int = 3) -> list[list[BlockSpec]]:
    """The network's blocks grouped into the configured trainable stages, with each stage's convolution
    intensity applied: --stage-convs sets the conv layers of its blocks (the ResNet stem keeps its one),
    --stage-width multiplies their output channels (rounded, at least 1); input channels follow."""
    specs, out, start = block_specs(cfg.arch, cfg.width, in_channels, cfg.downsample), [], 0
    convs, widths = cfg.stage_convs_list(), cfg.stage_width_list()
    ch = in_channels
    for k, size in enumerate(cfg.stage_sizes()):
        group = []
        for s in specs[start:start + size]:
            if convs is not None and s.kind != "stem":
                s = replace(s, convs=convs[k])
            out_ch = max(1, round(s.out_ch * widths[k])) if widths is not None else s.out_ch
            group.append(replace(s, in_ch=ch, out_ch=out_ch))
            ch = out_ch
        out.append(group)
        start += size
    return out


def build_stage_block(specs: list[BlockSpec]) -> nn.Sequential:
    return nn.Sequential(*[build_block(s) for s in specs])


def build_stage(cfg, k: int, in_shape: tuple[int, int, int]) -> tuple[nn.Module, tuple[int, int, int]]:
    """Stage k's module, freshly initialised, and its output shape (C, H, W) for inputs of `in_shape`."""
    if cfg.arch.startswith("torchvision:"):
        from seqtrain.splitting import build_torchvision_stage, stage_shapes

        block = build_torchvision_stage(cfg.arch, cfg.split, k)
        return block, stage_shapes([block], tuple(in_shape))[0]
    specs = stage_specs(cfg, in_shape[0])[k]  # in_shape[0] only sets stage 0's input channels
    return build_stage_block(specs), feature_shape(specs, tuple(in_shape))


def feature_shape(specs: list[BlockSpec], in_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Output shape (C, H, W) of `specs` applied to inputs of `in_shape`, without building anything."""
    c, h, w = in_shape
    for s in specs:
        # A strided 3x3 convolution with padding 1 (and its strided 1x1 shortcut) rounds up; max-pool rounds down.
        h, w = -(-h // s.stride) // s.pool, -(-w // s.stride) // s.pool
        c = s.out_ch
    return c, h, w


# --------------------------------------------------------------------------------------------------------
# Heads


class AuxHead(nn.Module):
    """Auxiliary classifier on a stage's output: n x conv3x3-BN-ReLU, adaptive average pool, linear.

    n = 0 with pool 1 is the plain global-average-pool + linear head; n >= 1 with pool 2 is the head of
    Belilovsky, Eickenberg, Oyallon 2019 ("Greedy Layerwise Learning Can Scale to ImageNet").
    """

    def __init__(self, in_ch: int, num_classes: int, convs: int = 0, width: int = 0, pool: int = 1):
        super().__init__()
        layers, ch = [], in_ch
        for _ in range(convs):
            layers += conv_bn_relu(ch, width or in_ch)
            ch = width or in_ch
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.fc = nn.Linear(ch * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.convs(x)), 1))


def build_head(cfg, in_ch: int, num_classes: int) -> AuxHead:
    if cfg.head == "linear":
        return AuxHead(in_ch, num_classes)
    return AuxHead(in_ch, num_classes, convs=cfg.head_convs, width=cfg.head_width, pool=2)


class StageModel(nn.Module):
    """What one stage trains: its block(s) and its auxiliary head."""

    def __init__(self, block: nn.Module, head: nn.Module):
        super().__init__()
        self.block, self.head = block, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


# --------------------------------------------------------------------------------------------------------
# The composed network


class SequentialNet(nn.Module):
    """All stages' blocks in order, then the last stage's head: the final network, or the e2e baseline.

    Takes images normalised with the training split's per-channel mean and std (saved in model.pt).
    """

    def __init__(self, stages: list[nn.Module], head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return self.head(x)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The features at every stage boundary (what the stage caches hold), for probing."""
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def build_network(cfg, in_channels: int, num_classes: int) -> SequentialNet:
    if cfg.arch.startswith("torchvision:"):
        from seqtrain.splitting import build_torchvision_stage, torchvision_stage_channels

        stages = [build_torchvision_stage(cfg.arch, cfg.split, k) for k in range(cfg.num_stages)]
        return SequentialNet(stages, build_head(cfg, torchvision_stage_channels(cfg.arch, cfg.split)[-1],
                                                num_classes))
    groups = stage_specs(cfg, in_channels)
    head = build_head(cfg, groups[-1][-1].out_ch, num_classes)
    return SequentialNet([build_stage_block(g) for g in groups], head)


def load_model(path: str | Path) -> SequentialNet:
    """Rebuild a saved network (final/model.pt or e2e/model.pt) in eval mode; its dict has config and stats."""
    from seqtrain.config import Config

    saved = load_torch(Path(path))
    cfg = Config(**saved["config"])
    if cfg.arch.startswith("custom:"):
        from seqtrain.errors import UserError

        raise UserError(f"{path} holds a network given to seqtrain.train_stages(), which only your code can rebuild: "
                        "split it as before and load torch.load(path)['model'] into SequentialNet(stages, head)")
    net = build_network(cfg, saved["in_channels"], saved["num_classes"])
    net.load_state_dict(saved["model"])
    net.mean, net.std = saved["mean"], saved["std"]  # per-channel input normalisation, as lists
    return net.eval()
