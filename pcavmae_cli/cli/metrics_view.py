"""How metric values read on the console: rates in percent, ranks and d' as numbers."""

from __future__ import annotations

import math

from rich.table import Table

RATE_KEYS = ("mAP", "mAUC", "top1", "top5", "mean_class_accuracy", "ap", "auc", "accuracy")


def is_rate(name: str) -> bool:
    """mAP, AUC, accuracies and R@k are fractions in [0, 1], shown in percent."""
    base = name.rsplit("_", 1)[-1] if name.startswith(("a2v_", "v2a_")) else name
    return name in RATE_KEYS or (base.startswith("r") and base[1:].isdigit())


def format_metric(name: str, value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if is_rate(name):
        return f"{100 * value:.2f} %"
    return f"{value:.4f}"


def metrics_table(title: str, metrics: dict) -> Table:
    table = Table(title=title, show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_metric(name, value))
    return table


def per_class_table(rows, label_mode: str, *, head: int = 10, tail: int = 5) -> Table:
    """The per-class rows (already sorted best first): the first ``head`` and last ``tail``."""
    cols = ["ap", "auc"] if label_mode == "multi_hot" else ["accuracy"]
    table = Table(title="per class (best first)", show_header=True, header_style="bold")
    for name in ("rank", "class", "clips", *cols):
        table.add_column(name, justify="left" if name == "class" else "right")
    picked = list(enumerate(rows, 1))
    if len(picked) > head + tail:
        picked = picked[:head] + [None] + picked[-tail:]
    for item in picked:
        if item is None:
            table.add_row("...", "...", "", *("" for _ in cols))
            continue
        rank, row = item
        table.add_row(str(rank), row.name, str(row.positives), *(format_metric(c, getattr(row, c)) for c in cols))
    return table
