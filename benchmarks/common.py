"""What the benchmarks share: their figures, the CPU-contention gauge, targets, and the plotting library check.

Imports no benchmark and nothing heavy; matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import importlib.util
import sys
import textwrap
import time
from pathlib import Path


def require_plotting(script: str) -> None:
    """Stop before measuring, not after, when the plots cannot be drawn."""
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit(f"{script}: matplotlib draws this benchmark's plots and is not installed; "
                 'install it with: pip install -e ".[bench]"')


def target(name: str, value: float, targets: dict[str, tuple[str, float]]) -> dict:
    """A measured value against its target: {"value", "target" ("<= 1.15"), "met"}."""
    op, bound = targets[name]
    return {"value": value, "target": f"{op} {bound}", "met": value <= bound if op == "<=" else value >= bound}


def figure():
    """A new matplotlib figure and axes, drawn to files only (the Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(8.5, 4))  # wide enough for the legend beside the axes (save_figure)


def panels(n: int):
    """A figure of `n` side-by-side panels sharing their y axis: (figure, list of axes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2), squeeze=False, sharey=True)
    return fig, list(axes[0])


def save_panels(fig, path: Path, title: str, n: int) -> None:
    """Save a panels() figure under `title`, wrapped rather than clipped when it is long, with one legend for
    every panel below them all, where it covers no data (issue 26: inside, it hid points)."""
    import matplotlib.pyplot as plt

    fig.suptitle("\n".join(textwrap.fill(line, 60 * n) for line in title.splitlines()), fontsize=9)
    fig.tight_layout()
    labelled = {}  # label -> handle, across the panels: a label seen in two panels is one entry
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    if labelled:
        fig.legend(labelled.values(), labelled.keys(), loc="upper center", bbox_to_anchor=(0.5, 0),
                   ncol=min(len(labelled), 2 * n), fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": the legend and every label inside the file
    plt.close(fig)


def save_figure(fig, ax, path: Path, title: str, ylabel: str) -> None:
    """Save a figure() with its legend right of the axes, where no data can be: inside, the memory plot's
    legend covered the end-to-end line (issue 26). bbox_inches="tight" keeps every label inside the file."""
    import matplotlib.pyplot as plt

    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


class CpuWait:
    """The share of a block's wall time during which some task waited for a CPU (Linux PSI; None elsewhere).
    Near 0 on an idle machine; other jobs push it up, and with them OpenMP stalls that make step times
    meaningless (measured here: a 10 ms step took 2.8 s while another benchmark ran)."""

    @staticmethod
    def total_us() -> int | None:
        try:
            with open("/proc/pressure/cpu") as f:
                return int(f.readline().rsplit("total=", 1)[1])  # "some avg10=.. avg60=.. avg300=.. total=US"
        except (OSError, IndexError, ValueError):
            return None

    def __enter__(self) -> CpuWait:
        self.share: float | None = None
        self.w0, self.t0 = self.total_us(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        w1 = self.total_us()
        if self.w0 is not None and w1 is not None:
            self.share = (w1 - self.w0) / 1e6 / (time.perf_counter() - self.t0)
