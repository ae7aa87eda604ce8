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


def summary_table(results: dict) -> str:
    """The run's table: per stage and e2e, accuracy, epochs, tensor-level peak memory (the figure to compare:
    the CUDA allocator's, or on CPU MemTracker's live tensors), the process's RSS beside it, cache and time."""
    rows = [["stage", "val acc", "test acc", "epochs", "tensor MB", "RSS MB", "cache MB", "time s"]]
    for s in results["stages"]:
        rows.append([str(s["stage"]), f"{s['val_acc']:.4f}", f"{s['test_acc']:.4f}",
                     f"{s['epochs']} (best {s['best_epoch']})", f"{s['peak_tensor_mb']:.1f}", f"{s['peak_rss_mb']:.0f}",
                     f"{s['cache_mb']:.1f}", f"{s['train_seconds'] + s['cache_seconds']:.1f}"])
    baselines = [(name, results.get(key)) for name, key in (("e2e", "e2e"), ("e2e+ckpt", "e2e_checkpoint"))]
    for name, base in baselines:
        if base:
            rows.append([name, f"{base['val_acc']:.4f}", f"{base['test_acc']:.4f}",
                         f"{base['epochs']} (best {base['best_epoch']})", f"{base['peak_tensor_mb']:.1f}",
                         f"{base['peak_rss_mb']:.0f}", "-", f"{base['train_seconds']:.1f}"])
    lines = [aligned(rows)]
    final = results.get("final")
    if final:
        lines.append(f"final network: test acc {final['test_acc']:.4f} on raw images "
                     f"({final['cached_path_test_acc']:.4f} through the cached features)")
    lines.append("tensor MB: peak of live tensors, training or caching (CUDA allocator; on CPU MemTracker over\n"
                 "  the first steps); RSS MB: the whole process's resident set, torch and the data included")
    if results["stages"]:
        k, peak = max(((s["stage"], s["peak_tensor_mb"]) for s in results["stages"]), key=lambda t: t[1])
        e2e = results.get("e2e")
        if e2e and e2e["peak_tensor_mb"]:
            lines.append(f"largest stage / e2e (tensor peak): stage {k} {peak:.1f} MB / {e2e['peak_tensor_mb']:.1f} MB "
                         f"= {peak / e2e['peak_tensor_mb']:.2f}x")
        else:
            lines.append(f"largest stage (tensor peak): stage {k} {peak:.1f} MB")
    versus = results.get("versus") or {}
    for name, key in (("e2e", "e2e"), ("e2e+ckpt", "e2e_checkpoint")):
        if key in versus:
            lines.append(f"final vs {name}: {versus_text(versus[key])}")
    missing = [flag for name, flag in (("e2e", "--stage e2e"), ("e2e_checkpoint", "--stage e2e --checkpoint"))
               if not results.get(name)]
    if results["stages"] and str(results.get("arch", "")).startswith("custom:"):
        if not (results.get("e2e") or results.get("e2e_checkpoint")):
            lines.append("compare with end-to-end training: seqtrain.train_stages(stages, ..., e2e=True)")
    elif results["stages"] and missing:
        lines.append("compare with end-to-end training: run " + " and ".join(missing) + " with this --run-dir")
    return "\n".join(lines)


def versus_text(v: dict) -> str:
    """"-0.9 points, 0.40x memory, 1.16x time": accuracy, tensor peak and time against a baseline."""
    parts = [f"{v['points']:+.2f} points"]
    if v.get("memory") is not None:
        parts.append(f"{v['memory']:.2f}x memory")
    if v.get("time") is not None:
        parts.append(f"{v['time']:.2f}x time")
    return ", ".join(parts)
