"""The memory benchmark's report: a table, a verdict and plots from what benchmarks/memory.py measured.

    python -m benchmarks.memory_report OUT     # redraw OUT/memory.png, OUT/budget.png and reprint the tables

It reads the JSON files the measurement wrote (OUT/memory.json, OUT/budget.json) and never measures, so a
figure can be redrawn without running anything again. The verdict holds the few ratios that answer the
benchmark's question, each against its target or its alternative; every other figure is in the JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from benchmarks.common import figure, save_figure
except ImportError:  # python benchmarks/memory.py: this folder is on sys.path, the repository root is not
    from common import figure, save_figure
from seqtrain.files import read_json
from seqtrain.report import MB, aligned

CONTENDED = 0.25  # a share of CPU wait (PSI) above which timings are flagged as unreliable
# The --budget-mb sweep's targets: seqtrain trains 4x deeper than e2e in the same memory, and --stages auto
# keeps the largest stage's peak within 10% across depths (docs/memory.md, "Deeper than end to end fits").
DEPTH_RATIO_TARGET, SPREAD_TARGET = 4, 0.10
CHECKPOINT_DEPTH_TARGET = 10  # seqtrain's deepest within the budget / end to end with checkpointing's deepest


def tensor_source(device: str) -> str:
    return "the CUDA allocator" if device == "cuda" else "MemTracker"


def tensor_label(device: str) -> str:
    return f"tensor peak, {tensor_source(device)} (MB)"


def peak_of(row: dict) -> int:
    """The figure the ratios compare: the tensor-level peak (CUDA allocator; on CPU, MemTracker's live tensors)."""
    return row["tensor"]["peak"]


def predicted(p: dict, name: str) -> tuple[int | None, int | None]:
    """plan.py's (predicted tensor peak, cache bytes) for a row; None where the row has no such figure."""
    kind, _, k = name.partition(" ")
    if kind == "e2e":
        return p["e2e"]["train_bytes"], None
    if kind in ("stage", "ram"):
        return p["stages"][int(k)]["train_bytes"], None
    if kind == "cache":
        return None, p["stages"][int(k)]["cache_bytes"]
    if kind == "ckpt" and "e2e_checkpoint" in p:  # plans saved before it counted e2e+ckpt have none
        return p["e2e_checkpoint"]["train_bytes"], None
    return None, None


def columns(lines: list[list[str]]) -> str:
    """Left-aligned columns, the last one free: a verdict reads as sentences, not as numbers to compare."""
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]) - 1)]
    return "\n".join("  ".join([*(c.ljust(w) for c, w in zip(line, widths)), line[-1]]).rstrip() for line in lines)


def contended(row: dict) -> bool:
    return row["cpu_wait"] is not None and row["cpu_wait"] > CONTENDED


# --------------------------------------------------------------------------------------------------------
# Every stage: OUT/memory.json


def table(rows: dict[str, dict], p: dict, device: str) -> str:
    """A row per configuration: its peak against e2e's and plan.py's, its resident set, speed and cache on disk.
    The RAM-fed twins (ram k) are left to the verdict: their peak holds a whole split, only their speed counts."""
    fmt = lambda n: "-" if n is None else f"{n / MB:,.1f}"  # noqa: E731
    cuda = device == "cuda"
    out = [["config", "tensor MB", "x e2e", "plan.py MB", *(["reserved MB"] if cuda else []), "RSS MB", "step ms",
            "samples/s", "cache MB"]]
    order = ["e2e", "e2e+ckpt", *(f"{kind} {k}" for k in range(len(p["stages"])) for kind in ("stage", "cache"))]
    for name in filter(rows.__contains__, order):
        row = rows[name]
        out.append([name, fmt(peak_of(row)), f"{peak_of(row) / peak_of(rows['e2e']):.2f}", fmt(predicted(p, name)[0]),
                    *([fmt(row["peak"]["cuda_reserved"])] if cuda else []), fmt(row["peak"]["rss"]),
                    f"{row['step_ms']:.1f}{'*' if contended(row) else ''}", f"{row['samples_per_s']:,.0f}",
                    fmt(row.get("cache_bytes"))])
    notes = [f"tensor MB: the peak of live tensors ({tensor_source(device)}), which every ratio compares; "
             "plan.py MB: --plan's prediction",
             "RSS MB: the process above its imports; cache k: stage k's caching pass, cache MB its features on disk"]
    if any(contended(rows[name]) for name in order if name in rows):
        notes.append(f"*: tasks waited for a CPU during over {CONTENDED:.0%} of the timed steps: an unreliable time")
    return "\n".join([aligned(out), *notes])


