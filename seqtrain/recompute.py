"""Activation checkpointing (`--checkpoint`): keep only each block's input for backward and recompute the
block's inside then, without changing the math.

`torch.utils.checkpoint` re-runs a block's forward during backward. Two things would make that differ from
plain back-propagation, and both are handled here:
  - BatchNorm in training mode updates its running statistics on every forward, so a naive recompute
    updates them twice per step. The recompute runs exactly as the first forward (the same ops, so that
    torch can check it saved the same tensors), and every BatchNorm buffer of the block is put back as it
    was before it (running mean and variance, `num_batches_tracked`).
  - Random ops (dropout) must draw the same numbers again: torch.utils.checkpoint restores the RNG state
    (`preserve_rng_state`, its default), on the CPU and on the block's CUDA device.
So a stage, or e2e, trained with and without checkpointing reaches the same weights and buffers
(tests/test_checkpoint.py checks it bit for bit on a CPU); only memory and time differ.

Blocks are a stage's top-level children that hold weights (a stage of seqtrain's own network: its blocks; a
torchvision or `seqtrain.split` stage: its named children; e2e: every stage's), where a plain nn.Sequential of
composite modules (torchvision's layer1) counts as those modules, each a block. Wrapping is done on the
modules' forward, not by new parent modules, so state-dict keys, weight hashes and saved files stay those of
the unwrapped network.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from seqtrain.memory import SavedTensorBytes, storage_key

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@contextlib.contextmanager
def frozen_statistics(module: nn.Module):
    """Whatever the BatchNorm layers of `module` do to their buffers inside, they hold what they held before."""
    buffers = [b for m in module.modules() if isinstance(m, BATCH_NORMS) for b in m.buffers()]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, before in zip(buffers, saved):
                b.copy_(before)


def checkpoint_module(module: nn.Module) -> bool:
    """Make `module` keep only its input for backward, recomputing its forward there; False when it already has
    a forward of its own instance (wrapped before, or the caller's), which is then left alone."""
    if "forward" in vars(module):
        return False
    plain = module.forward

    def forward(*args, **kwargs):
        if not (torch.is_grad_enabled() and module.training):
            return plain(*args, **kwargs)  # evaluation and caching keep nothing for backward anyway

        def contexts():
            return contextlib.nullcontext(), frozen_statistics(module)  # (first forward, recompute)

        return checkpoint(plain, *args, use_reentrant=False, context_fn=contexts, **kwargs)

    module.forward = forward
    return True


def is_chain_of_blocks(module: nn.Module) -> bool:
    """A plain nn.Sequential of composite modules, such as torchvision's layer1 (or the run of it a stage
    holds): its forward is theirs in turn, so each of them is a block."""
    return type(module) is nn.Sequential and len(module) > 0 and all(next(m.children(), None) is not None
                                                                   for m in module)


def children_of(stage: nn.Module) -> list[nn.Module]:
    """A stage's units in forward order: its top-level children, a chain of blocks among them opened into its
    blocks (checkpointed whole, torchvision's layer3 would recompute its 23 Bottlenecks at once and hold all
    their insides: as much as no checkpointing), or the stage itself when it has none."""
    units = []
    for child in stage.children():
        units.extend(children_of(child) if is_chain_of_blocks(child) else [child])
    return units or [stage]


def blocks_of(stage: nn.Module) -> list[nn.Module]:
    """The blocks activation checkpointing recomputes one at a time: the stage's units (children_of) that hold
    weights. A child without them (a torchvision stem's ReLU and max-pool) runs as it is: recomputing it
    saves little, and an in-place ReLU would modify the input its checkpoint keeps."""
    return [c for c in children_of(stage) if next(c.parameters(), None) is not None]


@contextlib.contextmanager
def checkpointed(stages, enabled: bool = True):
    """Every block of every stage in `stages` checkpointed inside the context (the heads are left as they
    are: small, and last), and the modules as they were after it: a caller's own modules come back plain."""
    blocks = [b for stage in stages for b in blocks_of(stage)] if enabled else []
    wrapped = [b for b in blocks if checkpoint_module(b)]
    try:
        yield
    finally:
        for block in wrapped:  # only what this context wrapped: an outer one's, or the caller's, stay
            del block.forward


# --------------------------------------------------------------------------------------------------------
# What checkpointing holds


# Gradients alive at once while a checkpointed block recomputes and back-propagates, in multiples of its
# output, beside its recomputed saved tensors. Fitted to MemTracker on CIFAR ResNets (widths 4-16, 1 to 14
# blocks a stage, SGD and AdamW, batch 32): with 3 the predicted peak of every stage measured was within
# 0.6% (one within 4.4%); with 2 it was 9-12% low, with 4 up to 19% high (tests/test_checkpoint.py).
RECOMPUTE_TRANSIENTS = 3


def recompute_extra_bytes(stages: list[nn.Module], head: nn.Module, x: torch.Tensor, transient: int) -> int:
    """Bytes a checkpointed step of `stages` and `head` holds beyond its forward's floor and the `transient`
    gradients of a plain backward, computed on "meta" tensors (no compute). Backward runs from the last unit
    (the head) to the first; a storage is freed once the first unit that kept it has back-propagated. When
    block b recomputes, its saved tensors come back with RECOMPUTE_TRANSIENTS of its output's size in
    gradients, while every storage that no unit up to b keeps is already freed: the inputs of later blocks,
    what the head and a stem's ReLU or max-pool (run as they are) saved. So: max over b of (block b's saved
    tensors, its input and weights excluded, and its gradients, less those freed storages) less `transient`,
    at least 0; 0 for stages without a block to recompute."""
    internal = {}  # unit index of each block -> what its recompute brings back
    first_keeper: dict[int, tuple[int, int]] = {}  # storage -> (index of the first unit to keep it, bytes)
    alive = []  # every graph built, so that no storage is freed and its key reused by another unit's

    def kept_by(unit: int, storages: dict[int, int]) -> None:
        for key, size in storages.items():
            first_keeper.setdefault(key, (unit, size))

    with torch.enable_grad():
        units = [(child, {id(b) for b in blocks_of(stage)}) for stage in stages for child in children_of(stage)]
        for u, (child, recomputed) in enumerate(units):
            weights = [*child.parameters(), *child.buffers()]
            if id(child) not in recomputed:  # runs as it is: it keeps what it saves until its backward
                with SavedTensorBytes(exclude=weights) as saved:
                    x = child(x)
                kept_by(u, saved.storages)
                continue
            kept_by(u, {storage_key(x): x.untyped_storage().nbytes()})  # the checkpoint keeps the block's input
            alive.append(x)
            x = x.detach().requires_grad_(True)
            with SavedTensorBytes(exclude=[*weights, x]) as saved:
                x = child(x)
            internal[u] = saved.bytes + RECOMPUTE_TRANSIENTS * x.nbytes
        alive.append(x)
        x = x.detach().requires_grad_(True)
        y = torch.zeros(len(x), dtype=torch.long, device=x.device)
        with SavedTensorBytes(exclude=[*head.parameters(), *head.buffers(), y]) as saved:
            alive.append(F.cross_entropy(head(x), y))  # the loss saves the logits' softmax, freed with the head's
        kept_by(len(units), saved.storages)
    later = {b: sum(size for u, size in first_keeper.values() if u > b) for b in internal}
    return max(0, max((internal[b] - later[b] for b in internal), default=0) - transient)
