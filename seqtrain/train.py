"""Training one model to convergence: a stage's block + head, or the whole network for the e2e baseline.

The loop is written out plainly: `train_one_epoch()`, `evaluate()`, `get_lr()`. Convergence is early
stopping on validation accuracy (a gain of at least `min_delta` resets `patience`), capped at
`max_epochs`; the best-validation weights are restored at the end. After every epoch a checkpoint
(model, optimizer, epoch, early-stopping state, RNG states) is published atomically, so a killed run
resumes at the epoch after the last one it finished and ends with the same weights as an uninterrupted
run (data order depends only on (seed, epoch); on CPU the arithmetic is deterministic).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from seqtrain.errors import UserError
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
    train_seconds: float  # wall time of this process's share (resumed runs count only their own)


def autocast_for(device: torch.device, bf16: bool):
    """bfloat16 autocast on CUDA when asked for; a no-op context otherwise."""
    if bf16 and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and biases: it only shrinks their scale, which BN undoes.
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)


def get_lr(cfg, step: int, steps_per_epoch: int) -> float:
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


def train_one_epoch(model, batches, optimizer, cfg, epoch: int, autocast, channels_last: bool, desc: str):
    model.train()
    steps = len(batches)
    loss_sum, correct, seen = torch.zeros(()), torch.zeros((), dtype=torch.long), 0
    for i, (x, y, _) in enumerate(bar(batches, desc)):
        lr = get_lr(cfg, epoch * steps + i, steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        loss, logits = train_step(model, x, y, optimizer, autocast)
        # Checked after the step, without a per-step host sync on GPU only when it matters: a non-finite
        # loss poisons the weights, so stop before the next checkpoint can save them.
        if not torch.isfinite(loss):
            raise Diverged(f"{desc}: the loss is {loss.item()} at epoch {epoch + 1}, step {i + 1} "
                           f"(lr {lr:.3g}); the last good checkpoint is kept: rerun with a lower --lr")
        loss_sum += loss.float().cpu() * len(y)
        correct += (logits.argmax(1) == y).sum().cpu()
        seen += len(y)
    return loss_sum.item() / max(1, seen), correct.item() / max(1, seen), lr


@torch.no_grad()
def evaluate(model, batches, autocast=contextlib.nullcontext, channels_last: bool = False):
    """Mean loss and accuracy of `model` in eval mode over `batches`."""
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for x, y, _ in batches:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        seen += len(y)
    return loss_sum / max(1, seen), correct / max(1, seen)


# --------------------------------------------------------------------------------------------------------
# To convergence


def fit(model: nn.Module, train_batches, val_batches, cfg, *, workdir: Path, identity: dict, device: torch.device,
        desc: str) -> TrainResult:
    """Train `model` until validation accuracy stops improving; leave it holding the best weights.

    `workdir` receives checkpoint.pt and metrics.jsonl. A checkpoint is resumed only when its `identity`
    (the hashes of the configuration and of the input) equals this run's.
    """
    channels_last = cfg.channels_last and device.type == "cuda"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_for(device, cfg.bf16)
    optimizer = make_optimizer(cfg, model)
    ckpt_path, metrics_path = workdir / "checkpoint.pt", workdir / "metrics.jsonl"

    start, best_acc, best_epoch, bad_epochs, best_state = 0, -1.0, 0, 0, None
    ckpt = load_torch(ckpt_path) if ckpt_path.exists() else None
    if ckpt is not None and ckpt.get("format") == CHECKPOINT_FORMAT and ckpt["identity"] == identity:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start, bad_epochs = ckpt["epoch"], ckpt["bad_epochs"]
        best_acc, best_epoch, best_state = ckpt["best_acc"], ckpt["best_epoch"], ckpt["best_model"]
        torch.set_rng_state(ckpt["rng_cpu"])
        if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
        log(f"{desc}: resuming after epoch {start} (best val acc {best_acc:.4f} at epoch {best_epoch})")
    keep_metrics(metrics_path, below_epoch=start)

    t0 = time.perf_counter()
    epoch = start
    epochs_bar = counter(desc, cfg.max_epochs, start)
    while epoch < cfg.max_epochs and bad_epochs < cfg.patience:
        e0 = time.perf_counter()
        train_batches.set_epoch(epoch)
        train_loss, train_acc, lr = train_one_epoch(model, train_batches, optimizer, cfg, epoch, autocast,
                                                    channels_last, f"{desc} epoch {epoch + 1}")
        val_loss, val_acc = evaluate(model, val_batches, autocast, channels_last)
        epoch += 1
        if val_acc >= best_acc + cfg.min_delta or best_state is None:
            best_acc, best_epoch, bad_epochs = val_acc, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        seconds = time.perf_counter() - e0
        append_metrics(metrics_path, {
            "epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "val_loss": val_loss,
            "val_acc": val_acc, "best_val_acc": best_acc, "lr": lr, "seconds": round(seconds, 3)})
        save_torch(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "identity": identity, "epoch": epoch, "model": model.state_dict(),
            "optimizer": optimizer.state_dict(), "bad_epochs": bad_epochs, "best_acc": best_acc,
            "best_epoch": best_epoch, "best_model": best_state, "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        })
        log(f"{desc} epoch {epoch:3d} | loss {train_loss:.4f} | train acc {train_acc:.4f} | "
            f"val acc {val_acc:.4f} | best {best_acc:.4f} @ {best_epoch} | lr {lr:.4g} | {seconds:.1f}s"
            + (" | converged" if bad_epochs >= cfg.patience else ""))
        epochs_bar.update(1)
    epochs_bar.close()
    assert best_state is not None, f"{desc}: no epoch was trained (--max-epochs {cfg.max_epochs})"
    model.load_state_dict(best_state)
    return TrainResult(best_acc, best_epoch, epoch, time.perf_counter() - t0)


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
        except (ValueError, KeyError):
            continue  # a line cut short by a kill
    write_bytes(path, "".join(line + "\n" for line in kept).encode())
