"""The files of ``pcav explain``: ``explain.png``, ``explain.html`` and ``explain.json``.

The picture: the clip (middle frame and spectrogram) on the left; one row per granularity with
its nearest prototypes (similarities, size, majority label, exemplar frames, label make-up);
for a fine-tuned model a last row with the predicted classes and, per granularity, the top
logit split into base, prototype contributions and residual (``contributions.py``).
"""

from __future__ import annotations

import json
from pathlib import Path

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.path_names import child
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.contributions import Decomposition
from pcavmae_cli.engine.viz.explain import Explanation

SHOWN_PARTS = 6  # prototype bars per decomposition; the other listed ones are summed


def decomposition_bars(d: Decomposition) -> list[tuple[str, float]]:
    """(name, value) bars that add up to the logit: base, the largest contributions, the rest, residual."""
    order = sorted(range(len(d.prototypes)), key=lambda i: -abs(d.contributions[i]))
    bars = [("base (average clip)", d.base)]
    bars += [(f"P{d.prototypes[i]} (a={d.coefficients[i]:.2f})", d.contributions[i]) for i in order[:SHOWN_PARTS]]
    rest = order[SHOWN_PARTS:]
    if rest:
        bars.append((f"{len(rest)} other prototypes", sum(d.contributions[i] for i in rest)))
    bars.append(("residual", d.residual))
    return bars


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def explanation_figure(ex: Explanation, dataset: AudioVisualDataset, out: Path) -> Path:
    """Draw ``ex``; exemplar frames are read from ``dataset`` (the training manifest, middle frame)."""
    data = dataset.cfg
    levels = len(ex.neighbours)
    top = max(len(n) for n in ex.neighbours)
    n_ex = max((len(nb.exemplars) for row in ex.neighbours for nb in row), default=0)
    level_h, pred_h, head_h = 3.6, 3.4, 1.2
    foot = 0.8 if ex.prediction else 0.3
    height = head_h + levels * level_h + (pred_h if ex.prediction else 0) + foot
    fig = draw.new_figure(3.4 + 4.4 * top, height)
    ratios = [level_h] * levels + ([pred_h] if ex.prediction else [])
    grid = fig.add_gridspec(len(ratios), 1 + top, height_ratios=ratios, width_ratios=[0.8] + [1] * top,
                            left=0.05, right=0.99, top=1 - head_h / height, bottom=foot / height,
                            hspace=0.45, wspace=0.15)  # fmt: skip
    query = grid[:levels, 0].subgridspec(3, 1, height_ratios=[2.2, 1.0, 0.6], hspace=0.35)
    label = ", ".join(ex.labels) or "unlabelled"
    draw.show_frame(fig.add_subplot(query[0]), ex.frame, f"the clip: {_short(ex.clip_id, 26)}\n{_short(label, 30)}")
    draw.show_spectrogram(fig.add_subplot(query[1]), ex.spectrogram, data, title="its spectrogram")
    colours = {}
    for level, row in enumerate(ex.neighbours):
        for c, nb in enumerate(row):
            for name, _ in nb.makeup:
                colours.setdefault(name, None)
    colours = dict(zip(sorted(colours), draw.class_colours(len(colours))))

    for level, row in enumerate(ex.neighbours):
        for c, nb in enumerate(row):
            cell = grid[level, 1 + c].subgridspec(3, max(n_ex, 1), height_ratios=[0.9, 1.6, 0.8], hspace=0.3, wspace=0.05)
            text = fig.add_subplot(cell[0, :])
            text.axis("off")
            mine = " (its own)" if ex.assigned[level] == nb.prototype else ""
            text.text(0, 1, f"granularity {level}, #{c + 1}: P{nb.prototype}{mine}", fontsize=11, fontweight="bold", va="top")
            majority = f"{_short(nb.majority, 26)} ({nb.makeup[0][1]:.0%})" if nb.majority else "no labels"
            text.text(0, 0.55, f"cos {nb.similarity:.2f} (audio {nb.audio_similarity:.2f}, video {nb.video_similarity:.2f}),"
                               f" p={nb.posterior:.2f}\n{nb.clips} clip{'s' if nb.clips != 1 else ''}, majority {majority}", fontsize=8.5, va="top")  # fmt: skip
            for e, exemplar in enumerate(nb.exemplars):
                image = draw.frame_image(dataset[exemplar.index]["frames"], data)
                sim = f" {exemplar.similarity:.2f}" if exemplar.similarity is not None else ""
                draw.show_frame(fig.add_subplot(cell[1, e]), image, f"{_short(exemplar.label, 16)}{sim}", fontsize=7.5)
            if not nb.exemplars:
                ax = fig.add_subplot(cell[1, :])
                ax.axis("off")
                ax.text(0.5, 0.5, "no other member", ha="center", fontsize=8)
            draw.makeup_bar(fig.add_subplot(cell[2, :]), nb.makeup, colours, top=3)

    if ex.prediction is not None:
        p = ex.prediction
        ax = fig.add_subplot(grid[levels, 0])
        names = [_short(n, 26) for n, _ in p.classes][::-1]
        values = [v for _, v in p.classes][::-1]
        ax.barh(range(len(names)), values, color="C0", alpha=0.6)
        for y, (name, value) in enumerate(zip(names, values)):
            ax.text(0.02, y, f"{name}  {value:.2f}", va="center", fontsize=8)
        ax.set_yticks([])
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability (frame mean)")
        ax.set_title(f"prediction ({p.mode} head)", fontsize=10)
        # A spacer column before each chart leaves room for its bar names.
        n = len(p.decompositions)
        sub = grid[levels, 1:].subgridspec(1, 2 * n, width_ratios=[0.3, 1] * n, wspace=0.05)
        for level, d in enumerate(p.decompositions):
            bars = decomposition_bars(d)
            ax = fig.add_subplot(sub[0, 2 * level + 1])
            y = list(range(len(bars)))[::-1]
            ax.barh(y, [v for _, v in bars], color=["0.6"] + ["C2" if v >= 0 else "C3" for _, v in bars[1:-1]] + ["0.8"])
            ax.set_yticks(y)
            ax.set_yticklabels([n for n, _ in bars], fontsize=8)
            ax.axvline(0, color="0.3", lw=0.8)
            ax.set_xlabel("contribution to the logit")
            ax.set_title(f"granularity {level}: logit of '{_short(p.top_class, 20)}' = {d.logit:.2f}\n"
                         f"= base {d.base:.2f} + prototypes {d.explained:.2f} + residual {d.residual:.2f}", fontsize=9)  # fmt: skip
    fig.suptitle(
        f"Why the model sees {ex.clip_id} as it does\nnearest prototypes of {Path(ex.run_dir).name} (epoch {ex.epoch + 1}); "
        "cos: similarity of the clip's joint embedding to the prototype, p: eq. 1's posterior",
        fontsize=12,
    )
    return draw.save(fig, out)


