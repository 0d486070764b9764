"""``pcav visualize health RUN``: the representation health of a pre-training run, per epoch.

Four panels from the epoch lines of ``metrics.jsonl`` (``engine/evaluate/health.py`` says what
each number is): mean pairwise cosine and effective rank per modality (audio, video, joint), the
cosine spread of each modality to the prototypes and how often the audio-only / video-only nearest
prototype is the joint cluster (one line per granularity). Epochs whose figures crossed a
collapse limit are ringed in red, so that a modality that stopped carrying information stands
out at a glance; epochs before the first E-step (no prototypes) are shaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.train.metrics import read_metrics
from pcavmae_cli.engine.viz import draw

MODALITIES = (("a", "audio", "C0"), ("v", "video", "C1"), ("joint", "joint", "C2"))
STYLES = ("-", "--", ":", "-.")  # granularity 0, 1, ...


@dataclass
class HealthReport:
    path: Path
    epochs: list[int]  # the epochs with figures
    last: dict[str, Any]  # the last measured epoch line
    collapsed: dict[str, list[int]]  # modality name -> epochs flagged collapsed


def health_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The epoch lines that carry health figures (``health_cos_a`` not null)."""
    return [r for r in rows if r.get("kind") == "epoch" and r.get("health_cos_a") is not None]


def _series(rows: list[dict[str, Any]], key: str, level: int | None = None) -> np.ndarray:
    out = []
    for r in rows:
        v = r.get(key)
        if level is not None:
            v = v[level] if isinstance(v, list) and level < len(v) else None
        out.append(np.nan if v is None else float(v))
    return np.array(out)


def _levels(rows: list[dict[str, Any]], key: str) -> int:
    return max((len(r[key]) for r in rows if isinstance(r.get(key), list)), default=0)


def health_figure(rows: list[dict[str, Any]], out: str | Path, title: str = "Representation health") -> HealthReport:
    """Draw the health of the epoch lines among ``rows`` (as ``read_metrics`` returns them)."""
    measured = health_rows(rows)
    if not measured:
        raise UserError("no epoch line with representation-health figures (the recipe's 'health' was null)")
    x = np.array([float(r["epoch"]) for r in measured])
    fig = draw.new_figure(13.0, 8.6)
    (ax_cos, ax_rank), (ax_spread, ax_agree) = fig.subplots(2, 2)
    collapsed: dict[str, list[int]] = {}
    for m, name, colour in MODALITIES:
        flags = np.array([bool(r.get(f"health_collapsed_{m}")) for r in measured])
        collapsed[name] = [int(e) for e in x[flags]]
        for ax, field in ((ax_cos, "cos"), (ax_rank, "rank")):
            y = _series(measured, f"health_{field}_{m}")
            ax.plot(x, y, marker="o", ms=3, color=colour, label=name)
            if flags.any():
                ax.scatter(x[flags], y[flags], s=90, facecolors="none", edgecolors="red", linewidths=1.5,
                           label=f"{name} collapsed" if field == "cos" else None, zorder=3)  # fmt: skip
        for level in range(_levels(measured, f"health_spread_{m}")):
            ax_spread.plot(x, _series(measured, f"health_spread_{m}", level), marker="o", ms=3, color=colour,
                           ls=STYLES[level % len(STYLES)], label=f"{name}, granularity {level}")  # fmt: skip
        if m != "joint":
            for level in range(_levels(measured, f"health_agree_{m}")):
                ax_agree.plot(x, _series(measured, f"health_agree_{m}", level), marker="o", ms=3, color=colour,
                              ls=STYLES[level % len(STYLES)], label=f"{name}, granularity {level}")  # fmt: skip
    ax_cos.set_title("mean pairwise cosine of the clip embeddings (1: all alike)")
    ax_rank.set_title("effective rank (Roy & Vetterli): directions the clips use")
    ax_spread.set_title("cosine spread to the prototypes (mean of max - min; 0: blind to clusters)")
    ax_agree.set_title("nearest prototype by one modality = joint cluster")
    ax_agree.set_ylim(-0.02, 1.02)
    first = next((r for r in measured if r.get("prototypes")), None)
    for ax in (ax_cos, ax_rank, ax_spread, ax_agree):
        if first is not None and first is not measured[0]:
            ax.axvspan(x[0] - 0.5, float(first["epoch"]) - 0.5, color="0.85", alpha=0.5, lw=0)
        ax.set_xlabel("epoch (measured at its start)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        else:
            ax.text(0.5, 0.5, "no prototypes in these epochs", ha="center", va="center", transform=ax.transAxes)
    notes = [f"{name} collapsed at epochs {', '.join(map(str, es))}" for name, es in collapsed.items() if es]
    shaded = first is not None and first is not measured[0]
    subtitle = "; ".join([*(["shaded: warm-up epochs without prototypes"] if shaded else []), *notes])
    fig.suptitle(title + ("\n" + subtitle if subtitle else ""))
    fig.subplots_adjust(left=0.06, right=0.98, top=0.88, bottom=0.07, hspace=0.35, wspace=0.18)
    path = draw.save(fig, out)
    return HealthReport(path=path, epochs=[int(e) for e in x], last=measured[-1], collapsed=collapsed)


def health_for_run(run_dir: str | Path, out: str | Path | None = None) -> HealthReport:
    """``RUN/metrics.jsonl`` -> ``RUN/plots/health.png`` (or ``out``)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise UserError(f"no metrics.jsonl in {run_dir}")
    base = path.parent
    out = Path(out) if out is not None else base / "plots" / "health.png"
    try:
        return health_figure(read_metrics(path), out, title=f"Representation health of {base.name}")
    except UserError as exc:
        raise UserError(f"{path}: {exc}") from None
