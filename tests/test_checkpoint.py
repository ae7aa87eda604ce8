"""--checkpoint: activation checkpointing of every block trained, for a stage and for the e2e baseline. It must
not change the math (the same weights, BatchNorm buffers and losses), its memory must be what --plan and
the cut predict, and the e2e+ckpt baseline is a row of the summary beside e2e."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from seqtrain.config import Config
from seqtrain.files import load_torch
from seqtrain.job import resolve
from seqtrain.memory import measured_steps
from seqtrain.models import StageModel, build_head
from seqtrain.network import build_network, build_stage
from seqtrain.plan import plan
from seqtrain.recompute import checkpointed, is_chain_of_blocks
from seqtrain.run import main
from seqtrain.train import make_optimizer

from conftest import tiny_flags


def losses(path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in path.read_text().splitlines()]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpointed_stage_trains_to_the_same_weights_and_buffers(tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    for where, extra in ((plain, []), (ckpt, ["--checkpoint"])):  # one cut for both: --balance memory cuts
        flags = ("--stage", "0", "--balance", "blocks", "--max-epochs", "2", "--device", "cpu", *extra)
        assert main(tiny_flags(where, *flags)) == 0  # checkpointed stages where they are cheapest
    a, b = (load_torch(d / "run" / "stage_00" / "block.pt") for d in (plain, ckpt))
    assert same_state(a["block"], b["block"]) and same_state(a["head"], b["head"])  # BN running stats included
    assert any("running_mean" in k for k in a["block"])
    assert losses(plain / "run/stage_00/metrics.jsonl") == losses(ckpt / "run/stage_00/metrics.jsonl")
    manifest = json.loads((ckpt / "run/stage_00/cache/manifest.json").read_text())
    assert manifest["result"]["checkpoint"] is True
    # the same weights made the same features, in the same configuration: the caches are one cache
    assert manifest["fingerprint"] == json.loads((plain / "run/stage_00/cache/manifest.json").read_text())[
        "fingerprint"]


def test_e2e_with_checkpointing_is_its_own_baseline_with_the_same_weights(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_flags(tmp_path, "--max-epochs", "2", "--device", "cpu")) == 0
    assert main(tiny_flags(tmp_path, "--stage", "e2e", "--max-epochs", "2", "--device", "cpu")) == 0
    capsys.readouterr()
    assert main(tiny_flags(tmp_path, "--stage", "e2e", "--max-epochs", "2", "--device", "cpu", "--checkpoint")) == 0
    table = "".join(capsys.readouterr())  # the summary is logged: stdout or stderr
    plain, ckpt = (load_torch(run / d / "model.pt")["model"] for d in ("e2e", "e2e_checkpoint"))
    assert same_state(plain, ckpt)
    assert losses(run / "e2e/metrics.jsonl") == losses(run / "e2e_checkpoint/metrics.jsonl")
    e2e, e2e_ckpt = (json.loads((run / d / "results.json").read_text()) for d in ("e2e", "e2e_checkpoint"))
    assert e2e.keys() <= e2e_ckpt.keys() and e2e_ckpt["checkpoint"] is True and e2e["checkpoint"] is False
    assert e2e_ckpt["peak_tensor_mb"] < e2e["peak_tensor_mb"]
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert "e2e" in rows and "e2e+ckpt" in rows, table
    assert "final vs e2e:" in table and "final vs e2e+ckpt:" in table
    # the baseline's --checkpoint does not become the run's: the stages stay complete and current
    assert json.loads((run / "config.json").read_text())["checkpoint"] is False
    assert main(tiny_flags(tmp_path, "--max-epochs", "2", "--device", "cpu")) == 0
    assert "training it" not in "".join(capsys.readouterr())


def assert_plan_within_5_percent_of_memtracker(cfg: Config) -> None:
    """Every stage's --plan peak against MemTracker over three training steps of it."""
    layout = resolve(cfg)
    predicted = [s["train_bytes"] for s in plan(cfg, layout, num_classes=10)["stages"]]
    shape = layout.in_shape
    for k in range(layout.num_stages):
        torch.manual_seed(k)
        block, out = build_stage(cfg, layout, k, shape)
        model = StageModel(block, build_head(cfg, out[0], 10, layout.specs_after(k)))
        x, y = torch.randn(cfg.batch_size, *shape), torch.randint(0, 10, (cfg.batch_size,))
        with checkpointed([block], cfg.checkpoint):
            memory = measured_steps(model, make_optimizer(cfg, model), x, y, steps=3)
        assert memory.tensor_bytes == pytest.approx(predicted[k], rel=0.05), (k, memory.breakdown)
        shape = out


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_plan_predicts_a_checkpointed_stage_within_5_percent_of_memtracker(optimizer):
    assert_plan_within_5_percent_of_memtracker(
        Config(arch="resnet20", width=8, stages="2", batch_size=32, optimizer=optimizer, checkpoint=True).validate())


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("checkpoint", [False, True])
def test_plan_predicts_a_weight_bound_stage_within_5_percent_of_memtracker(optimizer, checkpoint):
    # Wide and at batch 2, the stages' peak is the optimizer step's (weights, gradients, state and the step's
    # temporaries), not backward's: what a large network's stage is like.
    assert_plan_within_5_percent_of_memtracker(
        Config(arch="resnet20", width=64, stages="2", batch_size=2, optimizer=optimizer, checkpoint=checkpoint,
               device="cpu").validate())


