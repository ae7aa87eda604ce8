"""Separability probes: how linearly separable the features are at every stage boundary of a run.

    python -m seqtrain.probe --run-dir runs/default                # each complete stage's cached features
    python -m seqtrain.probe --run-dir runs/default --e2e          # the e2e baseline at the same boundaries
    python -m seqtrain.probe --run-dir runs/e2e --e2e --stages 4   # an e2e run made with --stages 1, cut in 4

Ma, Yu, Li, Wang (2020) trace the trouble of layer-wise learning at depth to shallow features that are
poorly separable. Per stage boundary, on globally average-pooled features x [n, C], this reports:

- probe test acc: multinomial logistic regression (one linear layer, softmax cross-entropy, L2 1e-4 on the
  weights) fit by full-batch L-BFGS (at most 300 iterations) on the train split, standardized with the
  train split's per-channel mean and std; its accuracy on the test split (and on train, for the gap).
- separability: J = tr(S_B) / tr(S_W) on the test split, with m_c the mean of the n_c samples of class c
  and m the overall mean: S_B = sum_c n_c (m_c - m)(m_c - m)^T / n, S_W = sum_c sum_{i in c}
  (x_i - m_c)(x_i - m_c)^T / n. Between-class over within-class scatter: 0 when the class means coincide,
  unbounded as classes shrink to points; unchanged when every feature is multiplied by one constant (or
  rotated), so stages whose features differ in scale compare.
- fisher: tr((S_W + eps I)^-1 S_B) with eps = 1e-3 tr(S_W) / C, the same ratio after whitening: also
  invariant to per-channel scale, but it grows with C on finite samples (about (classes - 1) C / n for
  features that carry no class information), so compare it across stages of equal width only.

Sequential runs are read from their caches, one shard in memory at a time (the train split is what the
next stage trained on, val is not used). With --e2e, raw train and test images go through e2e/model.pt.
Output: a table on stdout, OUT/probe.json and OUT/separability.png (OUT: RUN/probe, or RUN/e2e/probe).
"""

from __future__ import annotations

import sys
from itertools import accumulate
from pathlib import Path

import torch
import torch.nn.functional as F

from seqtrain.api import load_model
from seqtrain.batches import ImageBatches
from seqtrain.cache import read_shard
from seqtrain.config import Config
from seqtrain.contract import Manifest
from seqtrain.data import Split, load_raw
from seqtrain.distributed import resolve_device
from seqtrain.errors import Parser, UserError
from seqtrain.files import read_json, write_json
from seqtrain.job import resolve
from seqtrain.layout import StageLayout
from seqtrain.report import aligned
from seqtrain.rundir import RunDir, stage_manifest

PROBE_STEPS = 300  # L-BFGS iteration cap; it stops sooner once the loss stops changing (67 steps, tiny run)
PROBE_L2 = 1e-4  # keeps the optimum finite on separable features, too weak to cost accuracy
FISHER_RIDGE = 1e-3  # eps of the fisher index, relative to the mean within-class variance


# --------------------------------------------------------------------------------------------------------
# Pooled features


def pooled_cache(cache_dir: Path, manifest: Manifest, split: str, limit: int | None) -> tuple[torch.Tensor, ...]:
    """Features of one cached split, average-pooled to [n, C], and labels; one shard is read at a time."""
    feats, labels, n = [], [], 0
    for shard in manifest.splits[split].shards:
        if limit is not None and n >= limit:
            break
        x, y, _ = read_shard(cache_dir / shard.file)
        if x.ndim == 5:  # [n, V, C, H, W]: a train split with augmented views; probe the plain view 0
            x = x[:, 0]
        feats.append(x.mean(dim=(2, 3), dtype=torch.float32))  # [n, C, H, W] -> [n, C]
        labels.append(y)
        n += len(y)
    return torch.cat(feats)[:limit], torch.cat(labels)[:limit]


@torch.no_grad()
def pooled_network(net, split: Split, sizes: list[int], batch_size: int, device) -> list[tuple[torch.Tensor, ...]]:
    """(pooled features [n, C], labels) after each group of `sizes` blocks of a saved network, on raw images."""
    # The blocks flattened, so that any grouping can be probed; with the network's own grouping this is
    # exactly SequentialNet.stage_outputs.
    blocks = [block for stage in net.stages for block in stage]
    ends = set(accumulate(sizes))
    per_stage = [[] for _ in sizes]
    for x, _, _ in ImageBatches(split, net.mean, net.std, batch_size, device=device):
        k = 0
        for i, block in enumerate(blocks, 1):
            x = block(x)
            if i in ends:
                per_stage[k].append(x.float().mean(dim=(2, 3)).cpu())  # [B, C, H, W] -> [B, C]
                k += 1
    return [(torch.cat(p), split.y) for p in per_stage]


