"""Every loss part and metric of a run's ``metrics.jsonl`` against optimiser steps.

One panel per quantity (the reconstruction parts share one, as do the epoch timings). Step
lines (``kind: "step"``) are thin lines, epoch lines are dots at the step where the epoch ended,
lines of any other kind (an evaluation, say) are squares. The x-axis is the optimiser step; the
top row also shows the epochs completed. Stage changes are dashed vertical lines; the warm-up
epochs before the first E-step are shaded. Keys this module does not know (a fine-tuning run's
metrics) get a panel of their own, so nothing logged is left out; quantities that are ``null``
on every line (a loss part the run never computed) are listed under the title instead. The
representation-health figures share a panel per quantity (audio, video, joint together); their
collapse flags are not curves (``pcav visualize health`` rings the flagged epochs).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.viz import draw

# not curves: what a line is, and a fine-tuning validation's class counts (how many classes it saw)
BOOKKEEPING = {"kind", "step", "epoch", "stage", "prototypes", "time", "metric", "val_classes",
               "val_classes_without_positives"}
FLAGS = {"health_collapsed_a", "health_collapsed_v", "health_collapsed_joint"}  # `visualize health` rings them
GROUPS = {
    "loss_r": ("loss_r", "loss_r_a", "loss_r_v"),
    "seconds": ("seconds", "estep_seconds", "eval_seconds"),
    "proto_gamma_min": ("proto_gamma_min", "proto_gamma_max"),
    "val_knn_joint": ("val_knn_joint", "val_knn_audio", "val_knn_video"),
    "val_a2v_r1": ("val_a2v_r1", "val_a2v_r5", "val_v2a_r1", "val_v2a_r5"),
    **{f"health_{f}_a": (f"health_{f}_a", f"health_{f}_v", f"health_{f}_joint") for f in ("cos", "rank", "spread")},
    "health_agree_a": ("health_agree_a", "health_agree_v"),
}
TITLES = {
    "loss_total": "total loss (the weighted sum optimised)",
    "loss_infonce": "instance InfoNCE (audio <-> video)",
    "loss_r": "reconstruction L_r (eq. 4) = audio + video",
    "loss_pje": "L_PJE, prototype contrast (eq. 1)",
    "loss_pcpe": "L_PCPE, decoder prototype contrast (eq. 3)",
    "lr": "learning rate",
    "samples_per_s": "throughput (samples / s)",
    "peak_memory_gb": "the process's peak memory (GB)",
    "num_prototypes": "prototypes per granularity",
    "proto_largest_share": "largest prototype's share of the clips",
    "proto_gamma_min": "eq. 2 concentration gamma (min, max)",
    "seconds": "epoch wall time (s)",
    "health_cos_a": "mean pairwise cosine (1: collapsed)",
    "health_rank_a": "effective rank of the clip embeddings",
    "health_spread_a": "cosine spread to the prototypes",
    "health_agree_a": "nearest prototype by one modality = joint cluster",
    "val_knn_joint": "validation: kNN on held-out clips",
    "val_a2v_r1": "validation: audio <-> video retrieval",
    "val_purity": "validation: prototype purity",
    "val_nmi": "validation: prototype NMI",
}
ORDER = ("loss_total", "loss_infonce", "loss_r", "loss_pje", "loss_pcpe", "val_knn_joint", "val_a2v_r1", "val_purity",
         "val_nmi", "lr", "samples_per_s", "peak_memory_gb", "num_prototypes", "proto_largest_share", "proto_gamma_min",
         "seconds", "health_cos_a", "health_rank_a", "health_spread_a", "health_agree_a")  # fmt: skip
KIND_STYLE = {"step": dict(lw=0.9, alpha=0.45), "epoch": dict(marker="o", ms=4, lw=1.6)}
KIND_NAMES = {"step": "per log step", "epoch": "epoch mean"}


def _values(rows: list[dict[str, Any]], key: str) -> list[list[float]]:
    """Per row, the value(s) of ``key`` as a list (lists stay lists; null -> [])."""
    out = []
    for row in rows:
        v = row.get(key)
        if isinstance(v, bool) or v is None:
            out.append([])
        elif isinstance(v, (int, float)):
            out.append([float(v)] if math.isfinite(v) else [])
        elif isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            out.append([float(x) for x in v])
        else:
            out.append([])
    return out


def plotted_keys(rows: list[dict[str, Any]]) -> tuple[list[list[str]], list[str]]:
    """Panels (each a list of keys drawn together) and the keys that are null everywhere."""
    keys: list[str] = []
    for row in rows:
        for key, value in row.items():
            numeric = isinstance(value, (int, float, list)) and not isinstance(value, bool)
            if key not in BOOKKEEPING | FLAGS and key not in keys and (numeric or value is None):
                keys.append(key)
    grouped = {k for members in GROUPS.values() for k in members}
    panels, empty = [], []
    for key in keys:
        if key in grouped and key not in GROUPS:
            continue
        members = [k for k in GROUPS.get(key, (key,)) if k in keys]
        present = [k for k in members if any(_values(rows, k))]
        empty += [k for k in members if k not in present]
        if present:
            panels.append(present)
    panels.sort(key=lambda keys: ORDER.index(keys[0]) if keys[0] in ORDER else len(ORDER))
    return panels, empty


def _x(rows: list[dict[str, Any]]) -> np.ndarray:
    if all("step" in r for r in rows):
        return np.array([float(r["step"]) for r in rows])
    return np.array([float(r.get("epoch", i)) for i, r in enumerate(rows)])


def curves_figure(rows: list[dict[str, Any]], out: str | Path, title: str = "Training curves") -> Path:
    """Draw every quantity of the metrics lines ``rows`` (as ``read_metrics`` returns them)."""
    if not rows:
        raise UserError("metrics.jsonl has no lines to plot")
    panels, empty = plotted_keys(rows)
    if not panels:
        raise UserError("metrics.jsonl has no numeric quantity to plot")
    by_step = all("step" in r for r in rows)
    kinds = list(dict.fromkeys(str(r.get("kind", "line")) for r in rows))
    epochs = [r for r in rows if r.get("kind") == "epoch"]
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    height = 3.6 * nrows + 2.0
    fig = draw.new_figure(6.0 * ncols, height)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)

    x_max = max(float(_x(rows).max()), 1.0)
    stage_starts: list[tuple[float, str]] = []
    for prev, row in zip([None, *epochs], epochs):
        if prev is None or row.get("stage") != prev.get("stage"):
            stage_starts.append((float(prev["step"]) if prev else 0.0, str(row.get("stage", ""))))
    warm = next((e for e in epochs if e.get("prototypes")), None)
    warm_end = None
    if warm is not None and epochs and not epochs[0].get("prototypes"):
        warm_end = float(epochs[epochs.index(warm) - 1]["step"])

    for i, (ax, keys) in enumerate(zip(axes, panels)):
        for c, key in enumerate(keys):
            for kind in kinds:
                sub = [r for r in rows if str(r.get("kind", "line")) == kind]
                vals = _values(sub, key)
                if not any(vals):
                    continue
                width = max(len(v) for v in vals)
                xs = _x(sub)
                for j in range(width):
                    ys = np.array([v[j] if j < len(v) else np.nan for v in vals])
                    kept = ~np.isnan(ys)  # unmeasured epochs (validation every n-th) do not break the line
                    name = key if width == 1 else f"granularity {j}" if len(keys) == 1 else f"{key} g{j}"
                    label = f"{name}, {KIND_NAMES.get(kind, kind)}" if len(kinds) > 1 else name
                    style = KIND_STYLE.get(kind, dict(marker="s", ms=4, lw=1.2))
                    ax.plot(xs[kept], ys[kept], label=label, color=f"C{(c * width + j) % 10}", **style)
        if warm_end is not None and by_step:
            ax.axvspan(0, warm_end, color="0.85", alpha=0.5, lw=0)
        for start, stage in stage_starts[1:]:
            ax.axvline(start, color="0.3", ls="--", lw=1)
            if i < ncols:
                ax.text(start, 1.0, f" {stage}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ax.set_title(TITLES.get(keys[0], keys[0]), pad=22 if (i < ncols and epochs and by_step) else 6)
        ax.set_xlim(0, x_max * 1.02)
        ax.set_xlabel("optimiser step" if by_step else "epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if i < ncols and epochs and by_step:
            ends = [0.0] + [float(e["step"]) for e in epochs]
            done = list(range(len(ends)))
            if len(set(ends)) == len(ends):
                top = ax.secondary_xaxis("top", functions=(lambda s: np.interp(s, ends, done),
                                                           lambda e: np.interp(e, done, ends)))  # fmt: skip
                top.set_xlabel("epochs completed", fontsize=8)
                top.tick_params(labelsize=8)
    for ax in axes[len(panels):]:
        ax.axis("off")
    subtitle = []
    if warm_end is not None:
        subtitle.append("shaded: warm-up epochs without prototypes")
    if len(stage_starts) > 1:
        subtitle.append("dashed: a new stage starts")
    if empty:
        subtitle.append("not computed in this run: " + ", ".join(empty))
    fig.suptitle(title + ("\n" + "; ".join(subtitle) if subtitle else ""))
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 1.9 / height, bottom=0.6 / height, hspace=0.55, wspace=0.25)
    return draw.save(fig, out)


def curves_for_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """``RUN/metrics.jsonl`` -> ``RUN/plots/curves.png`` (or ``out``)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}")
    rows = read_metrics(path)
    base = path.parent
    out = Path(out) if out is not None else base / "plots" / "curves.png"
    return curves_figure(rows, out, title=f"Training curves of {base.name} ({len(rows)} lines of metrics.jsonl)")
