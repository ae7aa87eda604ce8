"""Where to cut a network into stages: contiguous groups of blocks whose largest training memory is smallest.

    --stages K --balance memory            # K stages, the largest one's predicted memory as small as possible
    --stages auto --memory-budget 512MB    # the fewest stages that each fit 512 MB, then balanced
    --stages K --balance blocks            # K stages of (nearly) equal block counts

An even split by block count puts the full-resolution blocks together: CIFAR ResNet-110 at batch 128 in
4 stages of 14/14/14/13 blocks, stage 0 needs 0.44x of end-to-end training's tensor peak while stage 3
needs 0.11x. The cost of a stage here is the bytes one training step holds (memory.analytic_step: tensors
saved for backward, weights, gradients, optimizer state, the batch), composed from per-block figures of
one pass over the whole network on the "meta" device (no compute, about 0.1 s per 20 blocks):

    floor(i..j) = sum over blocks b in i..j of (saved_b + weights_b + grads_b + optimizer_b)
                  - what block i saves of its own input (the stage's input is the batch, counted once)
                  + the batch of block i's input + the head on block j's output
    cost(i..j)  = floor(i..j) + 2 x the largest activation of blocks i..j (backward's transient gradients),
                  or the optimizer step's peak where it is larger (its weights, gradients, state, batch and
                  twice its largest parameter: a wide stage at a small batch)

The partition minimising the largest cost is found exactly by dynamic programming (O(K n^2), n blocks).
A stage must also fit its caching pass: weights plus the largest forward of one of its blocks at the
caching batch (--batch-size x --cache-views samples), under torch.no_grad.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

from seqtrain.archs import BlockSpec, block_specs, feature_shape
from seqtrain.config import Config
from seqtrain.errors import UserError
from seqtrain.memory import TRANSIENT_ACTIVATIONS, SavedTensorBytes, storage_key, tensor_bytes
from seqtrain.meta import quick_meta
from seqtrain.models import build_block, build_head
from seqtrain.recompute import RECOMPUTE_TRANSIENTS
from seqtrain.report import MB
from seqtrain.train import make_optimizer, train_step

NUM_CLASSES = 10  # the head's classes barely matter to its bytes; plan.py counts the real head

# What the CUDA libraries allocate beside the tensors, counted by the CUDA allocator's peak but not by a plan
# on the meta device: cuBLAS's workspace is 32 MiB per stream on compute capability 9.0 (H100, H200) in
# PyTorch since 2.3 (PyTorch PR #120925, after NVIDIA's cuBLAS recommendation), 4-8 MiB before; cuDNN's
# convolution workspaces come and go within a step. The larger figure is used for every GPU, since the
# capability cannot be read without creating a CUDA context (which --plan must not do).
CUDA_WORKSPACE_BYTES = 32 * 2**20


def step_temporary_bytes(largest_param, cuda_params=None):
    """What an optimizer step holds beside the weights, gradients and state, measured with MemTracker (SGD with
    Nesterov momentum and weight decay, AdamW): torch's per-parameter implementation, the CPU's default, two
    copies of the `largest_param` (bytes) at a time. Its foreach one, CUDA's default, holds a copy of a whole
    parameter group at once: given the groups' bytes (`cuda_params`), the larger. The stage cut counts the
    per-parameter figure, so that it is the same on every machine; --plan shows a GPU's beside it."""
    per_parameter = 2 * largest_param
    if cuda_params is None:
        return per_parameter
    return max(per_parameter, max(cuda_params, default=0))


def runs_on_cuda(device: str) -> bool:
    """Whether --device `device` trains on CUDA."""
    return device == "cuda" or (device == "auto" and torch.cuda.is_available())  # is_available creates no context


def library_bytes(device: str) -> int:
    """Bytes the CUDA libraries hold beside a step's tensors on `device` (--device), 0 on a CPU."""
    return CUDA_WORKSPACE_BYTES if runs_on_cuda(device) else 0


