"""Networks seqtrain did not define, through the whole pipeline: `--arch torchvision:NAME` on the command
line, and a user's own module cut with `seqtrain.split` and trained with `seqtrain.train_stages`."""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

import seqtrain
from seqtrain import load_model
from seqtrain.files import load_torch
from seqtrain.run import main


def flags(tmp_path, *extra: str) -> list[str]:
    return ["--run-dir", str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--n-train", "300",
            "--n-test", "100", "--max-epochs", "2", "--batch-size", "32", "--shard-mb", "1", "--head", "linear",
            *extra]


def test_torchvision_resnet18_trains_a_stage_and_the_next_from_its_cache(tmp_path, capsys):
    args = flags(tmp_path, "--arch", "torchvision:resnet18", "--image-size", "16", "--split", "layer3")
    assert main([*args, "--stage", "0"]) == 0
    assert main([*args, "--stage", "1"]) == 0
    run = tmp_path / "run"
    m0 = json.loads((run / "stage_00" / "cache" / "manifest.json").read_text())
    m1 = json.loads((run / "stage_01" / "cache" / "manifest.json").read_text())
    assert m0["feature_shape"] == [128, 2, 2] and m1["feature_shape"] == [512, 1, 1]  # 16 -> 4 (stem) -> 2 -> 1
    # Stage 0 is the stem, layer1 and layer2, under torchvision's own parameter names.
    names = set(load_torch(run / "stage_00" / "block.pt")["block"])
    assert "conv1.weight" in names and "layer2.1.bn2.running_mean" in names and not any("layer3" in n for n in names)
    assert main([*args, "--stage", "all"]) == 0  # composes the final network from both stages
    net = load_model(run / "final" / "model.pt")
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_torchvision_flags_that_do_not_apply_are_refused(tmp_path, capsys):
    assert main([*flags(tmp_path, "--arch", "torchvision:resnet18", "--width", "8"), "--plan"]) == 2
    assert "--width shapes seqtrain's own networks" in capsys.readouterr().err
    assert main([*flags(tmp_path, "--arch", "torchvision:vgg11_bn", "--image-size", "16"), "--plan"]) == 2
    assert "needs at least 32x32" in capsys.readouterr().err
    assert main([*flags(tmp_path, "--split", "layer2"), "--plan"]) == 2
    assert "--split places the stages of --arch torchvision:NAME only" in capsys.readouterr().err


class Small(nn.Module):
    """A user's network, written without seqtrain in mind; its forward applies its children in order."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.deep = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())

    def forward(self, x):
        return self.deep(self.down(self.stem(x)))


def test_python_api_trains_a_users_module_and_resumes(tmp_path):
    torch.manual_seed(0)
    model = Small()
    stages = seqtrain.split(model, at=["down", "deep"], example=torch.randn(2, 3, 32, 32))
    settings = dict(run_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), n_train=300, n_test=100,
                    max_epochs=2, batch_size=32, shard_mb=1)
    net = seqtrain.train_stages(stages, **settings)
    assert net.stages[1] is stages[1] and net.stages[1].down is model.down  # the user's own modules, trained
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(net(x), net.head(model(x)))
    assert [s["feature_shape"] for s in net.results["stages"]] == [[8, 32, 32], [16, 16, 16], [16, 16, 16]]
    final = net.results["final"]  # the composed network agrees with the path through the float16 caches
    assert final["test_acc"] == pytest.approx(final["cached_path_test_acc"], abs=0.02)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["arch"].startswith("custom:") and saved["stages"] == "3"

    # Fresh modules in a new process would be untrained: a second call restores every stage from disk.
    torch.manual_seed(1)
    again = seqtrain.train_stages(seqtrain.split(Small(), at=["down", "deep"]), **settings)
    with torch.no_grad():
        assert torch.allclose(again(x), net(x), atol=1e-6)

    # A different network must not reuse these caches: its structure gives it another identity.
    other = nn.Sequential(OrderedDict(stem=nn.Conv2d(3, 4, 3, padding=1), deep=nn.Conv2d(4, 4, 3, padding=1)))
    net3 = seqtrain.train_stages(seqtrain.split(other, at=["deep"]), **{**settings, "max_epochs": 1})
    assert [s["feature_shape"] for s in net3.results["stages"]] == [[4, 32, 32], [4, 32, 32]]
