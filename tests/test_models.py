"""Networks as lists of blocks: shapes per block, stage splits, and the composed network."""

from __future__ import annotations

import pytest
import torch

from seqtrain.config import Config
from seqtrain.models import block_specs, build_network, build_stage_block, feature_shape, stage_specs


@pytest.mark.parametrize("arch, blocks, out_shape", [
    ("resnet20", 10, (16, 8, 8)), ("resnet56", 28, (16, 8, 8)), ("resnet18", 9, (32, 4, 4)),
    ("resnet34", 17, (32, 4, 4)), ("vgg11", 8, (32, 1, 1)),
])
def test_block_shapes_match_a_forward_pass(arch, blocks, out_shape):
    specs = block_specs(arch, width=4)
    assert len(specs) == blocks
    x = torch.randn(2, 3, 32, 32)
    for i, spec in enumerate(specs):
        x = build_stage_block([spec])(x)
        assert tuple(x.shape[1:]) == feature_shape(specs[:i + 1], (3, 32, 32))
    assert tuple(x.shape[1:]) == out_shape


def test_default_resnet18_split_is_stem_plus_layer1_then_one_layer_per_stage():
    cfg = Config(arch="resnet18", stages="4")
    assert cfg.stage_sizes() == [3, 2, 2, 2]
    assert [g[-1].out_ch for g in stage_specs(cfg)] == [64, 128, 256, 512]


def test_explicit_split_and_composed_network():
    cfg = Config(arch="resnet20", width=4, stages="1,4,5", head="conv", head_width=8)
    net = build_network(cfg, in_channels=3, num_classes=10)
    assert len(net.stages) == 3
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    assert [tuple(o.shape[1:]) for o in net.stage_outputs(x)] == [(4, 32, 32), (8, 16, 16), (16, 8, 8)]