@dataclass(frozen=True)
class BlockCosts:
    """Per-block bytes at the configured batch size, from which any stage's training bytes are composed."""

    fixed: tuple[int, ...]  # saved activations + weights + grads + optimizer state of block b
    own_input: tuple[int, ...]  # what block b saves of its input storage (0 when an earlier block saved it)
    batch_in: tuple[int, ...]  # bytes of block b's input batch (x and labels)
    head: tuple[int, ...]  # the head on block b's output, its input excluded
    head_input: tuple[int, ...]  # block b's output, when the head saves it and block b itself did not
    weights: tuple[int, ...]  # parameters and buffers of block b (the caching pass holds them)
    activation: tuple[int, ...]  # block b's output at the training batch
    forward: tuple[int, ...]  # block b's largest no-grad forward at the caching batch: input + 4 outputs
    state: tuple[int, ...]  # weights, grads and optimizer state of block b (fixed = state + what it saves)
    head_own_input: tuple[int, ...]  # block b's output when the head saves it, whoever saved it first
    head_saved: tuple[int, ...]  # everything the head on block b's output saves for backward, its input included
    largest_param: tuple[int, ...]  # block b's largest parameter (the optimizer step's temporaries scale with it)
    head_largest_param: tuple[int, ...]  # the head on block b's output: its largest parameter
    checkpoint: bool = False  # --checkpoint: every block keeps its input only and recomputes in backward

    def floor_bytes(self, i: int, j: int) -> int:
        """The analytic bytes of one training step of the stage of blocks i..j (inclusive): memory.analytic_step's
        figure, composed from the blocks' (tests check the two agree for every stage)."""
        return (sum(self.fixed[i:j + 1]) - self.own_input[i] + self.batch_in[i] + self.head[j]
                + self.head_input[j])

    def train_bytes(self, i: int, j: int) -> int:
        """The predicted tensor peak of a training step: the floor, plus the transient gradients of backward
        (an activation's gradient and its input's, both alive at once; MemTracker counts them as temporaries).
        With --checkpoint the floor holds every block's input instead of what the blocks save, and the peak
        adds what a block's recompute brings back (recompute.recompute_extra_bytes: its saved tensors, less
        the inputs of the blocks after it, already freed). The optimizer step's peak, where larger."""
        transient = TRANSIENT_ACTIVATIONS * max(self.activation[i:j + 1])
        if not self.checkpoint:
            return max(self.floor_bytes(i, j) + transient, self.step_bytes(i, j))
        held = sum(self.activation[i:j])  # the inputs of blocks i+1..j; block i's is the batch
        floor = (sum(self.state[i:j + 1]) + self.batch_in[i] + held + self.head[j] + self.head_own_input[j])
        back = max(self.recompute(b) - sum(self.activation[b:j]) for b in range(i, j + 1))
        return max(floor + transient + max(0, back - self.head_saved[j] - transient), self.step_bytes(i, j))

    def head_state(self, j: int) -> int:
        """The weights, gradients and optimizer state of the head on block j's output."""
        return self.head[j] - (self.head_saved[j] - self.head_own_input[j])

    def step_bytes(self, i: int, j: int) -> int:
        """The optimizer step's peak, once backward has freed the activations: the weights, gradients and state
        of blocks i..j and the head, the batch, and the step's temporaries (step_temporary_bytes)."""
        largest = max(*self.largest_param[i:j + 1], self.head_largest_param[j])
        return sum(self.state[i:j + 1]) + self.head_state(j) + self.batch_in[i] + step_temporary_bytes(largest)

    def recompute(self, b: int) -> int:
        """What block b's recompute brings back: what it saves for backward beyond its input, and the gradients
        of its backward (recompute.RECOMPUTE_TRANSIENTS of its output)."""
        return self.fixed[b] - self.state[b] - self.own_input[b] + RECOMPUTE_TRANSIENTS * self.activation[b]

    def caching_bytes(self, i: int, j: int) -> int:
        """Predicted bytes of the caching pass of blocks i..j: their weights and the largest block forward."""
        return sum(self.weights[i:j + 1]) + max(self.forward[i:j + 1])

    def stage_bytes(self, i: int, j: int) -> int:
        return max(self.train_bytes(i, j), self.caching_bytes(i, j))

    @functools.cache  # noqa: B019 (one per BlockCosts, which lru-caches hold anyway)
    def ending(self) -> list[np.ndarray]:
        """ending()[j][i] = stage_bytes(i, j) for every i <= j: all stages' costs, vectorised from prefix sums."""
        fixed = np.concatenate([[0], np.cumsum(self.fixed, dtype=np.int64)])
        weights = np.concatenate([[0], np.cumsum(self.weights, dtype=np.int64)])
        own, batch, forward, activation, largest_param = (np.array(v, dtype=np.int64) for v in (
            self.own_input, self.batch_in, self.forward, self.activation, self.largest_param))
        state = np.concatenate([[0], np.cumsum(self.state, dtype=np.int64)])
        acts = np.concatenate([[0], np.cumsum(activation, dtype=np.int64)])  # acts[m]: blocks 0..m-1's outputs
        back = np.array([self.recompute(b) for b in range(len(self.fixed))], dtype=np.int64)
        out = []
        for j in range(len(self.fixed)):
            largest = np.maximum.accumulate(activation[j::-1])[::-1]  # max(activation[i..j]) for each i
            transient = TRANSIENT_ACTIVATIONS * largest
            if self.checkpoint:
                train = (state[j + 1] - state[:j + 1] + batch[:j + 1] + acts[j] - acts[:j + 1] + self.head[j]
                         + self.head_own_input[j])
                worst = np.maximum.accumulate((back[:j + 1] + acts[:j + 1])[::-1])[::-1] - acts[j]
                train = train + transient + np.maximum(worst - self.head_saved[j] - transient, 0)
            else:
                train = (fixed[j + 1] - fixed[:j + 1] - own[:j + 1] + batch[:j + 1] + self.head[j]
                         + self.head_input[j] + transient)
            param = np.maximum(np.maximum.accumulate(largest_param[j::-1])[::-1], self.head_largest_param[j])
            step = state[j + 1] - state[:j + 1] + self.head_state(j) + batch[:j + 1] + step_temporary_bytes(param)
            largest_forward = np.maximum.accumulate(forward[j::-1])[::-1]
            out.append(np.maximum(np.maximum(train, step), weights[j + 1] - weights[:j + 1] + largest_forward))
        return out


