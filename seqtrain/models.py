"""Networks as ordered lists of blocks, the auxiliary heads that train them, and the composed final network.

A network is described by a list of `BlockSpec`s (cheap plain data); a stage builds only the blocks it
trains, so stage k never constructs, let alone loads, blocks 0..k-1. The same specs compose the final
network and the end-to-end baseline, so all three share one definition.

Two per-stage knobs shape what each trainable stage can learn (layout.stage_specs() applies them):
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

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqtrain.archs import BlockSpec, head_specs
from seqtrain.config import Config

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
    if spec.op != "stride" and spec.stride > 1:  # reduce first, then the block at stride 1 (archs.block_specs)
        if spec.op == "space-to-depth":
            reduce, in_ch = nn.PixelUnshuffle(spec.stride), spec.in_ch * spec.stride ** 2
        else:
            reduce, in_ch = nn.AvgPool2d(spec.stride), spec.in_ch
        return nn.Sequential(reduce, build_block(replace(spec, in_ch=in_ch, stride=1, op="stride")))
    if spec.kind == "basic":
        return BasicBlock(spec.in_ch, spec.out_ch, spec.stride, spec.num_convs)
    # A stem or VGG block: conv-BN-ReLU layers (the first carries the stride), then the max-pool if any.
    layers = conv_bn_relu(spec.in_ch, spec.out_ch, spec.stride)
    for _ in range(spec.num_convs - 1):
        layers += conv_bn_relu(spec.out_ch, spec.out_ch)
    if spec.pool > 1:
        layers.append(nn.MaxPool2d(spec.pool))
    return nn.Sequential(*layers)


def build_stage_block(specs: list[BlockSpec]) -> nn.Sequential:
    return nn.Sequential(*[build_block(s) for s in specs])


# --------------------------------------------------------------------------------------------------------
# Heads


class AvgPool(nn.Module):
    """Adaptive average pooling to `size` x `size`. Under --deterministic (torch's deterministic algorithms),
    a side that `size` divides is pooled by plain average pooling, whose CUDA backward is deterministic, where
    adaptive pooling's is not; both compute the same windows. Otherwise adaptive pooling, as always."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if torch.are_deterministic_algorithms_enabled() and h % self.size == 0 and w % self.size == 0:
            return F.avg_pool2d(x, (h // self.size, w // self.size))
        return F.adaptive_avg_pool2d(x, self.size)


class AuxHead(nn.Module):
    """Auxiliary classifier on a stage's output: n x conv3x3-BN-ReLU, adaptive average pool, linear.

    n = 0 with pool 1 is the plain global-average-pool + linear head; n >= 1 with pool 2 is the head of
    Belilovsky, Eickenberg, Oyallon 2019 ("Greedy Layerwise Learning Can Scale to ImageNet"). `first_pool`
    > 0 average-pools the input to at most that side before the conv layers (--head-pool): at full resolution
    a shallow stage's head costs as much as a block of it.
    """

    def __init__(self, in_ch: int, num_classes: int, convs: int = 0, width: int = 0, pool: int = 1,
                 first_pool: int = 0):
        super().__init__()
        self.first_pool = AvgPool(first_pool) if first_pool else None
        layers, ch = [], in_ch
        for _ in range(convs):
            layers += conv_bn_relu(ch, width or in_ch)
            ch = width or in_ch
        self.convs = nn.Sequential(*layers)
        self.pool = AvgPool(pool)
        self.fc = nn.Linear(ch * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.first_pool is not None and max(x.shape[-2:]) > self.first_pool.size:
            x = self.first_pool(x)
        return self.fc(torch.flatten(self.pool(self.convs(x)), 1))


class AugHead(nn.Module):
    """Auxiliary classifier with depth: a reduced copy of the blocks that follow the stage in the network
    (--head-blocks of them at --head-fraction of their channels), then global average pooling and a linear
    layer. In the spirit of AugLocal (Ma et al., ICLR 2024): the stage is trained to be useful to a network
    shaped like the one that will consume its features, not to be linearly separable at once."""

    def __init__(self, specs: list[BlockSpec], num_classes: int):
        super().__init__()
        self.blocks = build_stage_block(specs)
        self.pool = AvgPool(1)
        self.fc = nn.Linear(specs[-1].out_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(x)), 1))


def build_head(cfg: Config, in_ch: int, num_classes: int, after: list[BlockSpec] = ()) -> nn.Module:
    """Stage k's auxiliary head on `in_ch` channels; `after`: the network's blocks after stage k (--head aug)."""
    if cfg.head == "linear" or (cfg.head == "aug" and not after):  # the last stage: the network's own classifier
        return AuxHead(in_ch, num_classes)
    if cfg.head == "aug":
        return AugHead(head_specs(list(after), in_ch, cfg.head_blocks, cfg.head_fraction), num_classes)
    return AuxHead(in_ch, num_classes, convs=cfg.head_convs, width=cfg.head_width, pool=2, first_pool=cfg.head_pool)


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