# --------------------------------------------------------------------------------------------------------
# Measures


def fit_probe(train: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...], num_classes: int) -> tuple[float, float]:
    """(train accuracy, test accuracy) of a multinomial logistic regression fit on the standardized train split."""
    (x_tr, y_tr), (x_te, y_te) = train, test
    mean, std = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)  # dead channels stay 0 instead of dividing by 0
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    linear = torch.nn.Linear(x_tr.shape[1], num_classes)
    torch.nn.init.zeros_(linear.weight)  # a convex problem: zero start makes the fit deterministic
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=PROBE_STEPS, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x_tr), y_tr) + PROBE_L2 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return tuple((linear(x).argmax(1) == y).float().mean().item() for x, y in ((x_tr, y_tr), (x_te, y_te)))


def separability(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(tr(S_B) / tr(S_W), tr((S_W + eps I)^-1 S_B)) of features x [n, C]; definitions in the module docstring."""
    x = x.double()  # sums of squares of many samples: float32 loses digits the ratio needs
    n, c = x.shape
    m = x.mean(0)
    s_b, s_w = torch.zeros(c, c, dtype=x.dtype), torch.zeros(c, c, dtype=x.dtype)
    for label in y.unique():
        xc = x[y == label]
        d = (xc.mean(0) - m)[:, None]  # [C, 1]
        s_b += len(xc) * d @ d.T
        r = xc - xc.mean(0)  # [n_c, C]
        s_w += r.T @ r
    s_b, s_w = s_b / n, s_w / n
    eps = FISHER_RIDGE * torch.trace(s_w) / c
    fisher = torch.trace(torch.linalg.solve(s_w + eps * torch.eye(c, dtype=x.dtype), s_b))
    return (torch.trace(s_b) / torch.trace(s_w)).item(), fisher.item()


# --------------------------------------------------------------------------------------------------------
# A run directory


def load_run_config(run: RunDir) -> Config:
    if not run.config.exists():
        raise UserError(f"{run.root} is not a seqtrain run directory (no config.json); check --run-dir, or train "
                        f"one with: python -m seqtrain.run --stage all --run-dir {run.root}")
    return Config.from_dict(read_json(run.config))


def sequential_features(cfg: Config, layout: StageLayout, run: RunDir,
                        limit: int | None) -> tuple[list, list[int]]:
    """[(train, test)] pooled features of every complete stage, in order, and the stages' block counts."""
    out, sizes, why = [], [], ""
    for k, size in enumerate(layout.sizes):
        manifest, why = stage_manifest(cfg, layout, run, k)
        if manifest is None:
            break
        out.append((pooled_cache(run.cache(k), manifest, "train", limit),
                    pooled_cache(run.cache(k), manifest, "test", None)))
        sizes.append(size)
    if not out:
        raise UserError(f"{run.root} has no complete stage to probe ({why}): run "
                        f"python -m seqtrain.run --stage all --run-dir {run.root} first")
    if why:
        print(f"probe: the first {len(out)} stages only: {why}", file=sys.stderr)
    return out, sizes


def e2e_features(cfg: Config, layout: StageLayout, run: RunDir, limit: int | None) -> tuple[list, list[int]]:
    """[(train, test)] pooled features of e2e/model.pt at cfg's stage boundaries, from the raw images."""
    path = run.e2e / "model.pt"
    if not path.exists():
        raise UserError(f"{path} does not exist: train it with python -m seqtrain.run --stage e2e --run-dir {run.root}")
    device = resolve_device(cfg.device)
    net, raw = load_model(path).to(device), load_raw(cfg)
    train = Split(raw.train.x[:limit], raw.train.y[:limit], raw.train.ids[:limit])
    sizes = list(layout.sizes)
    tr, te = (pooled_network(net, s, sizes, cfg.batch_size, device) for s in (train, raw.test))
    return list(zip(tr, te)), sizes


def probe(run: RunDir, e2e: bool, limit: int | None, stages: str | None = None) -> dict:
    """Every figure of the report: one row per stage boundary."""
    cfg = load_run_config(run)
    if stages is not None:
        if not e2e:
            raise UserError("--stages regroups an e2e network's blocks; a sequential run's boundaries are its caches: "
                            "add --e2e or drop --stages")
        cfg = Config(**{**cfg.to_dict(), "stages": stages}).validate()
    layout = resolve(cfg)  # a UserError naming --stages when it does not fit the network
    features, sizes = e2e_features(cfg, layout, run, limit) if e2e else sequential_features(cfg, layout, run, limit)
    y_test = features[0][1][1]
    num_classes = int(max(features[0][0][1].max(), y_test.max())) + 1
    rows = []
    for k, ((train, test), depth) in enumerate(zip(features, accumulate(sizes))):
        train_acc, test_acc = fit_probe(train, test, num_classes)
        sep, fisher = separability(*test)
        rows.append({"stage": k, "depth": depth, "channels": train[0].shape[1], "probe_train_acc": train_acc,
                     "probe_test_acc": test_acc, "separability": sep, "fisher": fisher})
    return {"run_dir": str(run.root), "source": "e2e" if e2e else "sequential", "arch": cfg.arch,
            "downsample": cfg.downsample, "stage_sizes": sizes, "num_classes": num_classes,
            "n_train": len(features[0][0][1]), "n_test": len(y_test),
            "chance": torch.bincount(y_test).max().item() / len(y_test), "stages": rows}


# --------------------------------------------------------------------------------------------------------
# Report


def table(result: dict) -> str:
    rows = [["stage", "depth", "channels", "probe train", "probe test", "separability", "fisher"]]
    for s in result["stages"]:
        rows.append([str(s["stage"]), str(s["depth"]), str(s["channels"]), f"{s['probe_train_acc']:.4f}",
                     f"{s['probe_test_acc']:.4f}", f"{s['separability']:.4f}", f"{s['fisher']:.3f}"])
    head = (f"probe: {result['run_dir']} ({result['source']}), {result['arch']} with {result['downsample']} "
            f"downsampling, stages {result['stage_sizes']}; {result['n_train']} train / {result['n_test']} test "
            f"samples, chance {result['chance']:.3f}")
    notes = ("depth: blocks up to the boundary; separability: tr(S_B)/tr(S_W) of pooled test features; fisher: "
             "tr((S_W + eps I)^-1 S_B)")
    return "\n".join([head, aligned(rows), notes])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    depth = [s["depth"] for s in result["stages"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(depth, [s["separability"] for s in result["stages"]], "o-", color="C0", label="tr(S_B)/tr(S_W)")
    ax.set_xlabel("depth (blocks up to the stage boundary)")
    ax.set_ylim(bottom=0)  # a ratio: its zero (no class structure) is the reference
    ax.set_ylabel("separability tr(S_B)/tr(S_W)", color="C0")
    acc = ax.twinx()
    acc.plot(depth, [s["probe_test_acc"] for s in result["stages"]], "s--", color="C1", label="linear probe")
    acc.axhline(result["chance"], ls=":", color="grey", label="chance")
    acc.set_ylim(0, 1.02)
    acc.set_ylabel("linear probe test accuracy", color="C1")
    fig.legend(loc="lower right", bbox_to_anchor=(0.88, 0.14), fontsize=8)
    ax.set_title(f"{result['arch']}, {result['downsample']} downsampling, {result['source']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m seqtrain.probe", description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True, help="a run directory of python -m seqtrain.run")
    p.add_argument("--out", type=Path, help="where probe.json and separability.png go (default: RUN/probe, "
                   "with --e2e RUN/e2e/probe)")
    p.add_argument("--e2e", action="store_true", help="probe e2e/model.pt on the raw images instead of the caches")
    p.add_argument("--stages", help="--e2e: boundaries as seqtrain's --stages (default: the run's own)")
    p.add_argument("--max-train", type=int, help="fit each probe on at most this many train samples (default: all)")
    try:
        args = p.parse_args(argv)
        if args.max_train is not None and args.max_train < 10:
            raise UserError(f"--max-train must be at least 10, got {args.max_train}")
        run = RunDir(args.run_dir)
        result = probe(run, args.e2e, args.max_train, args.stages)
        out = args.out or (run.e2e / "probe" if args.e2e else run.root / "probe")
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "probe.json", result)
        plot(result, out / "separability.png")
    except UserError as e:
        print(f"seqtrain: error: {e}", file=sys.stderr)
        return e.exit_code
    print(table(result))
    print(f"wrote {out / 'probe.json'} and {out / 'separability.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
