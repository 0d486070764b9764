"""Several runs' curves in one figure (``pcav visualize curves RUN1 RUN2 ...``).

One panel per quantity that any of the runs logged, one colour per run (the legend names the
runs), epoch means only (step lines of several runs on one axis are noise) against optimiser
steps. A quantity one run never logged is simply absent from its colour in that panel, so a
PCAV-MAE run and a CAV-MAE-objective run share the total loss, InfoNCE and reconstruction
panels while the prototype losses show the PCAV-MAE run alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.curves import TITLES, _values, plotted_keys


def metrics_of(run: str | Path) -> tuple[str, list[dict]]:
    """A run folder (or its metrics.jsonl) -> its name and epoch lines."""
    path = Path(run)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run}")
    epochs = read_metrics(path, kind="epoch")
    if not epochs:
        raise UserError(f"{path} has no epoch lines yet")
    return path.parent.name, epochs


def compare_figure(runs: list[str | Path], out: str | Path) -> Path:
    """Overlay the epoch curves of ``runs`` (module docstring) into ``out``."""
    if len(runs) < 2:
        raise UserError("comparing needs at least two runs")
    named = [metrics_of(r) for r in runs]
    names = [n for n, _ in named]
    if len(set(names)) < len(names):  # two runs called 'pretrain' in different folders: say which
        names = [str(Path(r)) for r in runs]
    panels: list[str] = []
    for _, rows in named:
        for keys in plotted_keys(rows)[0]:
            for key in keys:
                if key not in panels:
                    panels.append(key)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = draw.new_figure(6.0 * ncols, 3.4 * nrows + 1.2)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).reshape(-1)
    for ax, key in zip(axes, panels):
        for c, (name, (_, rows)) in enumerate(zip(names, named)):
            vals = _values(rows, key)
            if not any(vals):
                continue
            xs = np.array([float(r["step"]) for r in rows])
            width = max(len(v) for v in vals)
            for j in range(width):
                ys = np.array([v[j] if j < len(v) else np.nan for v in vals])
                kept = ~np.isnan(ys)  # epochs without the figure (validation every n-th) do not break the line
                label = name if width == 1 else f"{name} g{j}"
                ax.plot(xs[kept], ys[kept], marker="o", ms=3, lw=1.4, color=f"C{c % 10}", alpha=1.0 if j == 0 else 0.6, label=label)
        modality = {"_a": "audio", "_v": "video", "_joint": "joint"}
        suffix = next((m for end, m in modality.items() if key.startswith("health_") and key.endswith(end)), None)
        # one key per panel here: a validation panel is named by its own key, not its group's title
        title = f"validation: {key[4:].replace('_', ' ')}" if key.startswith("val_") else TITLES.get(key, key)
        ax.set_title(title + (f" ({suffix})" if suffix else ""))
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle("Training curves (epoch means): " + " vs ".join(names))
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return draw.save(fig, out)
