"""A long video's classes over time (``pcav predict``): one row per class, one column per window.

Rows are the classes that are in the top 3 of some window (at most 8, those with the highest
peak first), so a label that is brief but strong shows up even when the video's average hides
it; each cell's shade is the class's score in that window, drawn over the window's span.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pcavmae_cli.engine.viz.draw import new_figure, save

if TYPE_CHECKING:  # the engine's types, without importing the predictor here
    from pcavmae_cli.engine.inference import Model
    from pcavmae_cli.engine.predict_videos import VideoResult

MAX_ROWS = 8
TOP_PER_WINDOW = 3


def timeline_classes(window_scores: np.ndarray, limit: int = MAX_ROWS) -> list[int]:
    """Class indices shown: each window's top ``TOP_PER_WINDOW``, ordered by their peak score."""
    top = np.argsort(-window_scores, axis=1)[:, :TOP_PER_WINDOW]
    chosen = sorted(set(top.ravel().tolist()), key=lambda c: -float(window_scores[:, c].max()))
    return chosen[:limit]


def cell_edges(spans: list[tuple[float, float]]) -> np.ndarray:
    """Column edges: each window's cell reaches halfway to its neighbours' centres (windows that
    overlap share the time between their centres), the first from its start, the last to its end."""
    centres = np.array([(s + e) / 2 for s, e in spans])
    inner = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[spans[0][0]], inner, [spans[-1][1]]])


def draw_timeline(video: VideoResult, names: list[str], aggregate: str, path: Path) -> Path:
    scores = video.window_scores.float().numpy()  # (W, C)
    rows = timeline_classes(scores)
    fig = new_figure(max(6.0, min(16.0, 2.5 + 0.3 * len(video.spans))), 1.3 + 0.4 * len(rows))
    ax = fig.add_subplot(1, 1, 1)
    mesh = ax.pcolormesh(cell_edges(video.spans), np.arange(len(rows) + 1) - 0.5, scores[:, rows].T, cmap="Blues",
                         vmin=0.0, vmax=1.0)  # fmt: skip
    fig.colorbar(mesh, ax=ax, label="score", fraction=0.04, pad=0.02)
    ax.set_yticks(range(len(rows)), [names[c] for c in rows])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("seconds (a cell per window, around its centre)")
    top = scores.mean(axis=0) if aggregate == "mean" else scores.max(axis=0)
    best = int(np.argmax(top))
    ax.set_title(f"{video.video}: {names[best]} ({aggregate} over {len(video.spans)} windows: {top[best]:.2f})")
    fig.tight_layout()
    return save(fig, path)


def write_timelines(folder: Path, videos: list[VideoResult], model: Model, aggregate: str) -> list[Path]:
    """``folder/VIDEO.png`` for each video scored over several windows."""
    names = model.labels
    return [draw_timeline(v, names, aggregate, folder / f"{v.video}.png")
            for v in videos if v.failure is None and len(v.spans) > 1]  # fmt: skip
