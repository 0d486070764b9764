"""Shared drawing helpers: the Agg backend, class colours, frames and spectrograms, saving.

matplotlib is imported here with the non-interactive Agg backend, so figures render the same
on a server, in CI and on a laptop, and no window ever opens.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from pcavmae_cli.engine.data.manifest import atomic_write_text  # noqa: E402
from pcavmae_cli.engine.errors import UserError  # noqa: E402
from pcavmae_cli.engine.files import atomic_write  # noqa: E402
from pcavmae_cli.engine.schema import DataConfig  # noqa: E402

DPI = 100
OTHER_COLOUR = (0.6, 0.6, 0.6)
SPEC_CMAP = "magma"
plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.titlesize": 14})


def class_colours(n: int) -> list[tuple[float, float, float]]:
    """``n`` distinguishable colours (tab10, then tab20, then evenly spaced hues)."""
    if n <= 10:
        cmap = plt.get_cmap("tab10")
        return [cmap(i)[:3] for i in range(n)]
    if n <= 20:
        cmap = plt.get_cmap("tab20")
        return [cmap(i)[:3] for i in range(n)]
    cmap = plt.get_cmap("hsv")
    return [cmap(i / n)[:3] for i in range(n)]


def class_palette(order: Sequence[str], shown: Iterable[str]) -> dict[str, tuple[float, float, float]]:
    """A colour for each class of ``shown``, fixed by its place in ``order`` (the run's label CSV):
    a class keeps its colour in every figure of a run (t-SNE, galleries, explanations), whichever
    classes each figure shows. Classes not in ``order`` follow it, sorted.

    Up to 20 classes in all: tab10 / tab20. More (AudioSet's 527): hues stepped by the golden
    ratio, so that classes near each other in the CSV still differ."""
    shown = list(dict.fromkeys(shown))
    place = {name: i for i, name in enumerate(dict.fromkeys(order))}
    for name in sorted(n for n in shown if n not in place):
        place[name] = len(place)
    total = len(place)
    if total <= 20:
        colours = class_colours(total)
        return {name: colours[place[name]] for name in shown}
    hsv = plt.get_cmap("hsv")
    return {name: hsv((place[name] * 0.6180339887) % 1.0)[:3] for name in shown}


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches, not registered with pyplot's global state."""
    return Figure(figsize=(width, height), dpi=DPI)


FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}  # what a figure's file name may ask for


def check_figure_path(path: str | Path | None) -> None:
    """Refuse a figure name whose suffix is not a format ``save`` writes, before any work."""
    if path is not None and Path(path).suffix.lower() not in FORMATS:
        raise UserError(f"{path}: a figure is written as .png, .pdf or .svg, not '{Path(path).suffix or 'no suffix'}'")


def save(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` (folders made), atomically, in the format its suffix names:
    PNG, or PDF / SVG (vector, for papers); returns the path."""
    path = Path(path)
    check_figure_path(path)
    fmt = FORMATS[path.suffix.lower()]
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format=fmt, facecolor="white"))


def frame_image(frame: torch.Tensor, data: DataConfig) -> np.ndarray:
    """A normalised frame ``(3, S, S)`` back to RGB ``(S, S, 3)`` in [0, 1]."""
    mean = torch.tensor(data.video.mean).view(3, 1, 1)
    std = torch.tensor(data.video.std).view(3, 1, 1)
    return (frame.detach().float().cpu() * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def spectrogram_image(fbank: torch.Tensor) -> np.ndarray:
    """A fbank ``(T, F)`` as an image ``(F, T)``: frequency up (use ``origin='lower'``)."""
    return fbank.detach().float().cpu().T.numpy()


def show_frame(ax: Axes, image: np.ndarray, title: str | None = None, fontsize: float | None = None) -> None:
    ax.imshow(image, interpolation="bilinear")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def show_spectrogram(
    ax: Axes,
    image: np.ndarray,
    data: DataConfig,
    *,
    title: str | None = None,
    vrange: tuple[float, float] | None = None,
    axes_labels: bool = True,
) -> None:
    """A (masked) spectrogram image ``(F, T)`` with time in seconds; NaN cells are drawn grey."""
    cmap = plt.get_cmap(SPEC_CMAP).with_extremes(bad=(0.55, 0.55, 0.55))
    frames = image.shape[1]
    seconds = frames * data.audio.fbank.frame_shift_ms / 1000
    lo, hi = vrange if vrange is not None else spectrogram_range(image)
    ax.imshow(image, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi,
              extent=(0, seconds, 0, image.shape[0]), interpolation="nearest")  # fmt: skip
    if axes_labels:
        ax.set_xlabel("time (s)")
        ax.set_ylabel("mel bin")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        ax.set_title(title)


def show_log_mel(ax: Axes, image: np.ndarray, data: DataConfig, vrange: tuple[float, float]) -> None:
    """A small log-Mel ``(F, T)`` on a given colour scale: time ticks in seconds, no mel ticks."""
    if image.shape[1] == 0:
        ax.axis("off")
        ax.text(0.5, 0.5, "no audio", ha="center", va="center", fontsize=7)
        return
    show_spectrogram(ax, image, data, vrange=vrange, axes_labels=False)
    seconds = image.shape[1] * data.audio.fbank.frame_shift_ms / 1000
    ax.set_xticks([0, seconds])
    first, last = ax.set_xticklabels(["0", f"{seconds:.1f} s"], fontsize=6)
    first.set_horizontalalignment("left")  # inside the panel: neighbouring panels' labels never meet
    last.set_horizontalalignment("right")
    ax.tick_params(axis="x", length=2, pad=1)


def spectrogram_range(image: np.ndarray) -> tuple[float, float]:
    """A colour range that ignores padding and outliers: the 1st..99th percentile."""
    finite = image[np.isfinite(image)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    return float(lo), float(max(hi, lo + 1e-6))


def makeup_bar(ax: Axes, makeup: Sequence[tuple[str, float]], colours: dict[str, tuple], top: int = 4) -> None:
    """Horizontal bars of a cluster's label shares (``top`` labels, the rest summed as 'other')."""
    shown = list(makeup[:top])
    rest = sum(share for _, share in makeup[top:])
    names = [name for name, _ in shown] + (["other labels"] if rest > 0 else [])
    shares = [share for _, share in shown] + ([rest] if rest > 0 else [])
    y = np.arange(len(names))[::-1]
    ax.barh(y, shares, color=[colours.get(n, OTHER_COLOUR) for n in names], height=0.7)
    for yi, name, share in zip(y, names, shares):
        plain = name.replace("$", r"\$")  # a label is text, never matplotlib's mathematics
        ax.text(0.02, yi, f"{plain}  {share:.0%}", va="center", ha="left", fontsize=8,
                bbox={"facecolor": "white", "alpha": 0.7, "pad": 1, "edgecolor": "none"})  # fmt: skip
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.6, max(len(names), 1) - 0.4)
    ax.set_yticks([])
    ax.set_xticks([0, 0.5, 1])
    ax.set_xticklabels(["0", "50%", "100%"], fontsize=7)
    ax.tick_params(axis="x", length=2, pad=1)
    if not names:
        ax.text(0.5, 0, "no labels", ha="center", va="center", fontsize=8)


def write_html(path: Path, title: str, body: str) -> Path:
    """A small self-contained HTML page (inline CSS, images by relative path)."""
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html_escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1400px; color: #222; }}
img {{ max-width: 100%; border: 1px solid #ddd; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; text-align: left; font-size: 14px; }}
th {{ background: #f3f3f3; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
.clips {{ display: flex; flex-wrap: wrap; gap: 12px; margin: 0.5em 0 1.5em; }}
figure.clip {{ margin: 0; width: 360px; font-size: 13px; }}
figure.clip img, figure.clip video, figure.clip audio {{ width: 360px; display: block; margin-top: 4px; }}
.note {{ color: #555; font-size: 14px; }}
</style></head><body>
<h1>{html_escape(title)}</h1>
{body}
</body></html>
"""
    atomic_write_text(path, page)
    return path


def html_escape(text: object) -> str:
    """``text`` safe in HTML text and in quoted attributes (ids and labels come from user data)."""
    return html.escape(str(text), quote=True)


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]], numeric: Sequence[int] = ()) -> str:
    """An HTML table; cells of the ``numeric`` columns are right-aligned."""
    head = "".join(f"<th>{html_escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{html_escape(c)}</td>' if i in numeric else f"<td>{html_escape(c)}</td>"
            for i, c in enumerate(row)
        )
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(lines)}</table>"


def fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