def explanation_html(ex: Explanation, png: Path, out: Path) -> Path:
    """A page with the picture and every number of ``ex``."""
    parts = [
        f'<p class="note">Clip <b>{draw.html_escape(ex.clip_id)}</b> from <code>{draw.html_escape(ex.source)}</code>; '
        f"labels: {draw.html_escape(', '.join(ex.labels) or 'none')}. Prototypes of epoch {ex.epoch + 1} of "
        f"<code>{draw.html_escape(ex.run_dir)}</code>; checkpoint <code>{draw.html_escape(ex.checkpoint)}</code>.</p>",
        f'<p><img src="{png.name}" alt="explanation of {draw.html_escape(ex.clip_id)}"></p>',
    ]
    for level, row in enumerate(ex.neighbours):
        own = f" (the clip belongs to P{ex.assigned[level]} in training)" if ex.assigned[level] is not None else ""
        parts.append(f"<h2>Granularity {level}{draw.html_escape(own)}</h2>")
        rows = [[f"P{nb.prototype}", f"{nb.similarity:.3f}", f"{nb.audio_similarity:.3f}", f"{nb.video_similarity:.3f}",
                 f"{nb.posterior:.3f}", nb.clips, f"{nb.gamma:.3f}",
                 ", ".join(f"{n} {s:.0%}" for n, s in nb.makeup[:3]) or "-",
                 ", ".join(e.clip_id for e in nb.exemplars) or "-"] for nb in row]  # fmt: skip
        parts.append(draw.html_table(["prototype", "cos", "audio cos", "video cos", "posterior", "clips", "gamma",
                                      "label make-up", "exemplars"], rows, numeric=(1, 2, 3, 4, 5, 6)))  # fmt: skip
    if ex.prediction is not None:
        p = ex.prediction
        parts.append("<h2>Prediction</h2>")
        parts.append(draw.html_table(["class", "probability"], [[n, f"{v:.3f}"] for n, v in p.classes], numeric=(1,)))
        for level, d in enumerate(p.decompositions):
            parts.append(f"<h3>Logit of '{draw.html_escape(p.top_class)}' over granularity {level}: {d.logit:.3f} = "
                         f"base {d.base:.3f} + prototypes {d.explained:.3f} + residual {d.residual:.3f}</h3>")  # fmt: skip
            rows = [[f"P{k}", f"{pi:.3f}", f"{a:.3f}", f"{c:+.3f}"]
                    for k, pi, a, c in zip(d.prototypes, d.posterior, d.coefficients, d.contributions)]  # fmt: skip
            parts.append(draw.html_table(["prototype", "posterior", "coefficient a", "contribution"], rows,
                                         numeric=(1, 2, 3)))  # fmt: skip
        parts.append('<p class="note">Contribution of prototype k = a_k w . (c_k - mu): how far the clip goes in the '
                     "direction from an average clip to prototype k's average member (a_k = s p_k, its posterior "
                     "times one fitted scale s), times what the head gives that direction; see docs/method.md, "
                     "explain.</p>")  # fmt: skip
    return draw.write_html(out, f"pcav explain {ex.clip_id}", "\n".join(parts))


def default_folder(plots: str | Path, clip_id: str) -> Path:
    """``PLOTS/explain/CLIP``, where ``pcav explain`` writes unless told ``--out``.

    A manifest pcav did not write (a CAV-MAE JSON's import, a hand-edited file) may hold an id
    such as ``../../x``; it is refused rather than followed out of the run folder.
    """
    return child(Path(plots) / "explain", clip_id, hint="; pass --out FOLDER")


def render(ex: Explanation, dataset: AudioVisualDataset, out_dir: str | Path) -> list[Path]:
    """Write explain.png, explain.html and explain.json into ``out_dir``; their paths."""
    out_dir = Path(out_dir)
    png = explanation_figure(ex, dataset, out_dir / "explain.png")
    html = explanation_html(ex, png, out_dir / "explain.html")
    path = out_dir / "explain.json"
    atomic_write_text(path, json.dumps(ex.to_json(), indent=2) + "\n")
    return [png, html, path]
