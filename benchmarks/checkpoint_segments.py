"""Would checkpointing in segments be a stronger baseline? End to end's tensor peak, CIFAR ResNets, with every
block checkpointed (seqtrain's `--stage e2e --checkpoint`) against checkpointing segments of several blocks.

    python benchmarks/checkpoint_segments.py [--depths 56,110] [--image-size 16] [--segment-blocks 2,3,4,6]
    # the study preset's 16x16 at batch 128; --image-size 32 for the default preset

Checkpointing each block keeps every block's input and recomputes one block at a time. A segment of s
consecutive blocks keeps only its first block's input but recomputes, and holds the insides of, s blocks at
once. Here the n blocks (the stem and the BasicBlocks) are cut into segments of s, the last one shorter when
s does not divide n, and every segment is checkpointed as seqtrain checkpoints a block (torch.utils.checkpoint,
BatchNorm statistics updated once: recompute.checkpoint_module). torch.utils.checkpoint.checkpoint_sequential
differs in two ways a user should know: it takes a number of segments, of n // k blocks each, and runs the
blocks left over as a last segment without checkpointing; and its recompute updates BatchNorm's running
statistics a second time. Each figure is one SGD step's tensor peak (two steps, the first building the
optimizer state), every tensor counted by PyTorch's MemTracker on a CPU (memory.measured_steps), as the budget
study measures end to end with checkpointing. Prints a table and, last, a JSON line; writes
OUT/checkpoint_segments.json. Both presets' commands in docs/budget.md took 4 and 8 minutes on 2 CPU cores
beside other jobs (tensor counts do not depend on them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn as nn

from seqtrain.config import Config
from seqtrain.files import write_json
from seqtrain.job import resolve
from seqtrain.memory import device_description, measured_steps
from seqtrain.network import build_network
from seqtrain.recompute import blocks_of, checkpoint_module, checkpointed
from seqtrain.report import MB, aligned
from seqtrain.train import make_optimizer


def segments_of(blocks: list[nn.Module], length: int) -> list[nn.Sequential]:
    """`blocks` in consecutive segments of `length`, the last one shorter when `length` does not divide them."""
    return [nn.Sequential(*blocks[i:i + length]) for i in range(0, len(blocks), length)]


def peak_bytes(cfg: Config, segment_blocks: int) -> int:
    """End to end's training-step tensor peak, every block checkpointed (1) or every segment of `segment_blocks`."""
    torch.manual_seed(0)
    net = build_network(cfg, resolve(cfg), 3, 10)
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size)
    y = torch.randint(0, 10, (cfg.batch_size,))
    if segment_blocks == 1:
        with checkpointed(list(net.stages)):  # `--stage e2e --checkpoint`
            return measured_steps(net, make_optimizer(cfg, net), x, y).tensor_bytes
    segments = segments_of([b for stage in net.stages for b in blocks_of(stage)], segment_blocks)
    for segment in segments:
        checkpoint_module(segment)  # the whole segment recomputed at once, as a block is with --checkpoint
    net.stages = nn.ModuleList([nn.Sequential(*segments)])  # the same blocks, in the same order
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
