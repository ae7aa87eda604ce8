"""Training one model to convergence: a stage's block + head, or the whole network for the e2e baseline.

The loop is written out plainly: `train_one_epoch()`, `evaluate()`, `get_lr()`. Convergence is early
stopping on validation accuracy (a gain of at least `min_delta` resets `patience`), capped at
`max_epochs`; the best-validation weights are restored at the end. After every epoch, and after the
current step on Ctrl-C, a checkpoint (model, optimizer, epoch and step, early-stopping state, RNG states)
is published atomically, so a killed run resumes where that checkpoint stands and ends with the same
weights as an uninterrupted run (data order depends only on (seed, epoch); the learning rate is a pure
function of the step; the arithmetic is deterministic on a CPU, and on CUDA with --deterministic, which
keeps cuDNN from picking non-deterministic kernels).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqtrain import distributed
from seqtrain.config import Config
from seqtrain.contract import Identity
from seqtrain.errors import Interrupted, UserError
from seqtrain.files import load_torch, save_torch, write_bytes
from seqtrain.log import bar, counter, log

CHECKPOINT_FORMAT = 1


class Diverged(UserError):
    """The loss became inf or nan; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    best_val_acc: float
    best_epoch: int  # 1-based epoch whose weights were kept
    epochs: int  # epochs run in total, including those before a resume
    train_seconds: float  # wall time of training, every resumed part included


