"""Large networks, where weights, gradients and optimizer state dominate: torchvision resnet152 and
wide_resnet101_2 at 224x224, SGD and AdamW, batch 32. End to end with activation checkpointing still holds the
whole network's weights, gradients and optimizer state; a stage holds its own.

    python -m benchmarks.large_models             # --plan's figures (meta device, no data): a few minutes
    python -m benchmarks.large_models --measure   # and one measured point per network (see below)

Per network and optimizer, the predicted tensor peak (seqtrain.plan, the figure `--plan` prints) of: e2e,
e2e+ckpt (every block checkpointed), and seqtrain in K = 4 and K = 8 stages, each without and with
--checkpoint; the ratio of the largest stage to e2e+ckpt. Stages are cut with --split at the boundaries in
SPLITS, chosen by hand from the per-stage plan to even out the largest stages (torchvision networks are cut
by --split only; --balance applies to seqtrain's own); the heads are `--head linear`, since a conv head on
2048 channels would outweigh a stage (37.8 M parameters for wide_resnet101_2's last).

--measure: one real training step per network of its largest K = 4 stage with --checkpoint, SGD, at batch 2
(the memory of a batch-32 step does not fit this benchmark's 2-core machine), tensors counted by MemTracker on
the CPU, against --plan at the same batch. Output: OUT/large_models.json, a table, and last a JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from seqtrain.config import Config
from seqtrain.files import write_json
from seqtrain.job import resolve
from seqtrain.memory import device_description, measured_steps
from seqtrain.models import StageModel, build_head
from seqtrain.network import build_stage
from seqtrain.plan import plan
from seqtrain.recompute import checkpointed
from seqtrain.report import MB, aligned
from seqtrain.train import make_optimizer

ARCHS = ("torchvision:resnet152", "torchvision:wide_resnet101_2")
SPLITS = {  # --split for K = 4 and K = 8: where stages 1, 2, ... begin
    "torchvision:resnet152": {4: "layer2.4,layer3.8,layer3.24",
                              8: "layer1.1,layer2,layer2.4,layer3,layer3.8,layer3.18,layer3.28"},
    "torchvision:wide_resnet101_2": {4: "layer2,layer3.8,layer3.17",
                                     8: "layer1.1,layer2,layer2.2,layer3,layer3.6,layer3.12,layer3.18"},
}
COUNTS = {"train": 1000, "val": 100, "test": 100}  # cache sizes are not what this benchmark is about
TARGET = {"arch": "torchvision:wide_resnet101_2", "optimizer": "adamw", "k": 4, "max_ratio": 0.4}


def config(arch: str, optimizer: str, batch_size: int, split: str = "", checkpoint: bool = False) -> Config:
    return Config(arch=arch, image_size=224, batch_size=batch_size, optimizer=optimizer, split=split, head="linear",
                  checkpoint=checkpoint, device="cpu", dataset="imagenet").validate()


def planned(cfg: Config) -> dict:
    return plan(cfg, resolve(cfg), num_classes=1000, n_samples=COUNTS)


def plan_rows(batch_size: int) -> list[dict]:
    """Every (network, optimizer): e2e, e2e+ckpt and the largest stage of each K, with and without checkpoint."""
    rows = []
    for arch in ARCHS:
        for optimizer in ("sgd", "adamw"):
            row = {"arch": arch, "optimizer": optimizer, "batch_size": batch_size}
            for k, split in SPLITS[arch].items():
                for checkpoint in (False, True):
                    p = planned(config(arch, optimizer, batch_size, split, checkpoint))
                    name = f"k{k}" + ("_ckpt" if checkpoint else "")
                    row[name] = max(s["train_bytes"] for s in p["stages"])
                    row[f"{name}_stages"] = [s["train_bytes"] for s in p["stages"]]
                    # e2e does not depend on the cut: the K = 4 plan's figures stand for it
                    if k == 4 and not checkpoint:
                        row["e2e"], row["e2e_ckpt"] = p["e2e"]["train_bytes"], p["e2e_checkpoint"]["train_bytes"]
                        row["parameters"] = p["e2e"]["parameters"]
            row.update({f"{n}_vs_e2e_ckpt": row[n] / row["e2e_ckpt"] for n in ("k4", "k4_ckpt", "k8", "k8_ckpt")})
            rows.append(row)
            print(f"  {arch} {optimizer}: planned", file=sys.stderr, flush=True)
    return rows


def measure(arch: str, batch_size: int) -> dict:
    """One SGD step of the largest K = 4 stage with --checkpoint, counted by MemTracker, against --plan."""
    cfg = config(arch, "sgd", batch_size, SPLITS[arch][4], checkpoint=True)
    layout, p = resolve(cfg), planned(cfg)
    k = max(range(layout.num_stages), key=lambda i: p["stages"][i]["train_bytes"])
    in_shape = tuple(p["stages"][k]["in_shape"])
    torch.manual_seed(0)
    block, out = build_stage(cfg, layout, k, in_shape)
    model = StageModel(block, build_head(cfg, out[0], 1000))
    x, y = torch.randn(batch_size, *in_shape), torch.randint(0, 1000, (batch_size,))
    t0 = time.perf_counter()
    with checkpointed([block]):
        memory = measured_steps(model, make_optimizer(cfg, model), x, y)
    predicted = p["stages"][k]["train_bytes"]
    return {"arch": arch, "stage": k, "batch_size": batch_size, "measured": memory.tensor_bytes,
            "predicted": predicted, "ratio": memory.tensor_bytes / predicted, "seconds": time.perf_counter() - t0,
            "breakdown_mb": {n: round(v / MB, 1) for n, v in memory.breakdown.items()}}


def table(rows: list[dict]) -> str:
    head = ["network", "optimizer", "params", "e2e", "e2e+ckpt", "K=4", "K=4+ckpt", "K=8", "K=8+ckpt",
            "K=4+ckpt / e2e+ckpt", "K=8+ckpt / e2e+ckpt"]
    lines = [head]
    for r in rows:
        lines.append([r["arch"].removeprefix("torchvision:"), r["optimizer"], f"{r['parameters'] / 1e6:.1f} M",
                      *(f"{r[n] / MB:,.0f}" for n in ("e2e", "e2e_ckpt", "k4", "k4_ckpt", "k8", "k8_ckpt")),
                      f"{r['k4_ckpt_vs_e2e_ckpt']:.2f}", f"{r['k8_ckpt_vs_e2e_ckpt']:.2f}"])
    return aligned(lines) + "\n(predicted tensor peaks in MB at batch 32, 224x224; K=4 / K=8: the largest stage)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-size", type=int, default=32, help="of the planned figures (default: 32)")
    p.add_argument("--measure", action="store_true", help="also measure one stage per network at --measure-batch")
    p.add_argument("--measure-batch", type=int, default=2, help="batch of the measured points (default: 2)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/large_models"), help="output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = plan_rows(args.batch_size)
    measured = [measure(arch, args.measure_batch) for arch in ARCHS] if args.measure else []
    target = next(r for r in rows if r["arch"] == TARGET["arch"] and r["optimizer"] == TARGET["optimizer"])
    ratio = target[f"k{TARGET['k']}_ckpt_vs_e2e_ckpt"]
    summary = {"torch": torch.__version__, "device_name": device_description("cpu"), "rows": rows,
               "measured": measured, "target": {**TARGET, "ratio": ratio, "met": ratio <= TARGET["max_ratio"]},
               "wall_s": round(time.perf_counter() - t0, 1)}
    write_json(args.out / "large_models.json", summary)
    print(table(rows))
    for m in measured:
        print(f"measured: {m['arch']} stage {m['stage']} (K=4, --checkpoint, SGD) at batch {m['batch_size']}: "
              f"{m['measured'] / MB:,.1f} MB (MemTracker) against --plan's {m['predicted'] / MB:,.1f} MB = "
              f"{m['ratio']:.3f}")
    print(f"target: wide_resnet101_2, AdamW, K=4 with --checkpoint: largest stage / e2e+ckpt {ratio:.2f} "
          f"(target <= {TARGET['max_ratio']}): {'met' if ratio <= TARGET['max_ratio'] else 'MISSED'}")
    print(f"results: {args.out / 'large_models.json'}")
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))
    return summary


if __name__ == "__main__":
    main()
