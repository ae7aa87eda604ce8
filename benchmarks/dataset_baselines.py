"""Baselines on the embedded synthetic dataset: how hard is it for a linear model and for a small CNN?

Run from the repository root (about 2 minutes on 2 idle CPU cores at the defaults shown, more if shared):

    .venv/bin/python benchmarks/dataset_baselines.py --n-train 10000 --n-test 2000 --seed 0 --epochs 15

It generates the train split with `seed` and the test split with `seed + 1_000_003`, normalises both with
the train split's per-channel mean and std, and trains
  (a) a linear classifier on the 3072 raw pixels,
  (b) a linear classifier on the 3 per-channel means (globally pooled pixels),
  (c) a small CNN end to end (3 conv layers with BN/ReLU/max-pool, global average pool, linear head).
For (a) and (b) it tries several weight decays and keeps the best test accuracy, so the linear numbers
are an upper bound for that model class. It prints a table, and as its last line a JSON summary with the
accuracies, sizes, seed, torch version, wall times, and the time to generate 60,000 and 12,000 images.
The design targets: CNN 80-95% test accuracy, linear on raw pixels at most 35%, pooled near 10%.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from seqtrain.synthetic import NUM_CLASSES, generate  # noqa: E402

TEST_SEED_OFFSET = 1_000_003


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum(
            (model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item()
            for i in range(0, len(x), batch)
        )
    return correct / len(x)


def fit(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, wd: float, batch: int
) -> None:
    """AdamW with a cosine-annealed learning rate, cross-entropy, reshuffled every epoch."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x))
        for i in range(0, len(x), batch):
            idx = perm[i : i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        assert torch.isfinite(loss), f"non-finite loss {loss.item()}"


def linear_baseline(xtr, ytr, xte, yte, seed: int, epochs: int = 40) -> tuple[float, float, float]:
    """Best test accuracy (and its train accuracy and weight decay) of nn.Linear over a weight-decay sweep."""
    best = (0.0, 0.0, 0.0)
    for wd in (0.0, 1e-3, 1e-2, 1e-1):
        torch.manual_seed(seed)
        model = nn.Linear(xtr.shape[1], NUM_CLASSES)
        fit(model, xtr, ytr, epochs=epochs, lr=1e-3, wd=wd, batch=256)
        te = accuracy(model, xte, yte)
        if te > best[0]:
            best = (te, accuracy(model, xtr, ytr), wd)
    return best


def conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
    )


def small_cnn() -> nn.Module:
    # 32x32 -> 16 -> 8 -> 4, then global average pool: about 95k parameters.
    return nn.Sequential(
        conv_bn(3, 32),
        conv_bn(32, 64),
        conv_bn(64, 128),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(128, NUM_CLASSES),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=10_000, help="training images (10000: the target setting)")
    p.add_argument("--n-test", type=int, default=2_000, help="test images (2000 gives +-1% std. error)")
    p.add_argument("--seed", type=int, default=0, help="data seed (test uses seed+1000003) and torch seed")
    p.add_argument("--epochs", type=int, default=15, help="CNN epochs (15 is the target setting)")
    args = p.parse_args()
    torch.manual_seed(args.seed)

    t0 = time.perf_counter()
    generate(60_000, args.seed)
    gen60k_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    xtr, ytr = generate(args.n_train, args.seed)
    xte, yte = generate(args.n_test, args.seed + TEST_SEED_OFFSET)
    gen_splits_s = time.perf_counter() - t0

    xtr, xte = torch.from_numpy(xtr).float(), torch.from_numpy(xte).float()
    mean, std = xtr.mean((0, 2, 3), keepdim=True), xtr.std((0, 2, 3), keepdim=True)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std  # N, 3, 32, 32
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)

    rows, times = [], {}
    t0 = time.perf_counter()
    te, tr, wd = linear_baseline(xtr.flatten(1), ytr, xte.flatten(1), yte, args.seed)
    times["linear_raw_s"] = time.perf_counter() - t0
    rows.append(("linear, raw pixels", 3072 * NUM_CLASSES + NUM_CLASSES, tr, te, f"best wd={wd:g}"))
    acc = {"linear_raw": te}

    t0 = time.perf_counter()
    te, tr, wd = linear_baseline(xtr.mean((2, 3)), ytr, xte.mean((2, 3)), yte, args.seed)
    times["linear_pooled_s"] = time.perf_counter() - t0
    rows.append(("linear, pooled pixels", 3 * NUM_CLASSES + NUM_CLASSES, tr, te, f"best wd={wd:g}"))
    acc["linear_pooled"] = te

    torch.manual_seed(args.seed)
    cnn = small_cnn()
    n_params = sum(q.numel() for q in cnn.parameters())
    t0 = time.perf_counter()
    fit(cnn, xtr, ytr, epochs=args.epochs, lr=3e-3, wd=5e-4, batch=128)
    times["cnn_s"] = time.perf_counter() - t0
    tr, te = accuracy(cnn, xtr, ytr), accuracy(cnn, xte, yte)
    rows.append(("small CNN, 3 conv", n_params, tr, te, f"{args.epochs} epochs"))
    acc["cnn"] = te

    print(f"{'model':<24}{'params':>9}{'train acc':>11}{'test acc':>10}  note")
    for name, n, tr, te, note in rows:
        print(f"{name:<24}{n:>9,}{tr:>11.2%}{te:>10.2%}  {note}")
    t0 = time.perf_counter()
    generate(12_000, args.seed)
    gen12k_s = time.perf_counter() - t0
    print(f"generate: 60,000 images in {gen60k_s:.2f} s, 12,000 in {gen12k_s:.2f} s")
    print(
        json.dumps(
            {
                "acc": {k: round(v, 4) for k, v in acc.items()},
                "n_train": args.n_train,
                "n_test": args.n_test,
                "epochs": args.epochs,
                "cnn_params": n_params,
                "seed": args.seed,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "gen_60k_s": round(gen60k_s, 3),
                "gen_12k_s": round(gen12k_s, 3),
                "gen_splits_s": round(gen_splits_s, 3),
                **{k: round(v, 1) for k, v in times.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
