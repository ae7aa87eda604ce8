"""The final network: every frozen stage and the last stage's head, composed, evaluated and saved.

`final/model.pt` is loadable with `torch.load(weights_only=True)` and rebuilt by `seqtrain.load_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from seqtrain import distributed
from seqtrain.config import Config
from seqtrain.contract import Manifest
from seqtrain.data import RawData
from seqtrain.errors import UserError
from seqtrain.files import save_torch
from seqtrain.layout import StageLayout
from seqtrain.log import log
from seqtrain.memory import out_of_memory_as
from seqtrain.models import SequentialNet, build_head
from seqtrain.network import build_network
from seqtrain.rundir import RunDir, check_weights, load_weights, stage_manifest
from seqtrain.streams import image_batches
from seqtrain.train import autocast_for, evaluate


def final_head(cfg: Config, layout: StageLayout, run: RunDir) -> torch.nn.Module:
    """The last stage's trained auxiliary head: the composed network's classifier."""
    last = layout.num_stages - 1
    manifest, why = stage_manifest(cfg, layout, run, last)
    if manifest is None:
        raise UserError(f"the final network needs every stage: {why}; run --stage all")
    head = build_head(cfg, manifest.feature_shape[0], manifest.num_classes)
    head.load_state_dict(load_weights(run.stage(last) / "block.pt", last, run)["head"])
    return head


def assemble_final(cfg: Config, layout: StageLayout, run: RunDir, manifests: list[Manifest], raw: RawData, device,
                   blocks: list[torch.nn.Module] | None = None) -> dict:
    """Compose frozen blocks 0..K-1 and the last head, evaluate on raw test images, save final/model.pt."""
    if blocks is None:
        net = build_network(cfg, layout, raw.in_shape[0], raw.num_classes)
    else:
        net = SequentialNet(blocks, build_head(cfg, manifests[-1].feature_shape[0], raw.num_classes))
    for k, manifest in enumerate(manifests):
        path = run.stage(k) / "block.pt"
        saved = load_weights(path, k, run)
        check_weights(saved, manifest, path, run, k)
        net.stages[k].load_state_dict(saved["block"])
    net.head.load_state_dict(saved["head"])
    net.to(device)
    with out_of_memory_as("evaluating the final network", ["a smaller --batch-size"]):
        _, acc = evaluate(net, image_batches(cfg, raw, "test", device, train=False), autocast_for(device, cfg.bf16))
    cached_acc = manifests[-1].result.test_acc
    if distributed.is_main():
        save_model(run.final / "model.pt", net, cfg, raw)
    final = {"test_acc": acc, "cached_path_test_acc": cached_acc, "fingerprint": manifests[-1].fingerprint}
    # The cached path sees every cache's rounding. int8 rounds to 1/255 of each channel's range: on stage 0's
    # features of the tests' tiny run (tests/conftest.py) its relative RMS error was 6.5e-3 against float16's
    # 2.1e-4, and it flipped 4 of 500 predictions where float16 flipped none. So 2 points for int8, half of one
    # otherwise: a guide for the note, not a bound (several int8 caches in a row add their errors).
    tolerance = 0.02 if cfg.cache_dtype == "int8" else 0.005
    note = "" if abs(acc - cached_acc) <= tolerance else f" (differs by more than {cfg.cache_dtype} rounding explains)"
    log(f"final: composed network test acc {acc:.4f} on raw images, {cached_acc:.4f} on cached features{note}")
    return final


def save_model(path: Path, net, cfg: Config, raw: RawData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_torch(path, {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "config": cfg.to_dict(),
                      "in_channels": raw.in_shape[0], "num_classes": raw.num_classes,
                      "mean": raw.mean, "std": raw.std})