def against(t: dict) -> str:
    """A target's verdict: met, MISSED, or not measured where it needs a flag that was not given."""
    if t["met"] is None:
        return f"target {t['target']}: not measured (opt in with {t['opt_in']})"
    return f"target {t['target']}: {'met' if t['met'] else 'MISSED'}"


def verdict(r: dict, targets: dict) -> str:
    """The ratios that answer "what does sequential training save, and is plan.py right", each against its
    target or its alternative; the others (rss_peak_ratio, floor_only_ratio, ...) are in the JSON."""
    stage = r["largest_stage"]
    slowest = min(r["loader_efficiency_by_stage"].items(), key=lambda kv: kv[1])[0]
    lines = [["verdict", "value", "measured as", "against"],
             ["peak_ratio", f"{r['peak_ratio']:.2f}x", f"largest sequential peak ({r['largest_sequential']}) / e2e's",
              f"e2e+ckpt: {r['ckpt_ratio']:.2f}x at {r['ckpt_time_ratio']:.2f}x e2e's step time; plan.py "
              f"predicted {r['analytic_peak_ratio']:.2f}x"],
             ["floor_ratio", f"{r['floor_ratio']:.2f}", f"{stage}'s tensor peak / plan.py's prediction",
              against(targets["floor_ratio"])],
             ["loader_efficiency", f"{r['loader_efficiency']:.2f}", f"cache / RAM samples/s, slowest stage ({slowest})",
              against(targets["loader_efficiency"])],
             ["rss_floor_ratio", f"{r['rss_floor_ratio']:.2f}", f"{stage}'s RSS / (its tensors + input)",
              against(targets["rss_floor_ratio"])]]
    return columns(lines)


def plot_stages(rows: dict[str, dict], K: int, device: str, path: Path, title: str) -> None:
    peak = lambda name: peak_of(rows[name]) / MB  # noqa: E731
    fig, ax = figure()
    # The references first: the legend lists lines in the order drawn, and bars after them.
    ax.axhline(peak("e2e"), color="C3", label="end to end")
    ax.axhline(peak("e2e+ckpt"), color="C3", ls="--", label="end to end\n+ checkpointing")
    ax.scatter([k - 0.2 for k in range(K)], [rows[f"stage {k}"]["analytic"]["total"] / MB for k in range(K)],
               marker="_", s=600, color="k", label="stage k: analytic bytes", zorder=3)
    ax.bar([k - 0.2 for k in range(K)], [peak(f"stage {k}") for k in range(K)], 0.4, label="stage k: training")
    ax.bar([k + 0.2 for k in range(K)], [peak(f"cache {k}") for k in range(K)], 0.4, label="stage k: caching pass")
    ax.set_xticks(range(K), [f"stage {k}" for k in range(K)])
    save_figure(fig, ax, path, title, tensor_label(device))


def stages_title(s: dict) -> str:
    c = s["config"]
    blocks = ",".join(map(str, c["stages"]))
    return (f"{c['arch']} (width {c['width'] or 'standard'}) in {len(c['stages'])} stages of {blocks} blocks, "
            f"batch {c['batch_size']}\n{s['device_name']}, torch {s['torch']}")


# --------------------------------------------------------------------------------------------------------
# Deeper than memory allows: OUT/budget.json


