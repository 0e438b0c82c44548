"""What a person reads in the terminal: metric tables, kept apart from the code that measures."""

from __future__ import annotations

from collections.abc import Sequence

from autopeft.spec import Metrics


def fmt_params(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def table(rows: Sequence[Sequence[object]], header: Sequence[str], left: Sequence[int] = (0,)) -> str:
    """Numbers right-aligned so digits line up; the columns in `left` (names, specs) left-aligned."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join(line(r).rstrip() for r in [cells[0], ["-" * w for w in widths], *cells[1:]])


def metrics_table(m: Metrics, spec_summary: str) -> str:
    rows: list[tuple[str, object]] = [("spec", spec_summary), (m.metric_name, f"{m.metric:.4f}")]
    if m.dev_metric is not None:
        rows.append((f"dev {m.metric_name}", f"{m.dev_metric:.4f}"))
    rows += [(k, f"{v:.4f}") for k, v in m.extra.items()]
    rows += [
        ("trainable params", f"{m.trainable_params:,} ({m.trainable_pct:.3f}% of {fmt_params(m.backbone_params)})"),
        ("peak memory", f"{m.peak_memory_mb:,.1f} MiB"),
        ("train", f"{m.train_seconds:.1f} s, {m.steps} steps, {m.tokens_per_s:,.0f} tokens/s"),
        ("eval", f"{m.eval_seconds:.1f} s"),
        ("final train loss", f"{m.train_loss:.4f}"),
    ]
    return table(rows, ("", "value"))
