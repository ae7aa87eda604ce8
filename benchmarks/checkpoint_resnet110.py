"""Activation checkpointing against seqtrain's stages, with and without --checkpoint: CIFAR ResNet-110 at batch 128.

    python benchmarks/checkpoint_resnet110.py [--batch-size 128] [--out DIR]   # ~2-5 min on 2 CPU cores

Measures one SGD step (two, the first building the optimizer state) of: end to end, end to end with every
block checkpointed, and the largest stage of 4 stages, 4 checkpointed stages and 8 checkpointed stages, each
cut by --balance memory as seqtrain cuts it; every tensor counted by PyTorch's MemTracker (memory.PeakMemory),
against --plan's prediction. Prints a table, the ratio to the target (4 checkpointed stages: the largest
<= 0.15x of end to end's tensor peak) and, last, a JSON line; writes OUT/checkpoint_resnet110.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from seqtrain.config import Config
from seqtrain.files import write_json
from seqtrain.job import resolve
from seqtrain.memory import device_description, measured_steps
from seqtrain.models import StageModel, build_head
from seqtrain.network import build_network, build_stage
from seqtrain.plan import plan
from seqtrain.recompute import checkpointed
from seqtrain.report import MB, aligned
from seqtrain.train import make_optimizer

TARGET = 0.15  # 4 checkpointed stages: the largest / end to end's tensor peak
CUTS = (("4 stages", "4", False), ("4 stages + --checkpoint", "4", True), ("8 stages + --checkpoint", "8", True))


def measured_step(model: torch.nn.Module, stages: list[torch.nn.Module], x: torch.Tensor, checkpoint: bool,
                  cfg: Config) -> int:
    with checkpointed(stages, checkpoint):
        return measured_steps(model, make_optimizer(cfg, model), x, torch.randint(0, 10, (len(x),))).tensor_bytes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/checkpoint_resnet110"))
    args = p.parse_args(argv)
    rows = {}
    for name, stages, checkpoint in CUTS:
        cfg = Config(arch="resnet110", stages=stages, batch_size=args.batch_size, checkpoint=checkpoint,
                     device="cpu").validate()
        layout = resolve(cfg)
        planned = plan(cfg, layout, num_classes=10)
        k = max(range(layout.num_stages), key=lambda i: planned["stages"][i]["train_bytes"])
        shape = tuple(planned["stages"][k]["in_shape"])
        torch.manual_seed(0)
        block, out = build_stage(cfg, layout, k, shape)
        model = StageModel(block, build_head(cfg, out[0], 10, layout.specs_after(k)))
        rows[name] = {"sizes": list(layout.sizes), "stage": k, "predicted": planned["stages"][k]["train_bytes"],
                      "measured": measured_step(model, [block], torch.randn(args.batch_size, *shape), checkpoint, cfg)}
        if name == "4 stages":  # the baselines' predictions (they do not depend on the cut)
            e2e_plan, ckpt_plan = planned["e2e"]["train_bytes"], planned["e2e_checkpoint"]["train_bytes"]
    cfg = Config(arch="resnet110", stages="4", batch_size=args.batch_size, device="cpu").validate()
    for name, checkpoint, predicted in (("e2e", False, e2e_plan), ("e2e + checkpointing", True, ckpt_plan)):
        torch.manual_seed(0)
        net = build_network(cfg, resolve(cfg), 3, 10)
        x = torch.randn(args.batch_size, 3, 32, 32)
        rows[name] = {"predicted": predicted, "measured": measured_step(net, list(net.stages), x, checkpoint, cfg)}
    e2e, ckpt = rows["e2e"]["measured"], rows["e2e + checkpointing"]["measured"]
    lines = [["configuration", "blocks per stage", "largest stage, MB", "predicted, MB", "/ e2e", "/ e2e+ckpt"]]
    for name, r in rows.items():
        lines.append([name, ",".join(map(str, r.get("sizes", []))) or "-", f"{r['measured'] / MB:,.1f}",
                      f"{r['predicted'] / MB:,.1f}", f"{r['measured'] / e2e:.3f}", f"{r['measured'] / ckpt:.2f}"])
    print(aligned(lines))
    ratio = rows["4 stages + --checkpoint"]["measured"] / e2e
    print(f"target: 4 checkpointed stages, largest / e2e {ratio:.3f} (<= {TARGET}): "
          f"{'met' if ratio <= TARGET else 'MISSED'}")
    summary = {"torch": torch.__version__, "device_name": device_description("cpu"), "batch_size": args.batch_size,
               "rows": rows, "ratio": ratio, "target": TARGET, "met": ratio <= TARGET}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "checkpoint_resnet110.json", summary)
    print(f"results: {args.out / 'checkpoint_resnet110.json'}")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return summary


if __name__ == "__main__":
    main()