# --------------------------------------------------------------------------------------------------------
# Per-block costs


def specs_of(cfg: CostSettings, in_channels: int) -> list[BlockSpec]:
    """The network's blocks with the configured downsampling (per-stage intensity applies after the cut)."""
    return block_specs(cfg.arch, cfg.width, in_channels, cfg.downsample, cfg.downsample_op)


@dataclass(frozen=True)
class CostSettings:
    """The settings a block-cost measurement can read, and nothing else: measure_block_costs sees only these, so
    a cache keyed by them cannot go stale (a setting that is to change a cost must be added here to be read)."""

    arch: str
    width: int
    downsample: str
    downsample_op: str
    batch_size: int
    cache_views: int
    checkpoint: bool
    head: str  # the heads (build_head reads these)
    head_blocks: int
    head_fraction: float
    head_convs: int
    head_width: int
    head_pool: int
    optimizer: str  # the optimizer state (make_optimizer reads these)
    lr: float
    momentum: float
    weight_decay: float

    @classmethod
    def of(cls, cfg: Config) -> CostSettings:
        return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def block_costs(cfg: Config, in_shape: tuple[int, int, int]) -> BlockCosts:
    """One training step of the whole network on the meta device, its bytes attributed to the blocks; layout
    resolution and --plan ask for the same network's, so each is measured once per process."""
    return measured_costs(CostSettings.of(cfg), tuple(in_shape))


@functools.lru_cache(maxsize=128)
def measured_costs(settings: CostSettings, in_shape: tuple[int, int, int]) -> BlockCosts:
    return measure_block_costs(settings, in_shape)


