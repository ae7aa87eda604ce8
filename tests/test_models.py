"""Networks as lists of blocks: shapes per block, stage splits, and the composed network."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from seqtrain.archs import block_specs, feature_shape, reductions
from seqtrain.config import Config, config_hash
from seqtrain.job import resolve
from seqtrain.layout import StageLayout
from seqtrain.models import AuxHead, build_head, build_stage_block
from seqtrain.network import build_network


def layout_of(cfg: Config) -> StageLayout:
    return resolve(cfg.validate())


def stage_specs(cfg: Config) -> list[list]:
    """Each stage's blocks, as lists."""
    return [list(g) for g in layout_of(cfg).specs]


def network(cfg: Config, in_channels: int, num_classes: int):
    return build_network(cfg, layout_of(cfg), in_channels, num_classes)


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
    cfg = Config(arch="resnet18", stages="4", balance="blocks")
    assert list(layout_of(cfg).sizes) == [3, 2, 2, 2]
    assert [g[-1].out_ch for g in stage_specs(cfg)] == [64, 128, 256, 512]


def test_explicit_split_and_composed_network():
    cfg = Config(arch="resnet20", width=4, stages="1,4,5", head="conv", head_width=8)
    net = network(cfg, in_channels=3, num_classes=10)
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
    assert network(Config(arch="resnet20", width=4, downsample="0:2,2:4"), 3, 10)(
        torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("value, message", [
    ("fast", "is not 'standard', 'accelerated' or a list"), ("12:2", "blocks are 0 to 9"),
    ("0:3", "factors powers of two"),
])
def test_bad_downsampling_schedule_is_refused(value, message):
    from seqtrain.errors import UserError

    with pytest.raises(UserError, match=message):
        resolve(Config(downsample=value).validate())
    # Strided convolutions round up and stop at 1x1; VGG's max-pools can reduce an image to nothing.
    with pytest.raises(UserError, match="below one pixel"):
        resolve(Config(arch="vgg11", downsample="0:64").validate())


# --------------------------------------------------------------------------------------------------------
# Convolution intensity: --stage-convs and --stage-width


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_stage_convs_and_width_give_the_shapes_the_specs_predict():
    cfg = Config(arch="resnet20", width=4, stages="4", balance="blocks", stage_convs="1,2,3,4",
                 stage_width="0.5,1,1.5,2")
    groups = stage_specs(cfg)
    assert [[s.num_convs for s in g] for g in groups] == [[1, 1, 1], [2, 2, 2], [3, 3], [4, 4]]  # stem: one conv
    assert [[s.out_ch for s in g] for g in groups] == [[2, 2, 2], [4, 8, 8], [12, 24], [32, 32]]
    specs = [s for g in groups for s in g]
    assert all(b.in_ch == a.out_ch for a, b in zip(specs, specs[1:])) and specs[0].in_ch == 3
    x = torch.randn(2, 3, 32, 32)
    for i, spec in enumerate(specs):
        block = build_stage_block([spec])
        convs = [m for m in block.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
        assert len(convs) == spec.num_convs
        x = block(x)
        assert tuple(x.shape[1:]) == feature_shape(specs[:i + 1], (3, 32, 32))
    assert tuple(x.shape[1:]) == (32, 8, 8)

    net = network(cfg, in_channels=3, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 10)
    assert [tuple(o.shape[1:]) for o in net.stage_outputs(x)] == [(2, 32, 32), (8, 16, 16), (24, 8, 8), (32, 8, 8)]


def test_stage_convs_change_exactly_the_parameters_of_the_removed_or_added_layers():
    base = Config(arch="resnet20", width=4, stages="4", balance="blocks")
    usual = [params(build_stage_block(g)) for g in stage_specs(base)]
    # "2,2,2,2" is a ResNet's own block (the stem keeps its single convolution): the same network.
    assert [params(build_stage_block(g)) for g in stage_specs(replace(base, stage_convs="2,2,2,2"))] \
        == usual
    fewer = [params(build_stage_block(g)) for g in stage_specs(replace(base, stage_convs="1,2,2,4"))]
    # Stage 0 = stem + 2 basic blocks of 4 channels: each loses one 3x3 conv (4*4*9) and its BN (2*4).
    assert usual[0] - fewer[0] == 2 * (4 * 4 * 9 + 2 * 4)
    assert fewer[1:3] == usual[1:3]
    # Stage 3 = 2 basic blocks of 16 channels: each gains two 3x3 convs (16*16*9) and their BNs (2*16).
    assert fewer[3] - usual[3] == 2 * 2 * (16 * 16 * 9 + 2 * 16)
    # VGG: one conv per block is the usual; "2,..." adds one conv-BN-ReLU per block of the stage.
    vgg = Config(arch="vgg11", width=4, stages="4")
    doubled = Config(arch="vgg11", width=4, stages="4", stage_convs="2,1,1,1")
    assert params(network(vgg, 3, 10)) == params(network(replace(vgg, stage_convs="1,1,1,1"), 3, 10))
    extra = sum(s.out_ch * s.out_ch * 9 + 2 * s.out_ch for s in stage_specs(vgg)[0])
    assert params(network(doubled, 3, 10)) - params(network(vgg, 3, 10)) == extra
    assert network(doubled, 3, 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_stage_width_scales_a_stages_channels_and_the_next_stage_follows():
    base = Config(arch="resnet20", width=4, stages="1,4,5")
    narrow = Config(arch="resnet20", width=4, stages="1,4,5", stage_width="0.5,1,1")
    a, b = stage_specs(base), stage_specs(narrow)
    assert b[0][0].out_ch == 2 and b[1][0].in_ch == 2 and b[1][1:] == a[1][1:] and b[2] == a[2]
    # The stem: 3x3x3x4 conv + BN(4) becomes 3x3x3x2 + BN(2); block 1 reads 2 channels and gains a projection.
    assert params(build_stage_block(a[0])) - params(build_stage_block(b[0])) == 3 * 9 * 2 + 2 * 2
    assert params(build_stage_block(b[1][:1])) == params(build_stage_block(a[1][:1])) - 4 * 4 * 9 + 2 * 4 * 9 \
        + 2 * 4 + 2 * 4  # first conv reads 2 channels, plus a 1x1 projection shortcut (2->4) and its BN
    assert network(narrow, 3, 10)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert stage_specs(Config(arch="resnet20", width=4, stages="2", stage_width="0.05,1"))[0][0].out_ch == 1


def test_the_usual_basic_block_keeps_its_parameter_names():
    # Saved networks (final/model.pt, block.pt) name the layers conv1, bn1, conv2, bn2, shortcut.
    names = {k.split(".")[0] for k in build_stage_block(block_specs("resnet20", width=4)[4:5])[0].state_dict()}
    assert names == {"conv1", "bn1", "conv2", "bn2", "shortcut"}


# --------------------------------------------------------------------------------------------------------
# --plan: per-block resolution, datasets, cached views


def test_plan_shows_where_the_resolution_drops():
    from seqtrain.plan import format_plan, plan

    def sides(downsample: str) -> tuple[list[int], str]:
        p = plan(Config(arch="resnet20", width=4, stages="4", balance="blocks", downsample=downsample, batch_size=2))
        assert [b["index"] for b in p["blocks"]] == list(range(10))
        assert [b["stage"] for b in p["blocks"]] == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
        assert [b["out_shape"] for b in p["blocks"] if b["index"] in (2, 5, 7, 9)] == [
            s["feature_shape"] for s in p["stages"]]
        return [b["out_shape"][1] for b in p["blocks"]], format_plan(p)

    standard, text = sides("standard")
    assert standard == [32, 32, 32, 32, 16, 16, 16, 8, 8, 8]  # groups 2 and 3 begin at blocks 4 and 7
    assert "  stage 0: 0 stem -> 4@32x32; 1-2 basic -> 4@32x32\n" in text
    assert "  stage 1: 3 basic -> 4@32x32; 4 basic /2 -> 8@16x16; 5 basic -> 8@16x16\n" in text
    accelerated, text = sides("accelerated")
    assert accelerated == [16, 16, 16, 16, 8, 8, 8, 8, 8, 8]  # each drop one group earlier: the stem, block 4
    assert "  stage 0: 0 stem /2 -> 4@16x16; 1-2 basic -> 4@16x16\n" in text
    assert "  stage 1: 3 basic -> 4@16x16; 4 basic /2 -> 8@8x8; 5 basic -> 8@8x8\n" in text
    assert text.endswith("  stage 3: 8-9 basic -> 16@8x8")
    convs = format_plan(plan(Config(arch="resnet20", width=4, stages="4", balance="blocks", stage_convs="1,2,2,3",
                                       batch_size=2)))
    assert "stage 0: 0 stem -> 4@32x32; 1-2 basic (1 conv) -> 4@32x32" in convs
    assert "stage 3: 8-9 basic (3 convs) -> 16@8x8" in convs


def test_plan_follows_the_dataset_and_image_size():
    from seqtrain.plan import plan

    p = plan(Config(dataset="mnist", arch="resnet20", width=4, stages="2", batch_size=2))
    assert p["in_shape"] == [3, 28, 28] and p["num_classes"] == 10  # grayscale reaches the network as RGB
    assert p["splits"] == {"train": 54_000, "val": 6_000, "test": 10_000}
    assert p["stages"][-1]["feature_shape"] == [16, 7, 7]  # 28 -> 14 -> 7
    p = plan(Config(dataset="svhn", arch="resnet20", width=4, stages="2", batch_size=2, image_size=16))
    assert p["in_shape"] == [3, 16, 16] and p["splits"]["test"] == 26_032
    assert p["stages"][-1]["feature_shape"] == [16, 4, 4]


def test_plan_caches_every_view_of_a_training_sample():
    from seqtrain.cache import samples_per_shard
    from seqtrain.plan import VIEW_INDEX_BYTES, predicted_cache_bytes, shard_bytes

    cfg = Config(arch="resnet20", width=4, stages="1,9", cache_views=4, shard_mb=1)  # stage 0: the stem
    one = Config(arch="resnet20", width=4, stages="1,9", shard_mb=1)
    shape, n = (4, 32, 32), 1000
    for split in ("val", "test"):  # one view: unchanged
        counts = {"train": 0, "val": 0, "test": 0, split: n}
        assert predicted_cache_bytes(shape, cfg, counts) == predicted_cache_bytes(shape, one, counts)
    per_shard = samples_per_shard((4, *shape), "float16", 1)  # whole rows of 4 views per shard
    assert per_shard == 2**20 // (4 * 4 * 32 * 32 * 2) == 32
    full, rest = divmod(n, per_shard)
    row = 4 * 4 * 32 * 32 * 2
    # A [n, V, C, H, W] shard's chunk index has wider keys than a [n, C, H, W] one's
    expected = full * shard_bytes(per_shard, row, VIEW_INDEX_BYTES) + shard_bytes(rest, row, VIEW_INDEX_BYTES)
    assert predicted_cache_bytes(shape, cfg, {"train": n, "val": 0, "test": 0}) == expected
    one_view = predicted_cache_bytes(shape, one, {"train": n, "val": 0, "test": 0})
    assert n * row < expected < 1.05 * n * row and 3.9 < expected / one_view < 4.1
    # plan() passes the configuration on: the same stage's cache, views and all.
    from seqtrain.plan import plan

    counts = {"train": n, "val": 100, "test": 100}
    p4, p1 = plan(cfg, n_samples=counts), plan(one, n_samples=counts)
    assert p4["stages"][0]["feature_shape"] == list(shape) and p4["cache_views"] == 4
    assert p4["stages"][0]["cache_bytes"] - p1["stages"][0]["cache_bytes"] == expected - one_view


def test_plan_of_a_torchvision_network_has_a_line_per_stage():
    from seqtrain.plan import format_plan, plan
    from seqtrain.splitting import torchvision_stage_shapes

    p = plan(Config(arch="torchvision:resnet18", batch_size=2))
    shapes = torchvision_stage_shapes("torchvision:resnet18", "", (3, 32, 32))
    assert [b["out_shape"] for b in p["blocks"]] == [list(s) for s in shapes] == [s["feature_shape"]
                                                                                for s in p["stages"]]
    assert [b["stride"] for b in p["blocks"]] == [4, 2, 2, 2]  # conv1 and the max-pool, then each layer's first
    assert "  stage 0: 0 conv1..layer1.1 (5 convs) /4 -> 64@8x8" in format_plan(p)


def test_space_to_depth_is_exactly_invertible_and_feeds_the_block_four_times_the_channels():
    x = torch.randn(2, 5, 8, 8)
    s2d = torch.nn.PixelUnshuffle(2)
    assert s2d(x).shape == (2, 20, 4, 4) and torch.equal(torch.nn.PixelShuffle(2)(s2d(x)), x)  # nothing lost
    spec = block_specs("resnet20", width=4, downsample="accelerated", op="space-to-depth")[4]
    block = build_stage_block([spec])[0]
    assert isinstance(block[0], torch.nn.PixelUnshuffle) and block[1].conv1.in_channels == 4 * spec.in_ch


@pytest.mark.parametrize("arch", ["resnet20", "resnet32", "resnet56", "resnet110", "resnet18", "resnet34"])
@pytest.mark.parametrize("op", ["stride", "pool", "space-to-depth"])
@pytest.mark.parametrize("downsample", ["standard", "accelerated"])
def test_every_downsampling_op_gives_the_shapes_the_schedule_says(arch, op, downsample):
    specs = block_specs(arch, width=4, downsample=downsample, op=op)
    with torch.device("meta"):  # shapes only: nothing is computed
        x = torch.empty(2, 3, 32, 32)
        for i, block in enumerate(build_stage_block(specs)):
            x = block(x)
            assert tuple(x.shape[1:]) == feature_shape(specs[:i + 1], (3, 32, 32)), (i, specs[i])
    assert feature_shape(specs, (3, 32, 32)) == feature_shape(block_specs(arch, 4, 3, downsample), (3, 32, 32))


def test_aug_head_copies_the_following_blocks_at_a_fraction_of_their_width(tiny, capsys):
    cfg = Config(arch="resnet20", width=8, stages="3,3,4", balance="blocks", head="aug", head_blocks=2,
                 head_fraction=0.5).validate()
    head = build_head(cfg, 8, 10, layout_of(cfg).specs_after(0))
    following = stage_specs(cfg)[1][:2]
    assert [b.conv1.out_channels for b in head.blocks] == [max(1, round(s.out_ch / 2)) for s in following]
    assert isinstance(build_head(cfg, 32, 10, layout_of(cfg).specs_after(2)), AuxHead)  # the last stage: pool + linear
    # It trains a stage, and --plan counts it.
    assert tiny("--head", "aug", "--stage", "0") == 0
    assert (tiny.run_dir / "stage_00" / "cache" / "manifest.json").exists()
    capsys.readouterr()
    assert tiny("--plan", "--json", "--head", "aug", "--balance", "blocks", "--rebuild") == 0
    aug = json.loads(capsys.readouterr().out)
    assert tiny("--plan", "--json", "--head", "linear", "--balance", "blocks", "--rebuild") == 0
    linear = json.loads(capsys.readouterr().out)
    assert aug["stages"][0]["head_parameters"] > linear["stages"][0]["head_parameters"]
    assert aug["stages"][0]["train_bytes"] > linear["stages"][0]["train_bytes"]
    assert aug["stages"][-1]["head_parameters"] == linear["stages"][-1]["head_parameters"]


def test_head_pool_shrinks_what_the_conv_head_convolves_and_is_part_of_a_runs_identity():
    seen = []
    head = build_head(Config(head_pool=8), 16, 10)
    head.convs.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    assert head(torch.randn(2, 16, 32, 32)).shape == (2, 10)
    assert head(torch.randn(2, 16, 4, 4)).shape == (2, 10)  # already small: left as it is
    assert seen == [(2, 16, 8, 8), (2, 16, 4, 4)]
    full = build_head(Config(head_pool=0), 16, 10)
    assert [p.shape for p in full.parameters()] == [p.shape for p in head.parameters()]  # the same head, cheaper
    # Another value is another run (runs made before it existed keep their hash: tests/test_errors.py).
    assert config_hash(Config(head_pool=4), [2, 1, 2, 5]) != config_hash(Config(), [2, 1, 2, 5])
