"""The Python API: train your own network's stages with the same pipeline as the command line, and load a saved network.

    import seqtrain
    stages = seqtrain.split(trunk, at=["layer2", "layer3", "layer4"])      # any sequence of named children
    net = seqtrain.train_stages(stages, dataset="cifar10", data_dir="data", run_dir="runs/mine", max_epochs=30)
    net.results["final"]["test_acc"]                                          # the summary table's figures
    seqtrain.train_stages(stages, e2e=True, ...)                               # and the end-to-end baseline

`train_stages()` takes the settings of the command line as keyword arguments (the fields of `seqtrain.config.Config`),
trains stage after stage exactly as `--stage all` does (early stopping, HDF5 caches, checkpoints, resume
after a kill), and returns the composed network: your stages, trained in place, then the last stage's
auxiliary head. The run directory identifies your network by the structure of its stages (`custom:HASH`
in config.json), so a changed network retrains instead of reusing caches of another one. Unlike the
command line, all stages live in one process (they are your objects); each goes to the device when it
trains, and the network comes back on the CPU.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch.nn as nn

from seqtrain.config import FIELD_TYPES, Config
from seqtrain.data import image_side
from seqtrain.errors import UserError, from_python
from seqtrain.files import load_torch, sha256_json
from seqtrain.final import final_head
from seqtrain.job import resolve, run_job
from seqtrain.layout import resolve_layout
from seqtrain.log import log
from seqtrain.models import SequentialNet
from seqtrain.network import build_network
from seqtrain.report import summary_table
from seqtrain.rundir import RunDir


def custom_arch(stages: list[nn.Module]) -> str:
    """custom:HASH of the stages' structure (module types, names, shapes), not of their weights."""
    structure = [[(name, type(m).__name__, repr(m)) for name, m in stage.named_modules()] for stage in stages]
    return "custom:" + sha256_json(structure)[:12]


@from_python()  # messages name settings as keyword arguments (download=True), not as flags
def train_stages(stages: list[nn.Module], *, e2e: bool = False, **settings) -> nn.Module:
    """Train `stages` one at a time (resuming or skipping finished ones), cache their features, compose them.

    `e2e=True` also trains the end-to-end baseline of the same network in the same run directory (RUN/e2e,
    or RUN/e2e_checkpoint with checkpoint=True): a copy of your stages as you passed them (their
    initialisation), with the last stage's kind of head, trained by back-propagation with the same settings;
    the summary then compares the two. Returns the final network in eval mode; its `.results` holds the
    summary table's figures.
    """
    stages = list(stages)
    unknown = sorted(set(settings) - set(FIELD_TYPES))
    if unknown:
        raise UserError(f"train_stages() has no setting {', '.join(unknown)}; its keyword arguments are the fields "
                        "of seqtrain.config.Config (the command line's flags with underscores)")
    cfg = Config(**{**settings, "arch": custom_arch(stages), "stages": str(len(stages))}).validate()
    layout = resolve(cfg)
    baseline = copy.deepcopy(stages) if e2e else None  # before training: the baseline starts where you did
    outcome = run_job(cfg, layout, "all", blocks=stages)
    if baseline is not None:
        outcome = run_job(cfg, layout, "e2e", blocks=baseline, e2e_checkpoint=cfg.checkpoint, raw=outcome.raw)
    log("\n" + summary_table(outcome.results))
    net = SequentialNet(stages, final_head(cfg, layout, RunDir(cfg.run_dir))).cpu().eval()  # trained on the device
    net.mean, net.std, net.results = outcome.raw.mean, outcome.raw.std, outcome.results
    return net


def load_model(path: str | Path) -> SequentialNet:
    """Rebuild a saved network (final/model.pt or e2e/model.pt) in eval mode; its dict has config and stats."""
    saved = load_torch(Path(path))
    cfg = Config.from_dict(saved["config"])  # from_dict: a model.pt of an earlier seqtrain, in today's fields
    if cfg.arch.startswith("custom:"):
        raise UserError(f"{path} holds a network given to seqtrain.train_stages(), which only your code can rebuild: "
                        "split it as before and load torch.load(path)['model'] into SequentialNet(stages, head)")
    in_shape = (saved["in_channels"], image_side(cfg), image_side(cfg))
    net = build_network(cfg, resolve_layout(cfg, in_shape), saved["in_channels"], saved["num_classes"])
    net.load_state_dict(saved["model"])
    net.mean, net.std = saved["mean"], saved["std"]  # per-channel input normalisation, as lists
    return net.eval()
