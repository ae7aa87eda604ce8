"""Networks as lists of blocks: shapes per block, stage splits, and the composed network."""

from __future__ import annotations

import pytest
import torch

from seqtrain.config import Config
from seqtrain.models import block_specs, build_network, build_stage_block, feature_shape, reductions, stage_specs


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


@pytest.mark.parametrize("arch, standard, accelerated", [
    ("resnet20", {4: 2, 7: 2}, {0: 2, 4: 2}),
    ("resnet18", {3: 2, 5: 2, 7: 2}, {0: 2, 3: 2, 5: 2}),
    ("vgg11", {0: 2, 1: 2, 3: 2, 5: 2, 7: 2}, {0: 4, 1: 2, 3: 2, 5: 2}),
])
def test_accelerated_downsampling_moves_every_reduction_one_step_earlier(arch, standard, accelerated):
    assert reductions(block_specs(arch, width=4)) == standard
    specs = block_specs(arch, width=4, downsample="accelerated")
    assert reductions(specs) == accelerated
    x = torch.randn(2, 3, 32, 32)
    for i, spec in enumerate(specs):  # the built blocks agree with the shapes the specs predict
        x = build_stage_block([spec])(x)
        assert tuple(x.shape[1:]) == feature_shape(specs[:i + 1], (3, 32, 32))
    assert feature_shape(specs, (3, 32, 32)) == feature_shape(block_specs(arch, width=4), (3, 32, 32))


def test_explicit_downsampling_schedule():
    specs = block_specs("resnet20", width=4, downsample="0:2,2:4")
    assert reductions(specs) == {0: 2, 2: 4}
    assert [feature_shape(specs[:i + 1], (3, 32, 32))[1] for i in range(4)] == [16, 16, 4, 4]
    assert build_network(Config(arch="resnet20", width=4, downsample="0:2,2:4"), 3, 10)(
        torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("value, message", [
    ("fast", "is not 'standard', 'accelerated' or a list"), ("12:2", "blocks are 0 to 9"),
    ("0:3", "factors powers of two"),
])
def test_bad_downsampling_schedule_is_refused(value, message):
    from seqtrain.errors import UserError

    with pytest.raises(UserError, match=message):
        Config(downsample=value).validate()
    # Strided convolutions round up and stop at 1x1; VGG's max-pools can reduce an image to nothing.
    with pytest.raises(UserError, match="below one pixel"):
        Config(arch="vgg11", downsample="0:64").validate()