def budget_table(points: list[dict], budget: int) -> str:
    def mb_or_oom(v) -> str:
        return "OOM" if v is None else f"{v / MB:,.1f}"

    def largest(pt: dict, name: str) -> str:  # at a sampled depth, the largest of the stages measured
        sampled = pt.get(f"{name}sampled")
        return mb_or_oom(pt[f"{name}largest_stage_peak"]) + (f" ({len(sampled['stages'])} measured)" if sampled else "")

    rows = [["depth", "e2e MB", "e2e+ckpt MB", "stages", "largest stage MB", "all fit", "stages +ckpt",
             "largest +ckpt MB", "all fit +ckpt"]]
    for pt in points:
        plan = " (plan)" if pt.get("e2e_predicted") else ""
        e2e = "OOM" if pt["e2e_oom"] else f"{pt['e2e_peak'] / MB:,.1f}{plan}"
        ckpt = mb_or_oom(pt["e2e_checkpoint_peak"]) + plan if "e2e_checkpoint_peak" in pt else "-"

        staged = [str(len(pt["checkpoint_stages"])), largest(pt, "checkpoint_"),
                  "yes" if pt["checkpoint_fits"] else "NO"] if "checkpoint_stages" in pt else ["-"] * 3
        rows.append([str(pt["depth"]), e2e, ckpt, str(len(pt["stages"])), largest(pt, ""),
                     "yes" if pt["fits"] else "NO", *staged])
    note = ""
    if any(pt.get("e2e_predicted") for pt in points):
        note = ("; (plan): predicted by --plan, not measured; N measured: at that depth the stages --plan predicts "
                "to be the largest and evenly spaced others, trained on random features of their input's shape")
    return aligned(rows) + f"\n(budget {budget / MB:,.0f} MB; every figure a tensor peak{note})"


def budget_verdict(s: dict) -> str:
    """How much deeper seqtrain trains within the budget, and how evenly --stages auto fills it."""
    lines = [["verdict", "value", "measured as", "against"]]
    if s["depth_ratio"]:
        met = "met" if s["depth_ratio"] >= DEPTH_RATIO_TARGET else "MISSED"
        lines.append(["depth_ratio", f"{s['depth_ratio']:.1f}x",
                      f"deepest within {s['budget_mb']} MB: seqtrain's {s['seqtrain_depth']} ({s['seqtrain_stages']} "
                      f"stages, peak {s['seqtrain_max_stage_mb']} MB) / e2e's {s['e2e_max_depth']}",
                      f"target >= {DEPTH_RATIO_TARGET}: {met}"])
    else:
        lines.append(["depth_ratio", "-", f"end to end fits no depth measured within {s['budget_mb']} MB; seqtrain: "
                      f"{s['seqtrain_depth'] or 'none either'}", f"target >= {DEPTH_RATIO_TARGET}: not measured"])
    if s.get("e2e_checkpoint_max_depth") is not None:
        best = max(s["seqtrain_depth"] or 0, s.get("seqtrain_checkpoint_max_depth") or 0)
        ratio = best / s["e2e_checkpoint_max_depth"]
        lines.append(["vs e2e+ckpt", f"{ratio:.1f}x",
                      f"deepest within {s['budget_mb']} MB: seqtrain's {best} (with or without --checkpoint) / "
                      f"e2e+ckpt's {s['e2e_checkpoint_max_depth']}",
                      f"target >= {CHECKPOINT_DEPTH_TARGET}: {'met' if ratio >= CHECKPOINT_DEPTH_TARGET else 'MISSED'}"
                      + (" (the deepest measured: measure deeper with --depths)" if best == max(s["depths"]) else "")])
    if s["multi_stage_spread"] is not None:
        met = "met" if s["multi_stage_spread"] <= SPREAD_TARGET else "MISSED"
        lines.append(["multi_stage_spread", f"{s['multi_stage_spread']:.1%}",
                      "largest stage's peak across the depths cut into 2+ stages, max / min - 1",
                      f"target <= {SPREAD_TARGET:.0%}: {met}"])
    return columns(lines)


