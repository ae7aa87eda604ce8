"""Would checkpointing in segments be a stronger baseline? End to end's tensor peak, CIFAR ResNets, with every
block checkpointed (seqtrain's `--stage e2e --checkpoint`) against `torch.utils.checkpoint.checkpoint_sequential`
over segments of several blocks.

    python benchmarks/checkpoint_segments.py [--depths 56,110] [--image-size 16] [--segment-blocks 2,3,4,6]
    # the study preset's 16x16 at batch 128; --image-size 32 for the default preset. ~1 min a depth, 2 CPU cores

Checkpointing each block keeps every block's input and recomputes one block at a time. A segment of s blocks
keeps only its first block's input but recomputes, and holds the insides of, s blocks at once. Segments of s
are checkpoint_sequential with n // s segments over the n blocks: each s blocks long or a little longer, and
the last one, with the blocks left over, not checkpointed (it runs as it is, its backward coming first). Which of the
two needs less depends on how much a block holds inside against its input. Each figure is one SGD step's
tensor peak (two steps, the first building the optimizer state), every tensor counted by PyTorch's MemTracker
on a CPU (memory.measured_steps), as the budget study measures end to end with checkpointing. Prints a
table and, last, a JSON line; writes OUT/checkpoint_segments.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint_sequential

from seqtrain.config import Config
from seqtrain.files import write_json
from seqtrain.job import resolve
from seqtrain.memory import device_description, measured_steps
from seqtrain.network import build_network
from seqtrain.recompute import blocks_of, checkpointed
from seqtrain.report import MB, aligned
from seqtrain.train import make_optimizer


class Segmented(nn.Module):
    """`blocks` in order, checkpointed `segments` at a time by torch.utils.checkpoint.checkpoint_sequential
    while training (a user's one line); evaluation runs them as they are."""

    def __init__(self, blocks: list[nn.Module], segments: int):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.segments = segments

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and self.training):
            return self.blocks(x)
        return checkpoint_sequential(self.blocks, self.segments, x, use_reentrant=False)


def peak_bytes(cfg: Config, segment_blocks: int) -> int:
    """End to end's training-step tensor peak, every block checkpointed (1) or in segments of `segment_blocks`."""
    torch.manual_seed(0)
    net = build_network(cfg, resolve(cfg), 3, 10)
    blocks = [b for stage in net.stages for b in blocks_of(stage)]
    if segment_blocks > 1:
        # checkpoint_sequential cuts n blocks into segments of n // segments and runs the rest as its last
        # segment: n // s segments make every checkpointed segment s blocks long, or a little longer.
        net.stages = nn.ModuleList([Segmented(blocks, max(1, len(blocks) // segment_blocks))])
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    y = torch.randint(0, 10, (cfg.batch_size,))
    with checkpointed(list(net.stages), segment_blocks == 1):
        return measured_steps(net, make_optimizer(cfg, net), x, y).tensor_bytes


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="56,110", help="CIFAR ResNet depths (6n+2), comma-separated")
    p.add_argument("--image-size", type=int, default=16, help="16: the study preset; 32: the default preset")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=0, help="first block's channels, 0 = standard (16)")
    p.add_argument("--segment-blocks", default="2,3,4,6", help="blocks per segment, comma-separated")
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/checkpoint_segments"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # memory, not speed: one thread keeps the CPU free for other work
    lengths = [int(s) for s in args.segment_blocks.split(",")]
    rows = []
    for depth in (int(d) for d in args.depths.split(",")):
        cfg = Config(arch=f"resnet{depth}", width=args.width, stages="1", batch_size=args.batch_size,
                     image_size=args.image_size, device="cpu").validate()
        per_block = peak_bytes(cfg, 1)
        segments = {s: peak_bytes(cfg, s) for s in lengths}
        best = min(segments, key=segments.get)
        rows.append({"depth": depth, "per_block": per_block, "segments": segments, "best_segment_blocks": best,
                     "best_ratio": segments[best] / per_block})
        print(f"  ResNet-{depth}: every block {per_block / MB:,.1f} MB, segments of {best} blocks "
              f"{segments[best] / MB:,.1f} MB", flush=True)
    lines = [["network", "every block, MB", *(f"segments of {s}, MB" for s in lengths), "best / every block"]]
    for r in rows:
        lines.append([f"ResNet-{r['depth']}", f"{r['per_block'] / MB:,.1f}",
                      *(f"{r['segments'][s] / MB:,.1f}" for s in lengths), f"{r['best_ratio']:.3f}"])
    print(aligned(lines))
    summary = {"benchmark": "checkpoint-segments", "torch": torch.__version__, "device": "cpu",
               "device_name": device_description("cpu"), "image_size": args.image_size,
               "batch_size": args.batch_size, "width": args.width, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "checkpoint_segments.json", summary)
    print(f"results: {args.out / 'checkpoint_segments.json'}")
    print(json.dumps({**{k: v for k, v in summary.items() if k != "rows"},
                      "best_ratio": {r["depth"]: round(r["best_ratio"], 3) for r in rows}}))
    return summary


if __name__ == "__main__":
    main()
