"""Several processes training one stage together, under torchrun and DistributedDataParallel.

    torchrun --standalone --nproc-per-node 4 -m seqtrain.run --stage all      # 4 GPUs of one machine

torchrun starts one process per GPU (NCCL) or per CPU worker (gloo) and sets RANK, LOCAL_RANK and
WORLD_SIZE; a plain `python -m seqtrain.run` is a world of one and none of this is active. The division
of labour (docs/design.md, "Distributed"):

- training: every rank reads, and copies to its device, only the rows it trains on, so reading does not
  grow with the number of ranks. Cached features (loader.py): each epoch's shard order is the same on
  every rank, rank r takes the r-th of W contiguous ranges of its rows (whole shards, at most two partial
  ones), and pools, shuffles and batches them alone; every rank stops at the fewest batches any rank has.
  Raw images (batches.ImageBatches): every rank draws the same global batch order from (seed, epoch) and
  keeps rows r, r + W, ... of each batch. Either way --batch-size is the global batch, every rank takes
  the same number of steps, and DDP averages the gradients;
- evaluation: each rank scores a disjoint share (a contiguous part of a cached split, rows r::W of raw
  images' batches) and the counts are summed, so early stopping decides the same on every rank;
- checking the previous cache: each rank checksums its own shards (r, r + W, ... of the manifest's) and
  any rank's failure is every rank's error;
- caching: each rank pushes a contiguous slice of every split through the frozen block and writes its
  own shards; rank 0 writes the manifest after the others have finished;
- files: only rank 0 writes checkpoints, metrics, weights and results, and only rank 0 prints.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from seqtrain.errors import UserError

# How long a collective may wait for the other ranks. torch's defaults (NCCL 10 minutes, gloo 30) are too
# short for what one rank does while the others wait at a barrier: rank 0 alone decodes (or --download's)
# the dataset before the others read it (job.run_job). Decoding ImageNet's 1.28 million JPEGs at 224x224 took
# 5.8 ms an image on one core here (imagefolder.decode, a 500x375 JPEG): about 2 hours, a quarter of that
# or more with its threads, plus the disk. The cost of a long timeout is small: when a rank dies torchrun
# stops the others within seconds, so only a true hang waits it out.
TIMEOUT_ENV = "SEQTRAIN_DIST_TIMEOUT_MIN"
DEFAULT_TIMEOUT_MIN = 180


def launched() -> bool:
    """True in a process started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when torch sees a GPU, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def collective_timeout() -> datetime.timedelta:
    """The process group's timeout: $SEQTRAIN_DIST_TIMEOUT_MIN minutes, by default DEFAULT_TIMEOUT_MIN."""
    text = os.environ.get(TIMEOUT_ENV, "").strip() or str(DEFAULT_TIMEOUT_MIN)
    try:
        minutes = float(text)
    except ValueError:
        minutes = 0.0
    if not minutes > 0 or minutes == float("inf"):
        raise UserError(f"{TIMEOUT_ENV}={text!r} is not a number of minutes above 0; e.g. {DEFAULT_TIMEOUT_MIN}, "
                        "or unset it")
    return datetime.timedelta(minutes=minutes)


def init(device_name: str) -> torch.device:
    """This process's device; under torchrun also joins the process group (NCCL on CUDA, gloo on CPU)."""
    device_name = resolve_device(device_name).type
    if not launched():
        return torch.device(device_name)
    timeout = collective_timeout()
    if device_name == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise UserError(f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} "
                            "GPUs; use --nproc-per-node at most the GPU count")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", timeout=timeout)
        return device
    dist.init_process_group("gloo", timeout=timeout)
    return torch.device("cpu")


def shutdown() -> None:
    if active():
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def sum_all(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of `values` over the ranks (the values themselves in a world of one)."""
    if not active():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (a Ctrl-C seen by one rank stops them all at one step)."""
    if not active():
        return flag
    return sum_all([float(flag)], device)[0] > 0


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_module(module: torch.nn.Module) -> None:
    """Make every rank's parameters and buffers rank 0's: DDP keeps parameters equal, but each rank's
    BatchNorm running statistics drift from its own last batch, and the cache needs one frozen block."""
    if active():
        for t in module.state_dict().values():
            dist.broadcast(t, 0)


def contiguous_part(n: int) -> tuple[int, int]:
    """This rank's [start, end) of n ordered samples: contiguous, no sample twice, sizes differing by one."""
    r, w = rank(), world_size()
    return r * n // w, (r + 1) * n // w