def plot_budget(points: list[dict], budget_mb: int, device: str, path: Path, title: str) -> None:
    depths = [pt["depth"] for pt in points]
    fig, ax = figure()
    measured = [(pt["depth"], pt["e2e_peak"] / MB) for pt in points if pt["e2e_peak"] is not None]
    ax.plot(*zip(*measured), "o-", color="C3", label="end to end")
    predicted = [(pt["depth"], pt["e2e_peak"] / MB) for pt in points if pt.get("e2e_predicted")]
    if predicted:  # drawn again, hollow: these were predicted by --plan, not measured
        ax.plot(*zip(*predicted), "o", mfc="none", ms=11, color="k", label="predicted by --plan\n(not measured)")
    ckpt = [(pt["depth"], pt["e2e_checkpoint_peak"] / MB) for pt in points if pt.get("e2e_checkpoint_peak")]
    if ckpt:  # results measured before the checkpointed curves existed have none
        ax.plot(*zip(*ckpt), "s--", color="C1", label="end to end,\ncheckpointed")
    staged = [(pt["depth"], pt["largest_stage_peak"] / MB) for pt in points if pt["largest_stage_peak"] is not None]
    ax.plot(*zip(*staged), "o-", color="C0", label="seqtrain, largest stage\n(--stages auto)")
    staged_ckpt = [(pt["depth"], pt["checkpoint_largest_stage_peak"] / MB) for pt in points
                   if pt.get("checkpoint_largest_stage_peak")]
    if staged_ckpt:
        ax.plot(*zip(*staged_ckpt), "s--", color="C2", label="seqtrain --checkpoint,\nlargest stage")
    ax.axhline(budget_mb, color="k", ls="--", label=f"budget {budget_mb} MB")
    ax.set_xlabel("depth (CIFAR ResNet, 6n+2)")
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()  # the log axis's own ticks would crowd the depths' labels
    save_figure(fig, ax, path, title, tensor_label(device))


def budget_title(s: dict) -> str:
    c = s["config"]
    return (f"CIFAR ResNets, width {c['width'] or 16}, batch {c['batch_size']}, budget {s['budget_mb']} MB\n"
            f"{s['device_name']}, torch {s['torch']}")


# --------------------------------------------------------------------------------------------------------
# Both


def report(out: Path) -> None:
    """Reprint the tables and verdicts and redraw the plots of every benchmark result in `out`."""
    found = False
    if (out / "memory.json").exists():
        found = True
        saved = read_json(out / "memory.json")
        s, rows, p = saved["summary"], saved["rows"], saved["plan"]
        print(stages_title(s).replace("\n", "; "), table(rows, p, s["device"]), "", verdict(s, s["targets"]), sep="\n")
        if s["max_cpu_wait"] is not None and s["max_cpu_wait"] > CONTENDED:
            print(f"WARNING: tasks waited for a CPU during up to {s['max_cpu_wait']:.0%} of a configuration's "
                  "timed steps: other jobs were running, so step times and the time ratios are unreliable")
        plot_stages(rows, len(p["stages"]), s["device"], out / "memory.png", stages_title(s))
        print(wrote(out, "memory"))
    if (out / "budget.json").exists():
        found = True
        saved = read_json(out / "budget.json")
        s, points = saved["summary"], saved["points"]
        print(budget_title(s).replace("\n", "; "), budget_table(points, s["budget_mb"] * MB), "", budget_verdict(s),
              sep="\n")
        plot_budget(points, s["budget_mb"], s["device"], out / "budget.png", budget_title(s))
        print(wrote(out, "budget"))
    if not found:
        sys.exit(f"benchmarks/memory_report.py: no memory.json or budget.json in {out}; run benchmarks/memory.py")


def wrote(out: Path, name: str) -> str:
    return (f"\nresults: {out / name}.json (every figure); plot: {out / name}.png; redraw: "
            f"python -m benchmarks.memory_report {out}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.memory_report OUT")
    report(Path(sys.argv[1]))
