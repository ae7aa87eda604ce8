"""Splitting modules into stages: the generic split() and torchvision architectures built one stage at a time."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torchvision

from seqtrain.errors import UserError
from seqtrain.models import AuxHead
from seqtrain.splitting import (
    TORCHVISION,
    build_torchvision_stage,
    check_split,
    check_torchvision,
    meta_model,
    split,
    stage_shapes,
    torchvision_num_stages,
    torchvision_stage_channels,
    torchvision_stage_names,
    torchvision_stage_shapes,
)

NATURAL_STAGES = {"resnet18": 4, "resnet34": 4, "resnet50": 4, "resnet101": 4, "resnet152": 4, "wide_resnet50_2": 4,
                  "wide_resnet101_2": 4, "vgg11_bn": 5, "vgg16_bn": 5, "mobilenet_v2": 5, "mobilenet_v3_small": 5}


class Net(nn.Module):
    """A module whose forward applies its children in order, written out as users write it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        return self.fc(self.flat(self.pool(self.relu(self.bn(self.stem(x))))))


class Residual(Net):
    def forward(self, x):
        x = self.relu(self.bn(self.stem(x)))
        return self.fc(self.flat(self.pool(x + self.relu(x))))  # not its children in order


# --------------------------------------------------------------------------------------------------------
# split() on any module


def test_split_cuts_before_each_name_and_keeps_the_modules_and_names():
    net, x = Net(), torch.randn(2, 3, 8, 8)
    stages = split(net, at=["relu", "flat"], example=x)
    assert [list(dict(s.named_children())) for s in stages] == [["stem", "bn"], ["relu", "pool"], ["flat", "fc"]]
    assert stages[0].stem is net.stem and stages[2].fc is net.fc  # the model's own modules, not copies
    keys = [k for s in stages for k in s.state_dict()]
    assert keys == list(net.state_dict())
    net.eval()
    y = x
    for s in stages:
        y = s(y)
    torch.testing.assert_close(y, net(x))
    assert split(net, at=[])[0].fc is net.fc  # no cut: one stage


@pytest.mark.parametrize("at, message", [
    (["nope"], "no child named 'nope'; the children are: stem, bn, relu, pool, flat, fc"),
    (["pool", "bn"], "must follow the model's order"),
    (["bn", "bn"], "'bn' is given twice"),
    (["stem"], "leaves stage 0 empty"),
])
def test_split_rejects_bad_cuts_in_one_line(at, message):
    with pytest.raises(UserError, match=message) as e:
        split(Net(), at=at)
    assert "\n" not in str(e.value)


def test_check_split_catches_a_forward_that_is_not_its_children_in_order():
    net = Residual().train()
    with pytest.raises(UserError, match="do not reproduce Residual's forward"):
        split(net, at=["pool"], example=torch.randn(2, 3, 8, 8))
    assert net.training and net.bn.training  # modes restored
    assert net.bn.num_batches_tracked.item() == 0  # checked in eval mode: statistics untouched
    ok = Net()
    check_split(ok, split(ok, at=["pool"]), torch.randn(2, 3, 8, 8))


def test_stage_shapes_touches_nothing():
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    stages = split(net, at=["pool", "fc"])
    assert stage_shapes(stages, (3, 8, 8)) == [(4, 8, 8), (64,), (5,)]
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]) and v.device.type == "cpu"


def test_docstring_example_on_a_real_torchvision_resnet():
    net = torchvision.models.resnet18(num_classes=10)
    trunk = nn.Sequential(OrderedDict(list(net.named_children())[:-2]))  # drop avgpool + fc
    stages = split(trunk, at=["layer2", "layer3", "layer4"], example=torch.randn(2, 3, 32, 32))
    assert stage_shapes(stages, (3, 32, 32)) == torchvision_stage_shapes("torchvision:resnet18", "", (3, 32, 32))
    with pytest.raises(UserError, match="do not reproduce ResNet's forward"):  # torch.flatten is not a child
        split(net, at=["layer3"], example=torch.randn(2, 3, 32, 32))


# --------------------------------------------------------------------------------------------------------
# Torchvision architectures


@pytest.mark.parametrize("name", list(TORCHVISION))
def test_stages_compose_to_the_predicted_shapes_each_halving_the_resolution(name):
    arch = f"torchvision:{name}"
    n = torchvision_num_stages(arch, "")
    assert n == NATURAL_STAGES[name]
    shapes = torchvision_stage_shapes(arch, "", (3, 32, 32))
    first = 8 if "resnet" in name else 16  # the ResNet stem (stride-2 conv, max-pool) reduces 4x
    assert [h for _, h, _ in shapes] == [first >> k for k in range(n)]
    full = set(meta_model(arch).state_dict())
    x, keys = torch.randn(2, 3, 32, 32), []
    for k in range(n):
        stage = build_torchvision_stage(arch, "", k)
        keys += list(stage.state_dict())
        with torch.no_grad():
            x = stage(x)
        assert tuple(x.shape[1:]) == shapes[k]
    # Every stage's state_dict keys are the torchvision model's own; together, all of it but the classifier.
    assert len(keys) == len(set(keys)) and set(keys) <= full
    assert {k.split(".")[0] for k in full - set(keys)} <= {"fc", "classifier"}