def autocast_for(device: torch.device, bf16: bool):
    """bfloat16 autocast on CUDA when asked for; a no-op context otherwise."""
    if bf16 and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases: it only shrinks their scale, which BN undoes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return without_cuda_query(torch.optim.AdamW(groups, lr=cfg.lr))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def without_cuda_query(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """`optimizer`, kept from asking CUDA whether a graph is being captured when its parameters are all on the
    meta device (a step that computes nothing, as --plan and the memory-balanced cut take).

    Adam, AdamW and others call `_accelerator_graph_capture_health_check()` on every step, which queries
    `torch.accelerator.current_stream()` and so creates a CUDA context on GPU 0 on any machine with a GPU:
    hundreds of MB in every process, before torchrun's ranks have chosen their GPU, and with --device cpu
    too. Nothing can be captured on the meta device, so the check has nothing to find there.
    """
    if all(p.device.type == "meta" for group in optimizer.param_groups for p in group["params"]):
        optimizer._accelerator_graph_capture_health_check = lambda: None  # this instance only; torch >= 2.6
        optimizer._cuda_graph_capture_health_check = lambda: None  # the same check in earlier torch
    return optimizer


def get_lr(cfg: Config, step: int, steps_per_epoch: int) -> float:
    """Linear warm-up over warmup_epochs, then cosine decay to zero at max_epochs."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.max_epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# --------------------------------------------------------------------------------------------------------
# One epoch


def train_step(model, x, y, optimizer, autocast=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; returns the (detached) loss and logits. The unit the memory benchmark times."""
    with autocast():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach(), logits.detach()


@dataclass
class EpochProgress:
    """Where the current epoch stands; checkpointed on Ctrl-C so the epoch resumes mid-way."""

    step: int = 0  # batches done
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    lr: float = 0.0
    loader_wait: float = 0.0  # seconds spent waiting for the next batch: what a faster loader could save


# Steps between the host's reads of the losses. A read waits for the device to finish every step queued so far;
# reading each step's loss (and its accuracy, and whether it is finite) kept a GPU idle while the host queued
# the next step. A diverged step is still found, by its own number, before any checkpoint can save its weights.
# Under torchrun the ranks read every step: that read's one collective is what carries a Ctrl-C to every rank
# before the step after it, well within the seconds torchrun waits before it kills them.
READ_EVERY = 32


def train_one_epoch(model, batches, optimizer, cfg: Config, epoch: int, progress: EpochProgress, *, autocast,
                    channels_last: bool, stop: threading.Event, desc: str, memory=None) -> bool:
    """Train over `batches` from batch `progress.step` on; False when `stop` was set and the epoch is unfinished.

    `memory` (a memory.PeakMemory) watches the tensors of the steps it asks for."""
    model.train()
    steps, device = len(batches), next(model.parameters()).device
    unread = []  # (step, lr, loss, correct, batch size) of the steps whose figures are still on the device
    read_every = 1 if distributed.active() else READ_EVERY

    def read() -> bool:
        """Add the unread steps to `progress` in one wait for the device, raising Diverged at the first
        non-finite loss; under torchrun, True when any rank was asked to stop (one collective for both)."""
        figures = torch.stack([torch.stack([loss.float(), correct.float()]) for _, _, loss, correct, _ in unread])
        figures = figures.tolist()
        bad = next(((u, loss) for u, (loss, _) in zip(unread, figures) if not math.isfinite(loss)), None)
        stop_now = stop.is_set()
        if distributed.active():  # every rank stops after the same step, or diverges
            stop_now, any_bad = (v > 0 for v in distributed.sum_all([stop_now, bad is not None], device))
            if any_bad and bad is None:
                raise Diverged(f"{desc}: the loss diverged on another rank; the last good checkpoint is kept: "
                               "rerun with a lower --lr and --rebuild")
        if bad is not None:  # the weights are poisoned: stop before a checkpoint can save them
            (i, lr, *_), loss = bad
            raise Diverged(f"{desc}: the loss is {loss} at step {i + 1} (lr {lr:.3g}); "
                           "the last good checkpoint is kept: rerun with a lower --lr and --rebuild")
        for (_, _, _, _, n), (loss, correct) in zip(unread, figures):
            progress.loss_sum += loss * n
            progress.correct += int(correct)
            progress.seen += n
        progress.step = unread[-1][0] + 1
        unread.clear()
        return stop_now

    waited = time.perf_counter()
    for i, (x, y, _) in enumerate(bar(batches, desc)):
        if i < progress.step:  # done before an interruption; the order is the same, so skip them
            waited = time.perf_counter()
            continue
        progress.loader_wait += time.perf_counter() - waited
        if stop.is_set() and not distributed.active():
            if unread:
                read()
            return False
        progress.lr = get_lr(cfg, epoch * steps + i, steps)
        for group in optimizer.param_groups:
            group["lr"] = progress.lr
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with memory.watch(model, optimizer, x, y) if memory else contextlib.nullcontext():
            loss, logits = train_step(model, x, y, optimizer, autocast)
        unread.append((i, progress.lr, loss, (logits.argmax(1) == y).sum(), len(y)))
        if (len(unread) == read_every or i + 1 == steps) and read() and distributed.active():
            return progress.step == steps  # a finished epoch is finished, even if Ctrl-C came at its last step
        waited = time.perf_counter()
    return True


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # Ctrl-C; what torchrun forwards to every rank, and `kill`


@contextlib.contextmanager
def stop_on_signal():
    """The first Ctrl-C (or SIGTERM) asks the loop to stop after its current step; a second one of the same
    kind gets the handler from before (Ctrl-C: KeyboardInterrupt at once)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield requested
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}

    def handler(signum, frame):
        requested.set()
        signal.signal(signum, previous[signum])

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield requested
    finally:
        for sig in STOP_SIGNALS:
            signal.signal(sig, previous[sig])


def position(epochs_done: int, step: int, steps: int) -> str:
    """Where training stands, in the words both the interrupt and the resume line use: "after epoch 2",
    "in epoch 3 after step 1 of 11" (epochs count from 1; `step` batches of the next epoch are done)."""
    if step == 0:
        return f"after epoch {epochs_done}" if epochs_done else "before its first step"
    return f"in epoch {epochs_done + 1} after step {step} of {steps}"


@torch.no_grad()
def evaluate(model, batches, autocast=contextlib.nullcontext, channels_last: bool = False):
    """Mean loss and accuracy of `model` in eval mode over `batches`."""
    model.eval()
    sums, seen = [], 0  # each batch's loss sum and correct count, read from the device once at the end
    for x, y, _ in batches:
        if not len(y):  # under torchrun, a rank's share of a short last batch can be empty
            continue
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        sums.append(torch.stack([F.cross_entropy(logits.float(), y, reduction="sum"),
                                 (logits.argmax(1) == y).sum().float()]))
        seen += len(y)
    loss_sum, correct = 0.0, 0
    for batch_loss, batch_correct in torch.stack(sums).tolist() if sums else []:
        loss_sum += batch_loss
        correct += int(batch_correct)
    # Under torchrun each rank scored its own share: the sums make every rank's verdict the same.
    loss_sum, correct, seen = distributed.sum_all([loss_sum, correct, seen], next(model.parameters()).device)
    return loss_sum / max(1, seen), correct / max(1, seen)


# --------------------------------------------------------------------------------------------------------
# To convergence


@dataclass
class EarlyStopping:
    """Where convergence stands: with the model, optimizer, epoch progress and RNG it is the whole checkpoint."""

    epoch: int = 0  # epochs finished
    bad_epochs: int = 0  # epochs since the last gain of --min-delta
    best_acc: float = -1.0
    best_epoch: int = 0
    best_model: dict | None = None  # the best epoch's state dict
    seconds: float = 0.0  # training wall time of every part so far, those before an interruption included

    def update(self, val_acc: float, model: nn.Module, min_delta: float) -> None:
        """Count a finished epoch: keep its weights when validation gained at least `min_delta`."""
        self.epoch += 1
        if val_acc >= self.best_acc + min_delta or self.best_model is None:
            self.best_acc, self.best_epoch, self.bad_epochs = val_acc, self.epoch, 0
            self.best_model = copy.deepcopy(model.state_dict())
        else:
            self.bad_epochs += 1

    def done(self, cfg: Config) -> bool:
        return self.epoch >= cfg.max_epochs or self.bad_epochs >= cfg.patience


class Checkpointer:
    """checkpoint.pt of one training run: resumed only when its identity equals this run's; rank 0 writes it."""

    def __init__(self, path: Path, identity: Identity, cfg: Config, device: torch.device):
        self.path, self.identity, self.cfg, self.device = path, identity, cfg, device

    def restore(self, model: nn.Module, optimizer) -> tuple[EarlyStopping, EpochProgress] | None:
        """Load model, optimizer and RNG states from a matching checkpoint; its early-stopping state and epoch
        progress, or None when there is no checkpoint of this run."""
        ckpt = read_checkpoint(self.path)
        if ckpt is None or ckpt.get("format") != CHECKPOINT_FORMAT or not self.matches(ckpt.get("identity")):
            return None
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state = EarlyStopping(**{f.name: ckpt[f.name] for f in dataclasses.fields(EarlyStopping) if f.name in ckpt})
        # the epoch's seconds count again from the resume, so its waits do too (older checkpoints have none)
        progress = dataclasses.replace(EpochProgress(**ckpt["progress"]), loader_wait=0.0)
        if not distributed.is_main():  # the saved partial sums are rank 0's; the epoch's totals are summed
            progress = dataclasses.replace(progress, loss_sum=0.0, correct=0, seen=0)
        torch.set_rng_state(ckpt["rng_cpu"])
        if self.device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], self.device)
        return state, progress

    def matches(self, saved) -> bool:
        try:
            return Identity.from_dict(saved) == self.identity
        except (ValueError, TypeError, AttributeError):
            return False

    def save(self, model: nn.Module, optimizer, state: EarlyStopping, progress: EpochProgress) -> None:
        if not distributed.is_main():
            return
        save_torch(self.path, {
            "format": CHECKPOINT_FORMAT, "identity": self.identity.to_dict(), "config": self.cfg.to_dict(),
            # the fields as they are: asdict would deep-copy the best epoch's state dict at every checkpoint
            **{f.name: getattr(state, f.name) for f in dataclasses.fields(state)},
            "progress": dataclasses.asdict(progress), "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        })


def fit(model: nn.Module, train_batches, val_batches, cfg: Config, *, workdir: Path, identity: Identity,
        device: torch.device, desc: str, memory=None) -> TrainResult:
    """Train `model` until validation accuracy stops improving; leave it holding the best weights.

    `workdir` receives checkpoint.pt and metrics.jsonl. A checkpoint is resumed only when its `identity`
    (the hashes of the configuration and of the input) equals this run's. Ctrl-C finishes the current step,
    checkpoints, and raises Interrupted. `memory` (a memory.PeakMemory) watches the first training steps.
    """
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_for(device, cfg.bf16)
    optimizer = make_optimizer(cfg, model)
    # Under torchrun, DDP averages gradients across ranks; evaluation and checkpoints use the module itself.
    trained = model
    if distributed.active():
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda"
                                                            else None)
    checkpointer = Checkpointer(workdir / "checkpoint.pt", identity, cfg, device)
    metrics_path = workdir / "metrics.jsonl"
    restored = checkpointer.restore(model, optimizer)
    state, progress = restored or (EarlyStopping(), EpochProgress())
    if restored:
        best = (f"best val acc {state.best_acc:.4f} at epoch {state.best_epoch}" if state.best_epoch
                else "no epoch finished yet")
        log(f"{desc}: resuming {position(state.epoch, progress.step, len(train_batches))} ({best})")
    main = distributed.is_main()  # only rank 0 writes files
    if main:
        keep_metrics(metrics_path, below_epoch=state.epoch)

    def save(since: float) -> None:
        state.seconds += time.perf_counter() - since
        checkpointer.save(model, optimizer, state, progress)

    epochs_bar = counter(desc, cfg.max_epochs, state.epoch)
    with stop_on_signal() as stop:
        while not state.done(cfg):
            e0 = time.perf_counter()
            epoch = state.epoch
            train_batches.set_epoch(epoch)
            finished = train_one_epoch(trained, train_batches, optimizer, cfg, epoch, progress, autocast=autocast,
                                       channels_last=channels_last, stop=stop, desc=f"{desc} epoch {epoch + 1}",
                                       memory=memory)
            if not finished:
                save(since=e0)
                raise Interrupted(f"{desc}: interrupted {position(epoch, progress.step, len(train_batches))}; "
                                  "progress is saved: rerun the same command to resume")
            v0 = time.perf_counter()
            val_loss, val_acc = evaluate(model, val_batches, autocast, channels_last)
            val_seconds = time.perf_counter() - v0
            state.update(val_acc, model, cfg.min_delta)
            seconds = time.perf_counter() - e0
            loss_sum, correct, seen = distributed.sum_all([progress.loss_sum, progress.correct, progress.seen], device)
            train_loss, train_acc = loss_sum / seen, correct / seen
            lr, loader_wait, progress = progress.lr, progress.loader_wait, EpochProgress()
            if main:
                append_metrics(metrics_path, {
                    "epoch": state.epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
                    "val_acc": val_acc, "best_val_acc": state.best_acc, "lr": lr, "seconds": round(seconds, 3),
                    # where the epoch's time went, beside the steps themselves; to the microsecond, as a tiny
                    # validation split on a fast machine takes well under a millisecond
                    "loader_wait_seconds": round(loader_wait, 6), "val_seconds": round(val_seconds, 6)})
            save(since=e0)
            log(f"{desc} epoch {state.epoch:3d} | loss {train_loss:.4f} | train acc {train_acc:.4f} | "
                f"val acc {val_acc:.4f} | best {state.best_acc:.4f} @ {state.best_epoch} | "
                f"lr {lr:.4g} | {seconds:.1f}s"
                + (" | converged" if state.bad_epochs >= cfg.patience else ""))
            epochs_bar.update(1)
            if distributed.any_rank(stop.is_set(), device):
                raise Interrupted(f"{desc}: interrupted after epoch {state.epoch}; progress is saved: rerun the "
                                  "same command to resume")
    epochs_bar.close()
    assert state.best_model is not None, f"{desc}: no epoch was trained (--max-epochs {cfg.max_epochs})"
    model.load_state_dict(state.best_model)
    distributed.broadcast_module(model)
    return TrainResult(state.best_acc, state.best_epoch, state.epoch, state.seconds)


def read_checkpoint(path: Path) -> dict | None:
    """The stage's checkpoint, None when there is none; a UserError naming it when it cannot be read."""
    if not path.exists():
        return None
    try:
        ckpt = load_torch(path)
    except Exception:  # torn or altered: torch.load raises any of several types
        ckpt = None
    if not isinstance(ckpt, dict):
        raise UserError(f"{path} is damaged: delete it to train this stage from its start")
    return ckpt


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def keep_metrics(path: Path, below_epoch: int) -> None:
    """Drop metric lines of epochs a resumed run will redo (written after the last checkpoint)."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            if json.loads(line)["epoch"] <= below_epoch:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill (or damaged: --verify names it)
    write_bytes(path, "".join(line + "\n" for line in kept).encode())
