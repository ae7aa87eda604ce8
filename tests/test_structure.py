"""The package's structure and its on-disk contract: no import cycles, a settings record that resolves
nothing, and files written by an earlier seqtrain still read through the typed contract."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch

from seqtrain.cache import read_manifest
from seqtrain.config import Config, config_hash
from seqtrain.contract import Manifest, StageResult
from seqtrain.job import resolve

PACKAGE = Path(__file__).resolve().parents[1] / "seqtrain"
FORMAT2 = Path(__file__).parent / "data" / "format2"  # written by the seqtrain of before this contract


def seqtrain_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(module, line, at top level) of every import of a seqtrain module in `path`: function-level ones and
    those made for annotations (under TYPE_CHECKING) included."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("seqtrain"):
            names = [node.module] if node.module != "seqtrain" else [f"seqtrain.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("seqtrain.")]
        out += [(name.split(".")[1], node.lineno, id(node) in top) for name in names if "." in name]
    return out


def test_no_import_cycle_in_the_package():
    graph = {p.stem: {m for m, _, _ in seqtrain_imports(p)} - {p.stem} for p in PACKAGE.glob("*.py")}
    done, path = set(), []

    def visit(module: str) -> None:
        if module in path:
            cycle = path[path.index(module):] + [module]
            pytest.fail("import cycle: " + " -> ".join(cycle))
        if module in done:
            return
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            visit(dep)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert len(done) == len(graph) > 20


def test_config_is_a_record_that_imports_no_sibling_at_call_time():
    imports = seqtrain_imports(PACKAGE / "config.py")
    assert all(top for _, _, top in imports), f"function-level imports in config.py: {imports}"
    assert {m for m, _, _ in imports} <= {"archs", "errors", "files"}
    source = (PACKAGE / "config.py").read_text()
    assert "import torch" not in source


def test_the_layout_is_resolved_once_and_hashed_with_the_config():
    cfg = Config(arch="resnet20", width=4, stages="3", batch_size=8).validate()
    layout = resolve(cfg)
    assert sum(layout.sizes) == 10 and layout.num_stages == 3 and layout.how == "memory"
    assert [len(g) for g in layout.specs] == list(layout.sizes)
    assert layout.config_hash == config_hash(cfg, list(layout.sizes))
    assert layout.specs_after(0) == [s for g in layout.specs[1:] for s in g]


def test_a_manifest_of_the_earlier_format_reads_and_round_trips(tmp_path):
    raw = json.loads((FORMAT2 / "manifest.json").read_text())
    shutil.copy(FORMAT2 / "manifest.json", tmp_path / "manifest.json")
    manifest = read_manifest(tmp_path)  # verifies the fingerprint of the file as written then
    assert isinstance(manifest, Manifest) and isinstance(manifest.result, StageResult)
    assert manifest.to_dict() == {**raw, "result": {**raw["result"], "checkpoint": False}}
    train = manifest.splits["train"]
    assert manifest.stage == 1 and train.count == sum(s.count for s in train.shards)
    assert manifest.bytes == sum(s["bytes"] for split in raw["splits"].values() for s in split["shards"])
    # the run it belongs to keeps its configuration hash: its caches stay current under this seqtrain
    saved = json.loads((FORMAT2 / "config.json").read_text())
    from seqtrain.config import resolve as resolve_config

    cfg = resolve_config(saved, {}, {"run_dir": str(tmp_path / "run"), "data_dir": str(tmp_path / "data")})
    assert cfg.balance == "blocks" and cfg.shuffle_mb == saved["loader_mb"] / 2
    assert resolve(cfg).config_hash == raw["config_hash"]


def test_a_model_file_of_an_earlier_seqtrain_loads():
    from seqtrain import load_model

    saved = torch.load(FORMAT2 / "model.pt", weights_only=True)
    assert "loader_mb" in saved["config"] and "balance" not in saved["config"]  # as an earlier seqtrain wrote it
    net = load_model(FORMAT2 / "model.pt")
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, saved["num_classes"])


def test_plan_and_layout_never_touch_cuda(monkeypatch, tmp_path, capsys):
    """On a GPU machine, --plan and resolving a layout (an AdamW step on the meta device) must not create a
    CUDA context: torchrun ranks would each hold one on GPU 0 before choosing their own."""
    from seqtrain.run import main

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was initialised")

    # A machine with a GPU, as far as torch's checks can tell, where initialising CUDA fails loudly.
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "current_stream", no_cuda)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    flags = {"arch": "resnet20", "width": 4, "stages": "2", "batch_size": 8, "optimizer": "adamw", "device": "cpu"}
    resolve(Config(**flags).validate())
    assert main(["--plan", "--run-dir", str(tmp_path / "run"), "--arch", "resnet20", "--width", "4",
                 "--stages", "auto", "--memory-budget", "64MB", "--optimizer", "adamw", "--device", "cpu"]) == 0
    assert "plan: resnet20" in capsys.readouterr().out
    assert not torch.cuda.is_initialized()


def test_on_cuda_the_plan_counts_the_library_workspace_and_the_cut_stays_the_same(monkeypatch):
    """The CUDA allocator's peak includes cuBLAS's workspace, which a step on the meta device does not see."""
    from seqtrain.balance import CUDA_WORKSPACE_BYTES
    from seqtrain.plan import plan

    cfg = Config(arch="resnet20", width=4, stages="2", batch_size=8, device="auto").validate()
    on_cpu = plan(cfg, resolve(cfg), num_classes=10)
    assert on_cpu["library_workspace_bytes"] == 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, as --device auto sees it
    on_gpu = plan(cfg, resolve(cfg), num_classes=10)
    assert [b["train_bytes"] - a["train_bytes"] for a, b in zip(on_cpu["stages"], on_gpu["stages"])] == \
        [CUDA_WORKSPACE_BYTES] * 2
    assert on_gpu["e2e"]["train_bytes"] - on_cpu["e2e"]["train_bytes"] == CUDA_WORKSPACE_BYTES
    # the cut itself is a function of the settings, not of the machine: a run resumes anywhere
    budget = Config(arch="resnet20", width=4, batch_size=8, stages="auto", memory_budget="4MB",
                    device="auto").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu_cut = resolve(budget)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve(budget) == on_cpu_cut