def test_split_names_groups_and_errors():
    arch = "torchvision:resnet50"
    names = torchvision_stage_names(arch, "layer2, layer3.3,layer4")
    assert [g[0] for g in names] == ["conv1", "layer2.0", "layer3.3", "layer4.0"]
    assert names[1][-1] == "layer3.2" and names[2] == ["layer3.3", "layer3.4", "layer3.5"]
    assert torchvision_stage_shapes(arch, "layer2,layer3.3,layer4", (3, 32, 32))[1] == (1024, 2, 2)
    assert torchvision_stage_channels(arch, "layer2,layer3.3,layer4") == [256, 1024, 1024, 2048]
    with pytest.raises(UserError, match=r"no child named 'layer5'.*layer3\.0\.\.layer3\.5"):
        check_torchvision(arch, "layer5")
    with pytest.raises(UserError, match="must follow the model's order"):
        check_torchvision(arch, "layer3,layer2")
    with pytest.raises(UserError, match="leaves stage 0 empty"):
        check_torchvision("torchvision:vgg11_bn", "features")
    with pytest.raises(UserError, match="densenet121 is not supported; choose one of: torchvision:resnet18"):
        check_torchvision("torchvision:densenet121", "")
    with pytest.raises(UserError, match="reduces 16x16 images below 1x1; it needs at least 32x32"):
        torchvision_stage_shapes("torchvision:vgg11_bn", "", (3, 16, 16))
    with pytest.raises(UserError, match="takes 3-channel images, but the data has 1"):
        torchvision_stage_shapes("torchvision:resnet18", "", (1, 32, 32))
    assert torchvision_stage_shapes("torchvision:resnet18", "", (3, 16, 16))[-1] == (512, 1, 1)


def test_building_one_stage_materialises_only_that_stage(monkeypatch):
    arch = "torchvision:resnet50"
    made, inits = [], []
    empty_like, kaiming = torch.empty_like, nn.init.kaiming_normal_

    def counting_empty_like(t, *args, **kw):
        out = empty_like(t, *args, **kw)
        if out.device.type != "meta":
            made.append(out.numel())
        return out

    def counting_kaiming(t, *args, **kw):
        if t.device.type != "meta":
            inits.append(t.numel())
        return kaiming(t, *args, **kw)

    monkeypatch.setattr(torch, "empty_like", counting_empty_like)
    monkeypatch.setattr(nn.init, "kaiming_normal_", counting_kaiming)
    stage = build_torchvision_stage(arch, "", 2)
    monkeypatch.undo()
    expected = sum(t.numel() for t in stage.state_dict().values())
    assert sum(made) == expected  # layer3 only: 7.1M of resnet50's 25.6M
    assert sum(inits) == sum(m.weight.numel() for m in stage.modules() if isinstance(m, nn.Conv2d))
    whole = sum(t.numel() for t in meta_model(arch).state_dict().values())
    assert expected < whole / 3


def test_deterministic_under_manual_seed():
    torch.manual_seed(1)
    a = build_torchvision_stage("torchvision:mobilenet_v2", "", 1).state_dict()
    torch.manual_seed(1)
    b = build_torchvision_stage("torchvision:mobilenet_v2", "", 1).state_dict()
    torch.manual_seed(2)
    c = build_torchvision_stage("torchvision:mobilenet_v2", "", 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["features.2.conv.0.0.weight"], c["features.2.conv.0.0.weight"])


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "vgg11_bn", "mobilenet_v2", "mobilenet_v3_small"])
def test_initialisation_matches_torchvision(name):
    arch = f"torchvision:{name}"
    torch.manual_seed(0)
    ref = torchvision.models.get_model(name, weights=None).state_dict()
    torch.manual_seed(0)
    ours = {}
    for k in range(torchvision_num_stages(arch, "")):
        ours.update(build_torchvision_stage(arch, "", k).state_dict())
    for key, t in ours.items():
        want = ref[key]
        assert t.device.type == "cpu" and t.shape == want.shape and t.dtype == want.dtype, key
        if t.numel() < 2 or not t.is_floating_point() or want.std() == 0:  # BatchNorm, biases, statistics: exact
            assert torch.equal(t, want), key
            continue
        n, std = t.numel(), want.std().item()
        # Same distribution: means within ~5 standard errors, standard deviations within ~5 of theirs.
        assert abs(t.mean().item() - want.mean().item()) < 5 * std * math.sqrt(2 / n), key
        assert abs(t.std().item() / std - 1) < 5 / math.sqrt(n), key


def test_a_resnet18_stage_trains_with_an_aux_head():
    torch.manual_seed(0)
    block = build_torchvision_stage("torchvision:resnet18", "", 0)
    out_ch = torchvision_stage_shapes("torchvision:resnet18", "", (3, 32, 32))[0][0]
    model = nn.Sequential(block, AuxHead(out_ch, 10))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