@quick_meta()
def measure_block_costs(cfg: CostSettings, in_shape: tuple[int, int, int]) -> BlockCosts:
    """BlockCosts from one step of the whole network on the meta device: each storage autograd saves is
    counted for the block that saved it first (forward pre-hooks say which block runs)."""
    batch_size, cache_views = cfg.batch_size, cfg.cache_views
    specs = specs_of(cfg, in_shape[0])
    shapes = [tuple(in_shape)] + [feature_shape(specs[:b + 1], tuple(in_shape)) for b in range(len(specs))]
    with torch.device("meta"):
        blocks = torch.nn.ModuleList(build_block(s) for s in specs)
        x = torch.empty(batch_size, *in_shape)  # B, C, H, W
        y = torch.zeros(batch_size, dtype=torch.long)
    net = torch.nn.Sequential(*blocks)
    optim = make_optimizer(cfg, net)
    weights = [*net.parameters(), *net.buffers()]

    saved = AttributedSaves(exclude=[*weights, x, y])
    inputs: list[int] = []  # storage key of each block's input, and of its output
    outputs: list[int] = []
    for b, block in enumerate(blocks):
        def enter(module, args, b=b):
            saved.current = b
            inputs.append(storage_key(args[0]))
        block.register_forward_pre_hook(enter)
        block.register_forward_hook(lambda module, args, out: outputs.append(storage_key(out)))
    with saved:  # one step; the loss is the features' mean, which saves nothing of its own
        net(x).mean().backward()
        optim.step()
    first_saver = saved.first_saver
    fixed, own_input, held, n = [], [], [], len(specs)
    largest_param = [max((p.nbytes for p in block.parameters()), default=0) for block in blocks]
    for b, block in enumerate(blocks):
        params = list(block.parameters())
        state = [v for p in params for v in optim.state.get(p, {}).values() if torch.is_tensor(v)]
        held.append(tensor_bytes([*params, *block.buffers()]) + tensor_bytes(params) + tensor_bytes(state))
        fixed.append(sum(saved.storages[k] for k, s in first_saver.items() if s == b) + held[-1])
        own = inputs[b]
        own_input.append(saved.storages[own] if first_saver.get(own) == b else 0)
    out_saved = [first_saver.get(outputs[b]) == b for b in range(n)]  # e.g. by a final ReLU, not a max-pool
    batch_in = [batch_size * int(torch.Size(shapes[b]).numel()) * 4 + y.nbytes for b in range(n)]
    # The head on block b's output: one per output shape, or per block for an aug head (it copies b+1, ...).
    heads, head_key = {}, (lambda b: b) if cfg.head == "aug" else (lambda b: shapes[b + 1])
    for b in range(n):
        if head_key(b) not in heads:
            heads[head_key(b)] = head_bytes(cfg, shapes[b + 1], specs[b + 1:])
    head = [heads[head_key(b)][0] for b in range(n)]
    head_input = [0 if out_saved[b] else heads[head_key(b)][1] for b in range(n)]
    numel = [int(torch.Size(shape).numel()) for shape in shapes]
    activation = [batch_size * 4 * numel[b + 1] for b in range(n)]
    # Under no_grad a basic block holds its input and up to four outputs' worth at once (conv, BN, shortcut,
    # sum), measured with MemTracker; V views of each sample go through together.
    views = batch_size * max(1, cache_views)
    forward = [views * 4 * (numel[b] + 4 * numel[b + 1]) for b in range(n)]
    return BlockCosts(tuple(fixed), tuple(own_input), tuple(batch_in), tuple(head), tuple(head_input),
                      tuple(tensor_bytes([*blk.parameters(), *blk.buffers()]) for blk in blocks),
                      tuple(activation), tuple(forward), tuple(held),
                      tuple(heads[head_key(b)][1] for b in range(n)), tuple(heads[head_key(b)][2] for b in range(n)),
                      tuple(largest_param), tuple(heads[head_key(b)][3] for b in range(n)), cfg.checkpoint)


class AttributedSaves(SavedTensorBytes):
    """SavedTensorBytes that also records which block first saved each storage (`current` is the running one)."""

    def __init__(self, exclude: list[torch.Tensor]):
        super().__init__(exclude)
        self.current = 0
        self.first_saver: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self.skip:
            self.first_saver.setdefault(key, self.current)
        return super().pack(t)


