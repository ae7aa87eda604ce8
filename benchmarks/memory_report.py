"""The memory benchmark's report: tables, ratio lines and plots from what benchmarks/memory.py measured.

    python -m benchmarks.memory_report OUT     # redraw OUT/memory.png, OUT/budget.png and reprint the tables

It reads the JSON files the measurement wrote (OUT/memory.json, OUT/budget.json) and never measures, so a
figure can be redrawn without running anything again.
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


def tensor_label(device: str) -> str:
    return "tensor peak, " + ("CUDA allocator (MB)" if device == "cuda" else "MemTracker (MB)")


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
    return None, None  # e2e+ckpt: plan.py does not model recomputation


def table(rows: dict[str, dict], p: dict, device: str) -> str:
    fmt = lambda n: "-" if n is None else f"{n / MB:,.1f}"  # noqa: E731
    head = ["config", "tensor MB", *(["reserved MB"] if device == "cuda" else []), "RSS MB"]
    out = [head + ["analytic MB", "predicted peak MB", "step ms", "samples/s", "cpu wait", "cache MB", "predicted MB"]]
    order = ["e2e", "e2e+ckpt", *(f"{kind} {k}" for k in range(len(p["stages"])) for kind in ("stage", "ram", "cache"))]
    for name in filter(rows.__contains__, order):
        row, (pred, pred_cache) = rows[name], predicted(p, name)
        peaks = [row["tensor"]["peak"], *([row["peak"]["cuda_reserved"]] if device == "cuda" else [])]
        analytic = row["analytic"]["total"] if row["analytic"] else None
        wait = "-" if row["cpu_wait"] is None else f"{row['cpu_wait']:.0%}"
        out.append([name, *map(fmt, peaks), fmt(row["peak"]["rss"]), fmt(analytic), fmt(pred),
                    f"{row['step_ms']:.1f}", f"{row['samples_per_s']:,.0f}", wait, fmt(row.get("cache_bytes")),
                    fmt(pred_cache)])
    return aligned(out)


def ratio_lines(r: dict, targets: dict) -> str:
    mark = lambda name: f"  target {targets[name]['target']}: {'met' if targets[name]['met'] else 'MISSED'}"  # noqa: E731
    by_stage = ", ".join(f"{k}: {v:.2f}" for k, v in r["loader_efficiency_by_stage"].items())
    lines = [
        f"peak_ratio         {r['peak_ratio']:.3f}  {r['largest_sequential']} peak / e2e peak "
        f"(analytic, plan.py: {r['analytic_peak_ratio']:.3f}; one block per stage: {r['finest_analytic_ratio']:.3f})",
        f"ckpt_ratio         {r['ckpt_ratio']:.3f}  e2e+ckpt peak / e2e peak",
        f"ckpt_time_ratio    {r['ckpt_time_ratio']:.3f}  e2e+ckpt step time / e2e step time",
        f"floor_ratio        {r['floor_ratio']:.3f}  {r['largest_stage']} tensor peak / its predicted peak (plan.py: "
        f"analytic floor + backward's transients; {r['floor_only_ratio']:.3f} against the floor alone)"
        + mark("floor_ratio"),
        f"rss_peak_ratio     {r['rss_peak_ratio']:.3f}  {r['rss_largest_sequential']} RSS peak / e2e RSS peak (the "
        "process: torch's libraries, the data and the allocator's cache included)",
        f"rss_floor_ratio    {r['rss_floor_ratio']:.3f}  {r['largest_stage']} RSS peak above imports / (analytic "
        "bytes + its input's host memory)" + mark("rss_floor_ratio"),
        f"loader_efficiency  {r['loader_efficiency']:.3f}  lowest of cache/RAM samples/s by stage ({by_stage})"
        + mark("loader_efficiency"),
    ]
    if r["max_cpu_wait"] is not None and r["max_cpu_wait"] > CONTENDED:
        lines.append(f"WARNING: tasks waited for a CPU during up to {r['max_cpu_wait']:.0%} of a configuration's "
                     "timed steps: other jobs were running, so step times and the time ratios are unreliable")
    return "\n".join(lines)


def plot_stages(rows: dict[str, dict], K: int, device: str, path: Path, title: str) -> None:
    peak = lambda name: peak_of(rows[name]) / MB  # noqa: E731
    fig, ax = figure()
    ax.bar([k - 0.2 for k in range(K)], [peak(f"stage {k}") for k in range(K)], 0.4, label="stage k: training")
    ax.bar([k + 0.2 for k in range(K)], [peak(f"cache {k}") for k in range(K)], 0.4, label="stage k: caching pass")
    ax.scatter([k - 0.2 for k in range(K)], [rows[f"stage {k}"]["analytic"]["total"] / MB for k in range(K)],
               marker="_", s=600, color="k", label="stage k: analytic bytes")
    ax.axhline(peak("e2e"), color="C3", label="end to end")
    ax.axhline(peak("e2e+ckpt"), color="C3", ls="--", label="end to end + checkpointing")
    ax.set_xticks(range(K), [f"stage {k}" for k in range(K)])
    save_figure(fig, ax, path, title, tensor_label(device))


def budget_table(points: list[dict], budget: int) -> str:
    rows = [["depth", "e2e MB", "e2e fits", "stages", "blocks per stage", "largest stage MB", "all stages fit"]]
    for pt in points:
        e2e = "OOM" if pt["e2e_oom"] else f"{pt['e2e_peak'] / MB:,.1f}"
        rows.append([str(pt["depth"]), e2e, "yes" if pt["e2e_peak"] and pt["e2e_peak"] <= budget else "no",
                     str(len(pt["stages"])), ",".join(map(str, pt["stages"])),
                     "OOM" if pt["largest_stage_peak"] is None else f"{pt['largest_stage_peak'] / MB:,.1f}",
                     "yes" if pt["fits"] else "NO"])
    return aligned(rows)


def budget_lines(s: dict) -> str:
    lines = [f"budget {s['budget_mb']} MB: end to end fits up to depth {s['e2e_max_depth'] or '(none measured)'}; "
             f"seqtrain trains depth {s['seqtrain_depth']} in {s['seqtrain_stages']} stages, every training and "
             f"caching peak at most {s['seqtrain_max_stage_mb']} MB"]
    if s["depth_ratio"]:
        met = "met" if s["depth_ratio"] >= 4 else "MISSED"
        lines.append(f"depth ratio {s['depth_ratio']:.1f}x (target >= 4: {met})")
    if s["multi_stage_spread"] is not None:
        met = "met" if s["multi_stage_spread"] <= 0.10 else "MISSED"
        lines.append(f"largest stage's peak across the depths cut into 2+ stages: spread "
                     f"{s['multi_stage_spread']:.1%} (target <= 10%: {met})")
    return "\n".join(lines)


def plot_budget(points: list[dict], budget_mb: int, device: str, path: Path, title: str) -> None:
    depths = [pt["depth"] for pt in points]
    fig, ax = figure()
    measured = [(pt["depth"], pt["e2e_peak"] / MB) for pt in points if pt["e2e_peak"] is not None]
    ax.plot(*zip(*measured), "o-", color="C3", label="end to end")
    staged = [(pt["depth"], pt["largest_stage_peak"] / MB) for pt in points if pt["largest_stage_peak"] is not None]
    ax.plot(*zip(*staged), "o-", color="C0", label="seqtrain, largest stage (--stages auto)")
    ax.axhline(budget_mb, color="k", ls="--", label=f"budget {budget_mb} MB")
    ax.set_xlabel("depth (CIFAR ResNet, 6n+2)")
    ax.set_xscale("log")
    ax.set_xticks(depths, [str(d) for d in depths])
    save_figure(fig, ax, path, title, tensor_label(device))


def report(out: Path) -> None:
    """Reprint the tables and redraw the plots of every benchmark result in `out`."""
    found = False
    if (out / "memory.json").exists():
        found = True
        saved = read_json(out / "memory.json")
        s, rows, p = saved["summary"], saved["rows"], saved["plan"]
        print(table(rows, p, s["device"]))
        print(ratio_lines(s, s["targets"]))
        plot_stages(rows, len(p["stages"]), s["device"], out / "memory.png", stages_title(s))
    if (out / "budget.json").exists():
        found = True
        saved = read_json(out / "budget.json")
        s, points = saved["summary"], saved["points"]
        print(budget_table(points, s["budget_mb"] * MB))
        print(budget_lines(s))
        plot_budget(points, s["budget_mb"], s["device"], out / "budget.png", budget_title(s))
    if not found:
        sys.exit(f"benchmarks/memory_report.py: no memory.json or budget.json in {out}; run benchmarks/memory.py")


def stages_title(s: dict) -> str:
    c = s["config"]
    return (f"{c['arch']} (width {c['width'] or 'standard'}) in {len(c['stages'])} stages, batch {c['batch_size']}\n"
            f"{s['device_name']}, torch {s['torch']}")


def budget_title(s: dict) -> str:
    c = s["config"]
    return (f"CIFAR ResNets, width {c['width'] or 16}, batch {c['batch_size']}, budget {s['budget_mb']} MB\n"
            f"{s['device_name']}, torch {s['torch']}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.memory_report OUT")
    report(Path(sys.argv[1]))