@pytest.mark.parametrize("split, head", [("layer1", "linear"), ("maxpool", "conv")])
def test_plan_predicts_a_checkpointed_torchvision_stem_within_5_percent_of_memtracker(split, head):
    # The stem's ReLU and max-pool run as they are; what they keep is freed before its conv and BatchNorm
    # recompute in backward (counting it as held overestimated the stem by a third). Split at the max-pool,
    # the stem's in-place ReLU output is the conv head's input too: freed once, not twice.
    assert_plan_within_5_percent_of_memtracker(
        Config(arch="torchvision:resnet18", image_size=64, split=split, batch_size=8, head=head,
               checkpoint=True).validate())


def test_a_torchvision_layer_is_checkpointed_block_by_block(monkeypatch):
    import copy

    import seqtrain.recompute

    cfg = Config(arch="torchvision:resnet18", image_size=64, split="layer3", batch_size=8, head="linear",
                 checkpoint=True).validate()
    layout = resolve(cfg)
    torch.manual_seed(0)
    block, out = build_stage(cfg, layout, 0, layout.in_shape)
    model = StageModel(block, build_head(cfg, out[0], 10, layout.specs_after(0)))
    x, y = torch.randn(8, *layout.in_shape), torch.randint(0, 10, (8,))
    # Stage 0 holds layer1 and layer2 whole, each an nn.Sequential of BasicBlocks: every BasicBlock is a block.
    assert [type(b).__name__ for b in seqtrain.recompute.blocks_of(block)] == ["Conv2d", "BatchNorm2d"] + [
        "BasicBlock"] * 4

    def step(model):
        opt = make_optimizer(cfg, model)
        with checkpointed([model.block]):
            memory = measured_steps(model, opt, x, y, steps=2)
        return memory.tensor_bytes, model.state_dict()

    plain = copy.deepcopy(model)
    by_block, trained = step(model)
    monkeypatch.setattr(seqtrain.recompute, "is_chain_of_blocks", lambda m: False)  # each layer recomputed whole
    by_layer, _ = step(copy.deepcopy(plain))
    assert by_block < 0.95 * by_layer  # one BasicBlock's inside at a time, not a whole layer's
    monkeypatch.undo()
    opt = make_optimizer(cfg, plain)
    measured_steps(plain, opt, x, y, steps=2)  # the same two steps without checkpointing
    assert same_state(trained, plain.state_dict())


def test_a_budget_cut_with_checkpointing_fits_its_measured_stages(tmp_path):
    budget = 6  # MB: the tiny network's largest block fits it only with checkpointing's smaller stages
    flags = ["--stages", "auto", "--memory-budget", f"{budget}MB", "--max-epochs", "1", "--device", "cpu"]
    plain = resolve(Config(**{**dict(n_train=400, n_test=100, width=4, batch_size=32), "stages": "auto",
                              "memory_budget": f"{budget}MB"}).validate())
    ckpt = resolve(Config(n_train=400, n_test=100, width=4, batch_size=32, stages="auto",
                          memory_budget=f"{budget}MB", checkpoint=True).validate())
    assert ckpt.num_stages < plain.num_stages  # checkpointed stages hold more blocks in the same budget
    assert main([*tiny_flags(tmp_path, *flags, "--checkpoint")]) == 0
    results = json.loads((tmp_path / "run" / "final" / "results.json").read_text())
    assert len(results["stages"]) == ckpt.num_stages
    assert all(s["peak_tensor_mb"] <= budget and s["checkpoint"] for s in results["stages"]), results["stages"]


def test_checkpoint_moves_a_memory_balanced_cut_so_changing_it_needs_rebuild(tmp_path, capsys):
    assert main(tiny_flags(tmp_path, "--stage", "0", "--max-epochs", "1")) == 0  # --balance memory, the default
    capsys.readouterr()
    assert main(tiny_flags(tmp_path, "--stage", "0", "--max-epochs", "1", "--checkpoint")) == 2
    err = capsys.readouterr().err
    assert "was made without --checkpoint" in err and "--rebuild" in err and err.count("\n") == 1
    # with a cut by block counts, checkpointing changes only memory and time: no refusal
    other = tmp_path / "blocks"
    assert main(tiny_flags(other, "--stage", "0", "--max-epochs", "1", "--balance", "blocks")) == 0
    assert main(tiny_flags(other, "--stage", "0", "--max-epochs", "1", "--checkpoint")) == 0


def test_the_segments_benchmark_checkpoints_segments_of_the_length_it_says(monkeypatch):
    """benchmarks/checkpoint_segments.py: segments of 2 over ResNet-14's 7 blocks (the stem and 6 BasicBlocks)
    are recomputed as 2, 2, 2 and 1 blocks, every one checkpointed; of 1, block by block as --checkpoint does.
    A checkpointed step holds less than end to end without checkpointing."""
    from benchmarks.checkpoint_segments import peak_bytes
    lengths = []

    def recording(function, *args, **kwargs):  # function: a checkpointed unit's own forward
        unit = function.__self__  # a segment is a chain of blocks; a block (the stem too) is not
        lengths.append(len(unit) if is_chain_of_blocks(unit) else 1)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr("seqtrain.recompute.checkpoint", recording)
    cfg = Config(arch="resnet14", width=4, stages="1", batch_size=8, image_size=16, device="cpu").validate()
    torch.manual_seed(0)
    net = build_network(cfg, resolve(cfg), 3, 10)
    plain = measured_steps(net, make_optimizer(cfg, net), torch.randn(8, 3, 16, 16),
                           torch.randint(0, 10, (8,))).tensor_bytes
    steps = 2  # measured_steps' default
    every_block = peak_bytes(cfg, 1)
    assert lengths == [1] * 7 * steps
    lengths.clear()
    pairs = peak_bytes(cfg, 2)
    assert lengths == [2, 2, 2, 1] * steps
    assert every_block < plain and pairs < plain
