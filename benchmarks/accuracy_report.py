"""The accuracy benchmark's report: the table, the target line and the plot, from results.json.

    python -m benchmarks.accuracy_report OUT    # reprint OUT's table and redraw OUT/accuracy.png

It reads what benchmarks/accuracy.py wrote and never trains, so a figure can be redrawn at any time.
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    from benchmarks.common import panels, save_panels
except ImportError:  # python benchmarks/accuracy.py: this folder is on sys.path, the repository root is not
    from common import panels, save_panels
from seqtrain.files import read_json
from seqtrain.report import aligned


def table(rows: list[dict], device: str, one_process: bool) -> str:
    pm = lambda ms, scale=1, d=4: f"{ms[0] * scale:.{d}f} ± {ms[1] * scale:.{d}f}"  # noqa: E731
    varied = any(r["intensity"] != "usual" for r in rows)
    out = [["arch", "blocks", "downsample", *(["intensity"] if varied else []), "K", "method", "seeds", "test acc",
            "gap (points)", "peak MB", "mem ratio", "analytic ratio", "time s"]]
    for r in rows:
        seq = r["method"] == "sequential"
        out.append([r["arch"], str(r["blocks"]), r["downsample"], *([r["intensity"]] if varied else []),
                    str(r["k"] or "-"), r["method"], str(len(r["seeds"])), pm(r["test_acc"]),
                    pm(r["gap_points"], d=2) if seq else "-", f"{r['peak_mb'][0]:.0f}",
                    f"{r['mem_ratio'][0]:.3f}" if seq else "-", f"{r['analytic_ratio']:.3f}" if seq else "-",
                    f"{r['seconds']:.0f}"])
    source = "the CUDA allocator's" if device == "cuda" else "live tensors (MemTracker) over each stage's first steps"
    memory = f"peak MB: tensor-level peak, {source}; mem ratio: sequential / e2e"
    if one_process:
        memory += ("; --one-process: every stage of a point ran in one process, so a stage's peak includes what "
                   "earlier stages left resident (the analytic ratio does not depend on it)")
    return "\n".join([aligned(out), "test acc, gap: mean ± std over seeds; gap: sequential - e2e, same seed"
                      + (" and intensity (e2e of the same K-stage network where the intensity is not usual)"
                         if varied else "")
                      + "; peak MB, mem ratio: means; largest stage / e2e; time s: training and caching, all seeds",
                      memory])


def target_line(t: dict) -> str:
    if not t["measured"]:
        return f"target ({t['arch']}, K={t['k']}, {t['downsample'] or 'any setting'}): not measured by this sweep"
    if "gap_to_best_e2e" in t:  # the study's: against the network's best e2e, its own e2e beside
        gap = (f"test acc {t['test_acc']:.2%} against the best e2e's {t['best_e2e_acc']:.2%}: "
               f"{t['gap_to_best_e2e']:+.2f} points (>= -{t['max_gap_points']}: {'met' if t['gap_met'] else 'MISSED'}; "
               f"{t['gap_points']:+.2f} ± {t['gap_std']:.2f} to its own e2e)")
    else:
        gap = (f"gap {t['gap_points']:+.2f} ± {t['gap_std']:.2f} "
               f"points (>= -{t['max_gap_points']}: {'met' if t['gap_met'] else 'MISSED'})")
    return (f"target ({t['arch']}, K={t['k']}, {t['downsample']}, {t.get('head', 'conv')} head, {t.get('seeds', '?')} "
            f"seed(s)): {gap}, mem ratio "
            f"{t['mem_ratio']:.3f} (<= {t['max_mem_ratio']}: {'met' if t['mem_met'] else 'MISSED'}; analytic "
            f"{t['analytic_ratio']:.3f})" + ("" if t.get("mem_per_stage", True) else
                                             " [--one-process: the peaks are not per stage; see the analytic ratio]"))


def plot(rows: list[dict], archs: list[str], path: Path, title: str) -> None:
    """One panel per (downsample, intensity): test accuracy against depth, a line per K and e2e."""
    keys = list(dict.fromkeys((r["downsample"], r["intensity"]) for r in rows))
    fig, axes = panels(len(keys))
    x = {arch: i for i, arch in enumerate(archs)}
    # One colour per line across the panels, which share one legend (save_panels).
    colour = {line: f"C{i}" for i, line in enumerate(dict.fromkeys((r["method"], r["k"]) for r in rows))}
    for ax, (downsample, inten) in zip(axes, keys):
        mine = [r for r in rows if r["downsample"] == downsample and r["intensity"] == inten]
        for method, k in dict.fromkeys((r["method"], r["k"]) for r in mine):
            rs = [r for r in mine if r["method"] == method and r["k"] == k]
            name = (f"e2e (K={k} network)" if k else "e2e") if method == "e2e" else f"sequential K={k}"
            ax.errorbar([x[r["arch"]] for r in rs], [r["test_acc"][0] for r in rs], yerr=[r["test_acc"][1] for r in rs],
                        fmt="--" if method == "e2e" and not k else ("x--" if method == "e2e" else "o-"), capsize=3,
                        color="k" if method == "e2e" and not k else colour[method, k], label=name)
        blocks = {r["arch"]: r["blocks"] for r in rows}
        ax.set_xticks(list(x.values()), [f"{arch}\n({blocks.get(arch, '?')} blocks)" for arch in x])
        ax.set_title(f"{downsample} downsampling" + ("" if inten == "usual" else f", {inten}"), fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± std over seeds)")
    save_panels(fig, path, title, len(keys))


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """e2e validation accuracy against epoch, a panel per (downsample, head): has every network flattened?"""
    mine = [r for r in rows if r.get("curves")]
    keys = list(dict.fromkeys((r["downsample"], r.get("head", "conv")) for r in mine))
    fig, axes = panels(len(keys))
    colour = {arch: f"C{i}" for i, arch in enumerate(dict.fromkeys(r["arch"] for r in mine))}  # across panels
    for ax, (downsample, head) in zip(axes, keys):
        for r in (r for r in mine if (r["downsample"], r.get("head", "conv")) == (downsample, head)):
            for j, curve in enumerate(r["curves"]):
                ax.plot(range(1, len(curve) + 1), curve, ".-", color=colour[r["arch"]], alpha=0.8,
                        label=r["arch"] if j == 0 else None)
        ax.set_title(f"e2e, {downsample} downsampling, {head} head", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation accuracy (one line per seed)")
    save_panels(fig, path, title, len(keys))


def probe_table(rows: list[dict]) -> str:
    """Linear-probe test accuracy (and separability) at every stage boundary, for each row that was probed."""
    out = [["arch", "downsample", "head", "run", "seeds", "boundary (blocks): probe test acc (separability)"]]
    for r in rows:
        for name, p in sorted(r.get("probe", {}).items()):
            run = f"K={r['k']}" if r["method"] == "sequential" else f"e2e cut as K={name[1:]}"
            cells = "  ".join(f"{d}: {a:.1%} ({sep:.2f})" for d, a, sep in
                              zip(p["depth"], p["probe_test_acc"], p["separability"]))
            out.append([r["arch"], r["downsample"], r.get("head", "conv"), run, str(p["seeds"]), cells])
    return aligned(out) if len(out) > 1 else ""


def plot_gaps(rows: list[dict], archs: list[str], path: Path, title: str) -> None:
    """Sequential minus e2e test accuracy against depth, a line per (K, head), a panel per downsampling."""
    seq = [r for r in rows if r["method"] == "sequential" and r["intensity"] in ("usual", "head aug")]
    keys = list(dict.fromkeys(r["downsample"] for r in seq))
    fig, axes = panels(max(1, len(keys)))
    x = {arch: i for i, arch in enumerate(archs)}
    colour = {line: f"C{i}" for i, line in enumerate(dict.fromkeys((r.get("head", "conv"), r["k"]) for r in seq))}
    for ax, downsample in zip(axes, keys):
        mine = [r for r in seq if r["downsample"] == downsample]
        for head, k in dict.fromkeys((r.get("head", "conv"), r["k"]) for r in mine):
            rs = sorted((r for r in mine if (r.get("head", "conv"), r["k"]) == (head, k)), key=lambda r: x[r["arch"]])
            # The seeds per depth name the line: a panel with fewer seeds gets an entry of its own in the legend.
            ax.errorbar([x[r["arch"]] for r in rs], [r["gap_points"][0] for r in rs],
                        yerr=[r["gap_points"][1] for r in rs], fmt="o-" if head == "conv" else "s--", capsize=3,
                        color=colour[head, k],
                        label=f"K={k}, {head} head (seeds: {'/'.join(str(len(r['seeds'])) for r in rs)})")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(list(x.values()), list(x))
        ax.set_title(f"{downsample} downsampling", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("gap to e2e, points\n(sequential - e2e, mean ± std)")  # one line was taller than the plot
    save_panels(fig, path, title, max(1, len(keys)))


def report(out: Path) -> None:
    """Reprint the table and target line of OUT/results.json and redraw OUT/accuracy.png."""
    if not (out / "results.json").exists():
        sys.exit(f"benchmarks/accuracy_report.py: no results.json in {out}; run benchmarks/accuracy.py")
    saved = read_json(out / "results.json")
    s, rows = saved["summary"], saved["rows"]
    one_process = s["config"].get("one_process", False)
    print(s.get("settings", ""))
    print(table(rows, s["device"], one_process))
    print(target_line(s["target"]))
    title = f"{s.get('settings', '')}\n{s['device_name']}, torch {s['torch']}"
    if probes := probe_table(rows):
        print(probes)
    plot(rows, s["config"]["archs"], out / "accuracy.png", title)
    if any(r["method"] == "sequential" for r in rows):
        plot_gaps(rows, s["config"]["archs"], out / "gaps.png", title)
    if any(r.get("curves") for r in rows):
        plot_curves(rows, out / "curves.png", title)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m benchmarks.accuracy_report OUT")
    report(Path(sys.argv[1]))
