"""Modules from a stage layout: stage k's block(s), freshly initialised, and the whole network.

models.py defines the pieces (blocks, heads, the composed SequentialNet) and layout.py where the network
is cut; this is where the two meet, so that a stage builds exactly the blocks its layout gives it.
"""

from __future__ import annotations

import torch.nn as nn

from seqtrain.archs import feature_shape
from seqtrain.config import Config
from seqtrain.layout import StageLayout
from seqtrain.models import SequentialNet, build_head, build_stage_block
from seqtrain.splitting import build_torchvision_stage, stage_shapes, torchvision_stage_channels


def build_stage(cfg: Config, layout: StageLayout, k: int,
                in_shape: tuple[int, int, int]) -> tuple[nn.Module, tuple[int, int, int]]:
    """Stage k's module, freshly initialised, and its output shape (C, H, W) for inputs of `in_shape`."""
    if cfg.arch.startswith("torchvision:"):
        block = build_torchvision_stage(cfg.arch, cfg.split, k)
        return block, stage_shapes([block], tuple(in_shape))[0]
    specs = list(layout.specs[k])
    return build_stage_block(specs), feature_shape(specs, tuple(in_shape))


def build_network(cfg: Config, layout: StageLayout, in_channels: int, num_classes: int) -> SequentialNet:
    """Every stage of the layout and the last stage's head: the final network's (and e2e's) structure."""
    if cfg.arch.startswith("torchvision:"):
        stages = [build_torchvision_stage(cfg.arch, cfg.split, k) for k in range(layout.num_stages)]
        return SequentialNet(stages, build_head(cfg, torchvision_stage_channels(cfg.arch, cfg.split)[-1],
                                                num_classes))
    assert layout.specs[0][0].in_ch == in_channels, "the layout was resolved for inputs of other channels"
    head = build_head(cfg, layout.specs[-1][-1].out_ch, num_classes)
    return SequentialNet([build_stage_block(list(g)) for g in layout.specs], head)
