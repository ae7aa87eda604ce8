"""The Python API: train your own network's stages with the same pipeline as the command line, and load a saved network.

    import seqtrain
    stages = seqtrain.split(trunk, at=["layer2", "layer3", "layer4"])      # any sequence of named children
    net = seqtrain.train_stages(stages, dataset="cifar10", data_dir="data", run_dir="runs/mine", max_epochs=30)
    net.results["final"]["test_acc"]                                          # the summary table's figures

`train()` takes the settings of the command line as keyword arguments (the fields of `seqtrain.config.Config`),
trains stage after stage exactly as `--stage all` does (early stopping, HDF5 caches, checkpoints, resume
after a kill), and returns the composed network: your stages, trained in place, then the last stage's
auxiliary head. The run directory identifies your network by the structure of its stages (`custom:HASH`
in config.json), so a changed network retrains instead of reusing caches of another one. Unlike the
command line, all stages live in one process (they are your objects); each goes to the device when it
trains, and the network comes back on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from seqtrain.config import Config
from seqtrain.errors import UserError
from seqtrain.files import load_torch, sha256_json
from seqtrain.models import SequentialNet, build_network


def custom_arch(stages: list[nn.Module]) -> str:
    """custom:HASH of the stages' structure (module types, names, shapes), not of their weights."""
    structure = [[(name, type(m).__name__, repr(m)) for name, m in stage.named_modules()] for stage in stages]
    return "custom:" + sha256_json(structure)[:12]


def train_stages(stages: list[nn.Module], **settings) -> nn.Module:
    """Train `stages` one at a time (resuming or skipping finished ones), cache their features, compose them.

    Returns the final network in eval mode; its `.results` holds the summary table's figures.
    """
    from seqtrain.allocator import release_freed_memory
    from seqtrain.data import load_raw
    from seqtrain.distributed import resolve_device
    from seqtrain.log import log
    from seqtrain.pipeline import RunLock, final_head, prepare_run_dir, run_all, write_run_config
    from seqtrain.report import summary_table

    stages = list(stages)
    cfg = Config.from_dict({**settings, "arch": custom_arch(stages), "stages": str(len(stages))}).validate()
    device = resolve_device(cfg.device)
    if cfg.release_memory:
        release_freed_memory()
    raw = load_raw(cfg)
    run = prepare_run_dir(cfg)
    with RunLock(run):
        write_run_config(run, cfg, raw)
        log(f"seqtrain: {len(stages)} stages of {cfg.arch} on {cfg.dataset}, device {device}, run dir {run.root}")
        results = run_all(cfg, run, raw, device, blocks=stages)
    log("\n" + summary_table(results))
    net = SequentialNet(stages, final_head(cfg, run)).cpu().eval()  # training left the stages on the device
    net.mean, net.std, net.results = raw.mean, raw.std, results
    return net


def load_model(path: str | Path) -> SequentialNet:
    """Rebuild a saved network (final/model.pt or e2e/model.pt) in eval mode; its dict has config and stats."""
    saved = load_torch(Path(path))
    cfg = Config(**saved["config"])
    if cfg.arch.startswith("custom:"):
        raise UserError(f"{path} holds a network given to seqtrain.train_stages(), which only your code can rebuild: "
                        "split it as before and load torch.load(path)['model'] into SequentialNet(stages, head)")
    net = build_network(cfg, saved["in_channels"], saved["num_classes"])
    net.load_state_dict(saved["model"])
    net.mean, net.std = saved["mean"], saved["std"]  # per-channel input normalisation, as lists
    return net.eval()