def head_bytes(cfg: CostSettings, shape: tuple[int, int, int], after: list[BlockSpec]) -> tuple[int, int, int, int]:
    """(the head's step bytes without its input, the bytes of its input when it saves it, everything it saves
    for backward, its largest parameter) on `shape` features; `after`: the blocks that follow (an aug head
    copies them)."""
    with torch.device("meta"):
        head = build_head(cfg, shape[0], NUM_CLASSES, after)
        x = torch.empty(cfg.batch_size, *shape, requires_grad=False)
        y = torch.zeros(cfg.batch_size, dtype=torch.long)
    optim = make_optimizer(cfg, head)
    params = list(head.parameters())
    with SavedTensorBytes(exclude=[*params, *head.buffers(), y]) as saved:
        train_step(head, x, y, optim)
    state = [v for s in optim.state.values() for v in s.values() if torch.is_tensor(v)]
    everything = saved.bytes
    own = saved.storages.pop(storage_key(x), 0)
    return (saved.bytes + tensor_bytes([*params, *head.buffers()]) + tensor_bytes(params) + tensor_bytes(state), own,
            everything, max((p.nbytes for p in params), default=0))


# --------------------------------------------------------------------------------------------------------
# Partitions


@functools.lru_cache(maxsize=64)  # --plan and the cut ask for the same partition; costs are frozen, hashable
def balanced_sizes(costs: BlockCosts, k: int) -> list[int]:
    """Block counts of the k contiguous stages whose largest stage_bytes is smallest (exact, by DP).

    best[m][j] is the smallest largest cost of cutting blocks 0..j-1 into m stages; each row is computed
    from the previous one with one vectorised pass per end block, so ResNet-1202 (601 blocks) in 50 stages
    takes a fraction of a second.
    """
    n = len(costs.fixed)
    assert 1 <= k <= n, f"{k} stages of {n} blocks"
    ending = costs.ending()
    best = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
    best[0] = 0
    cuts = np.zeros((k + 1, n + 1), dtype=np.int64)
    for m in range(1, k + 1):
        row = np.full(n + 1, np.iinfo(np.int64).max, dtype=np.int64)
        for j in range(m, n - (k - m) + 1):  # the last stage of m ends at block j-1 and starts at i in [m-1, j)
            values = np.maximum(best[m - 1:j], ending[j - 1][m - 1:j])
            i = int(np.argmin(values))
            row[j], cuts[m][j] = values[i], i + m - 1
        best = row
    sizes, j = [], n
    for m in range(k, 0, -1):
        i = int(cuts[m][j])
        sizes.append(j - i)
        j = i
    return sizes[::-1]


class BudgetTooSmall(UserError):
    """A block that does not fit --memory-budget alone; layout.py turns it into advice that is accepted."""

    def __init__(self, block: int, need: int, what: str):
        super().__init__(f"block {block} alone needs {need / MB:,.1f} MB for its {what}")
        self.block, self.need, self.what = block, need, what


def neediest_block(costs: BlockCosts) -> int:
    """The block that needs the most as a stage of its own (the first of equals)."""
    ending = costs.ending()
    return max(range(len(costs.fixed)), key=lambda b: ending[b][b])


def largest_block_bytes(costs: BlockCosts) -> int:
    """The most any one block needs as a stage of its own: no budget below it can be met."""
    b = neediest_block(costs)
    return int(costs.ending()[b][b])


def fewest_stages(costs: BlockCosts, budget: int) -> int:
    """The fewest stages each within `budget` bytes (greedy cuts are optimal for the count); BudgetTooSmall
    naming the block that needs the most alone, so that what it needs is the least budget that can be met."""
    n, ending = len(costs.fixed), costs.ending()
    b = neediest_block(costs)
    if (need := largest_block_bytes(costs)) > budget:
        what = "caching pass" if costs.caching_bytes(b, b) > costs.train_bytes(b, b) else "training step"
        raise BudgetTooSmall(b, need, what)
    stages, i = 0, 0
    while i < n:
        j = i
        while j + 1 < n and ending[j + 1][i] <= budget:
            j += 1
        stages, i = stages + 1, j + 1
    return stages
