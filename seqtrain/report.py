"""Tables and numbers for people: the one home of the formatting shared by the run summary, `--plan`,
the separability probe and the benchmarks. Imports nothing of seqtrain and no torch."""

from __future__ import annotations

MB = 2**20


def aligned(rows: list[list[str]]) -> str:
    """Right-aligned columns, the first row a header underlined."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def mb(n: int) -> str:
    """Bytes as MB with one decimal and thousands separators: 1,054.3."""
    return f"{n / MB:,.1f}"


def shape_text(shape: list[int]) -> str:
    """[16, 32, 32] as 16x32x32."""
    return "x".join(str(d) for d in shape)
