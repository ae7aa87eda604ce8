"""Stages cut by memory: per-block costs compose to the exact analytic bytes of any stage, the partition is
optimal, --stages auto takes the fewest stages that fit the budget, and --plan --json agrees with the table."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

from seqtrain.archs import block_specs, feature_shape
from seqtrain.balance import balanced_sizes, block_costs, fewest_stages
from seqtrain.config import Config, parse_size
from seqtrain.job import resolve
from seqtrain.models import StageModel, build_head, build_stage_block
from seqtrain.plan import plan, step_bytes
from seqtrain.report import MB
from seqtrain.run import main


@pytest.mark.parametrize("arch,downsample,op,head", [
    ("resnet20", "standard", "stride", "conv"), ("resnet20", "accelerated", "stride", "conv"),
    ("resnet20", "accelerated", "space-to-depth", "conv"), ("resnet20", "standard", "pool", "aug"),
    ("vgg11", "standard", "stride", "linear")])
def test_block_costs_compose_to_the_exact_bytes_of_every_stage(arch, downsample, op, head):
    cfg = Config(arch=arch, width=4, downsample=downsample, downsample_op=op, head=head, batch_size=16, stages="1")
    in_shape = (3, 32, 32)
    costs = block_costs(cfg, in_shape)
    specs = block_specs(arch, 4, 3, downsample, op)
    for i, j in itertools.combinations_with_replacement(range(len(specs)), 2):
        shape = feature_shape(specs[:i], in_shape)
        with torch.device("meta"):
            block = build_stage_block(specs[i:j + 1])
            model = StageModel(block, build_head(cfg, specs[j].out_ch, 10, specs[j + 1:]))
        assert costs.floor_bytes(i, j) == step_bytes(cfg, model, shape).total, (i, j)


def test_memory_balanced_partition_is_optimal():
    cfg = Config(arch="resnet20", width=4, batch_size=16, stages="1")
    costs = block_costs(cfg, (3, 32, 32))
    n = len(costs.fixed)
    for k in (2, 3, 4):
        def largest(sizes):
            starts = [sum(sizes[:m]) for m in range(len(sizes))]
            return max(costs.stage_bytes(a, a + s - 1) for a, s in zip(starts, sizes))

        every = [[b - a for a, b in zip((0, *cuts), (*cuts, n))] for cuts in itertools.combinations(range(1, n), k - 1)]
        best = min(largest(sizes) for sizes in every)
        sizes = balanced_sizes(costs, k)
        assert sum(sizes) == n and len(sizes) == k and largest(sizes) == best


def test_memory_split_beats_the_block_count_split_at_depth():
    memory = Config(arch="resnet110", stages="4").validate()
    blocks = Config(arch="resnet110", stages="4", balance="blocks").validate()
    costs = block_costs(memory, (3, 32, 32))

    def largest(cfg):
        sizes = list(resolve(cfg).sizes)
        starts = [sum(sizes[:m]) for m in range(4)]
        return max(costs.floor_bytes(a, a + s - 1) for a, s in zip(starts, sizes))

    e2e = costs.floor_bytes(0, len(costs.fixed) - 1)
    assert list(resolve(blocks).sizes) == [14, 14, 14, 13]
    assert largest(memory) <= 0.30 * e2e < largest(blocks)


@pytest.mark.parametrize("budget", ["6MB", "12MB", "40MB"])
def test_auto_stages_are_the_fewest_that_fit_the_budget(budget):
    cfg = Config(arch="resnet20", width=4, batch_size=32, stages="auto", memory_budget=budget,
                 device="cpu").validate()  # on CUDA the libraries' workspace takes a share of the budget first
    costs = block_costs(cfg, (3, 32, 32))
    sizes, limit = list(resolve(cfg).sizes), parse_size(budget)
    starts = [sum(sizes[:m]) for m in range(len(sizes))]
    assert all(costs.stage_bytes(a, a + s - 1) <= limit for a, s in zip(starts, sizes))
    if len(sizes) > 1:  # one stage fewer cannot fit, however it is cut
        fewer = balanced_sizes(costs, len(sizes) - 1)
        starts = [sum(fewer[:m]) for m in range(len(fewer))]
        assert max(costs.stage_bytes(a, a + s - 1) for a, s in zip(starts, fewer)) > limit
    assert fewest_stages(costs, limit) == len(sizes)


def test_an_impossible_budget_is_one_line_naming_the_block_and_what_fits(tmp_path, capsys):
    code = main(["--plan", "--run-dir", str(tmp_path / "run"), "--stages", "auto", "--memory-budget", "1MB"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    # the advice names what fits (tests/test_advice.py follows each suggestion): at 1 MB no batch size does
    # the block named is the one that needs the most, and the least budget offered is what it needs
    words = re.search(r"--memory-budget 1MB is too small: block \d+ alone needs ([\d.,]+) MB .* give a budget of "
                      r"at least ([\d,]+) MB", err)
    assert words, err
    need, least = (float(g.replace(",", "")) for g in words.groups())
    assert need - 0.05 <= least < need + 1  # need to 0.1 MB, the least budget in whole MB
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flags,message", [
    (["--stages", "auto"], "--stages auto and --memory-budget SIZE go together"),
    (["--memory-budget", "64MB"], "--stages auto and --memory-budget SIZE go together"),
    (["--stages", "auto", "--memory-budget", "lots"], "--memory-budget 'lots' is not a size such as 512MB"),
    (["--stages", "auto", "--memory-budget", "160"], "--memory-budget 160 has no unit: write 160MB or 160GB")])
def test_budget_flags_go_together(flags, message, tmp_path, capsys):
    assert main(["--plan", "--run-dir", str(tmp_path / "run"), *flags]) == 2
    assert message in capsys.readouterr().err


def test_plan_json_parses_and_agrees_with_the_table(tmp_path, capsys):
    flags = ["--plan", "--run-dir", str(tmp_path / "run"), "--arch", "resnet56", "--stages", "4"]
    assert main([*flags, "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert main(flags) == 0
    table = capsys.readouterr().out
    assert [s["blocks"] for s in p["stages"]] == list(resolve(Config(arch="resnet56", stages="4").validate()).sizes)
    largest = max(s["train_bytes"] for s in p["stages"])
    assert p["largest_stage_ratio"] == pytest.approx(largest / p["e2e"]["train_bytes"])
    assert f"= {p['largest_stage_ratio']:.2f} x e2e's {p['e2e']['train_bytes'] / MB:,.1f} MB" in table
    assert all(s["cache_bytes"] > 0 for s in p["stages"])


@pytest.mark.parametrize("checkpoint", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_cut_and_the_plan_count_a_weight_bound_stage_alike(optimizer, checkpoint):
    # Wide and at batch 2, the last stage's peak is the optimizer step's: the cut must see it as --plan does.
    cfg = Config(arch="resnet20", width=64, stages="3", batch_size=2, optimizer=optimizer, checkpoint=checkpoint,
                 device="cpu").validate()
    layout = resolve(cfg)
    costs = block_costs(cfg, layout.in_shape)
    planned = [s["train_bytes"] for s in plan(cfg, layout, num_classes=10)["stages"]]
    starts = [sum(layout.sizes[:k]) for k in range(layout.num_stages)]
    stages = [(i, i + n - 1) for i, n in zip(starts, layout.sizes)]
    assert [costs.train_bytes(i, j) for i, j in stages] == planned
    assert costs.train_bytes(*stages[-1]) == costs.step_bytes(*stages[-1])  # the widest: the step's peak
    n = len(costs.fixed)  # the vectorised costs the partition searches, for every stage it could pick
    assert all(list(costs.ending()[j]) == [costs.stage_bytes(i, j) for i in range(j + 1)] for j in range(n))
