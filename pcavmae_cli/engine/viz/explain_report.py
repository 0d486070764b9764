"""The files of ``pcav explain``: ``explain.png``, ``explain.html`` and ``explain.json``.

The picture: the clip (middle frame and log-Mel) on the left, with how much of the decision is
audio-driven (``modality_share.py``); one row per granularity with its nearest prototypes
(similarities, size, majority label, exemplar frames and log-Mels, label make-up); for a
fine-tuned model a last row with the predicted classes and, per granularity, the top logit split
into base, prototype contributions and residual (``contributions.py``). Every log-Mel is on one
colour scale (``explain_media.colour_range``).

The page: the picture, every number, and a card per clip (the explained one and each exemplar)
that plays its WAV and its source video (``explain_media.py``: the files it writes in
``media/``, and why WAVs are copied while videos are linked).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.path_names import child
from pcavmae_cli.engine.schema import DataConfig
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.contributions import Decomposition
from pcavmae_cli.engine.viz.explain import Explanation
from pcavmae_cli.engine.viz.explain_media import ClipMedia, clip_card, colour_range, exemplar_media
from pcavmae_cli.engine.viz.modality_share import ModalityShare, sentence

SHOWN_PARTS = 6  # prototype bars per decomposition; the other listed ones are summed


def decomposition_bars(d: Decomposition) -> list[tuple[str, float]]:
    """(name, value) bars that add up to the logit: base, the largest contributions, the rest, residual."""
    order = sorted(range(len(d.prototypes)), key=lambda i: -abs(d.contributions[i]))
    bars = [("base (average clip)", d.base)]
    bars += [(f"P{d.prototypes[i]} (a={d.coefficients[i]:.2f})", d.contributions[i]) for i in order[:SHOWN_PARTS]]
    rest = order[SHOWN_PARTS:]
    if rest:
        bars.append((f"{len(rest)} other prototypes", sum(d.contributions[i] for i in rest)))
    if d.other:  # the prototype head: the prototypes not listed, of this and the other granularities
        bars.append(("prototypes not listed", d.other))
    bars.append(("residual", d.residual))
    return bars


def _short(text: str, n: int = 22) -> str:
    """``text`` cut to ``n`` characters, for the picture: ``$`` is escaped, since matplotlib would
    read a user's id such as ``a$x^$`` as mathematics (and fail on a malformed one)."""
    text = text if len(text) <= n else text[: n - 1] + "…"
    return text.replace("$", r"\$")


def modality_lines(ex: Explanation) -> list[tuple[str, ModalityShare]]:
    """(what, share) of every modality measure of ``ex``: each granularity's nearest-prototype
    margin, then the fine-tuned model's top logit."""
    lines = [(f"granularity {g}: nearest prototype", m) for g, m in enumerate(ex.modality) if m is not None]
    if ex.prediction is not None and ex.prediction.modality is not None:
        lines.append(("top logit", ex.prediction.modality))
    return lines


def decision_sentence(ex: Explanation) -> str:
    """The headline: the fine-tuned model's top logit if there is one, else the finest granularity."""
    lines = modality_lines(ex)
    if not lines:
        return "the decision: no second prototype to compare with, no head"
    what, share = lines[-1]
    return sentence(share) + ("" if what == "top logit" else f", {what.split(':')[0]}")


def exemplar_clips(ex: Explanation, dataset: AudioVisualDataset) -> dict[int, ClipMedia]:
    """Every exemplar of ``ex`` once, by training-manifest row."""
    clips: dict[int, ClipMedia] = {}
    for row in ex.neighbours:
        for nb in row:
            for e in nb.exemplars:
                if e.index not in clips:  # the same clip may be an exemplar of several prototypes
                    clips[e.index] = exemplar_media(dataset, e.index, e.label or "unlabelled")
    return clips


def explained_clip(ex: Explanation) -> ClipMedia:
    label = ", ".join(ex.labels) or "unlabelled"
    return ClipMedia(ex.clip_id, f"the explained clip: {label}", ex.frame, ex.spectrogram, ex.wav, ex.media)


def explanation_figure(
    ex: Explanation, data: DataConfig, clips: dict[int, ClipMedia], out: Path, order: Sequence[str] = ()
) -> Path:
    """Draw ``ex``; ``clips``: its exemplars by training-manifest row (``exemplar_clips``);
    ``order``: the run's class display names in label-CSV order, which fix each class's colour."""
    levels = len(ex.neighbours)
    top = max(len(n) for n in ex.neighbours)
    n_ex = max((len(nb.exemplars) for row in ex.neighbours for nb in row), default=0)
    level_h, pred_h, head_h = 4.4, 3.4, 1.5
    foot = 0.8 if ex.prediction else 0.3
    height = head_h + levels * level_h + (pred_h if ex.prediction else 0) + foot
    fig = draw.new_figure(3.4 + 4.4 * top, height)
    ratios = [level_h] * levels + ([pred_h] if ex.prediction else [])
    grid = fig.add_gridspec(len(ratios), 1 + top, height_ratios=ratios, width_ratios=[0.8] + [1] * top,
                            left=0.05, right=0.99, top=1 - head_h / height, bottom=foot / height,
                            hspace=0.45, wspace=0.15)  # fmt: skip
    query = grid[:levels, 0].subgridspec(4, 1, height_ratios=[2.2, 1.0, 0.15, 1.2], hspace=0.45)
    label = ", ".join(ex.labels) or "unlabelled"
    vrange = colour_range(data.audio.fbank)
    draw.show_frame(fig.add_subplot(query[0]), ex.frame, f"the clip: {_short(ex.clip_id, 26)}\n{_short(label, 30)}")
    ax = fig.add_subplot(query[1])
    draw.show_spectrogram(ax, ex.spectrogram, data, title="its log-Mel", vrange=vrange)
    if ax.images:  # one colour scale for every log-Mel of the figure
        bar = fig.colorbar(ax.images[0], cax=fig.add_subplot(query[2]), orientation="horizontal")
        bar.set_label("log-Mel energy (one scale for every clip)", fontsize=8)
        bar.ax.tick_params(labelsize=7)
    ax = fig.add_subplot(query[3])
    ax.axis("off")
    shares = [f"{what}:\n  audio share {'-' if m.share is None else f'{m.share:.2f}'}, {m.verdict}"
              for what, m in modality_lines(ex)]  # fmt: skip
    ax.text(0, 1, "audio or video?\n" + "\n".join(shares), fontsize=8.5, va="top")
    colours = {}
    for level, row in enumerate(ex.neighbours):
        for c, nb in enumerate(row):
            for name, _ in nb.makeup:
                colours.setdefault(name, None)
    colours = draw.class_palette(order, sorted(colours))  # the run's colours (draw.class_palette)

    for level, row in enumerate(ex.neighbours):
        for c, nb in enumerate(row):
            cell = grid[level, 1 + c].subgridspec(4, max(n_ex, 1), height_ratios=[0.9, 1.6, 0.75, 0.8], hspace=0.35,
                                                  wspace=0.08)  # fmt: skip
            text = fig.add_subplot(cell[0, :])
            text.axis("off")
            mine = " (its own)" if ex.assigned[level] == nb.prototype else ""
            text.text(0, 1, f"granularity {level}, #{c + 1}: P{nb.prototype}{mine}", fontsize=11, fontweight="bold", va="top")
            majority = f"{_short(nb.majority, 26)} ({nb.makeup[0][1]:.0%})" if nb.majority else "no labels"
            text.text(0, 0.55, f"cos {nb.similarity:.2f} (audio {nb.audio_similarity:.2f}, video {nb.video_similarity:.2f}),"
                               f" p={nb.posterior:.2f}\n{nb.clips} clip{'s' if nb.clips != 1 else ''}, majority {majority}", fontsize=8.5, va="top")  # fmt: skip
            for e, exemplar in enumerate(nb.exemplars):
                clip = clips[exemplar.index]
                sim = f" {exemplar.similarity:.2f}" if exemplar.similarity is not None else ""
                draw.show_frame(fig.add_subplot(cell[1, e]), clip.frame, f"{_short(exemplar.label, 16)}{sim}", fontsize=7.5)
                draw.show_log_mel(fig.add_subplot(cell[2, e]), clip.log_mel, data, vrange)
            if not nb.exemplars:
                ax = fig.add_subplot(cell[1:3, :])
                ax.axis("off")
                ax.text(0.5, 0.5, "no other member", ha="center", fontsize=8)
            draw.makeup_bar(fig.add_subplot(cell[3, :]), nb.makeup, colours, top=3)

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
        f"Why the model sees {_short(ex.clip_id, 60)} as it does\n"
        f"nearest prototypes of {_short(Path(ex.run_dir).name, 40)} "
        f"(epoch {ex.epoch}); cos: similarity of the clip's joint embedding to the prototype, p: eq. 1's posterior; "
        f"exemplars: frame and log-Mel\n{_short(decision_sentence(ex), 160)}",
        fontsize=12,
    )
    return draw.save(fig, out)


def explanation_html(ex: Explanation, png: Path, out: Path, clips: dict[int, ClipMedia], data: DataConfig) -> Path:
    """A page with the picture, every number of ``ex``, and a playable card per clip (``explain_media``)."""
    folder, vrange = out.parent, colour_range(data.audio.fbank)
    parts = [
        f'<p class="note">Clip <b>{draw.html_escape(ex.clip_id)}</b> from <code>{draw.html_escape(ex.source)}</code>; '
        f"labels: {draw.html_escape(', '.join(ex.labels) or 'none')}. Prototypes of epoch {ex.epoch} of "
        f"<code>{draw.html_escape(ex.run_dir)}</code>; checkpoint <code>{draw.html_escape(ex.checkpoint)}</code>.</p>",
        f"<p><b>{draw.html_escape(decision_sentence(ex))}.</b></p>",
        f'<div class="clips">{clip_card(explained_clip(ex), 0, folder, data, vrange)}</div>',
        "<h2>Audio or video?</h2>",
        draw.html_table(["decision", "audio share", "verdict", "audio part", "video part", "what is split"],
                        [[what, "-" if m.share is None else f"{m.share:.3f}", m.verdict, f"{m.audio:+.4f}",
                          f"{m.video:+.4f}", m.what] for what, m in modality_lines(ex)], numeric=(1, 3, 4)),
        '<p class="note">Audio share = |audio| / (|audio| + |video|) of a quantity that is exactly audio + video: '
        "for a prototype, the margin of the nearest prototype over the second (the clip's unit audio and video "
        "embeddings each give part of it); for a fine-tuned model, the top logit's change from a neutral input "
        "(flat mean-level spectrogram, mean-colour frame), split between the two by their Shapley values. "
        "&ge; 2/3: mostly audio-driven; &le; 1/3: mostly video-driven; see docs/method.md, explain.</p>",
        f'<p><img src="{png.name}" alt="explanation of {draw.html_escape(ex.clip_id)}"></p>',
    ]  # fmt: skip
    cards = {index: clip_card(clip, 1 + n, folder, data, vrange) for n, (index, clip) in enumerate(clips.items())}
    for level, row in enumerate(ex.neighbours):
        own = f" (the clip belongs to P{ex.assigned[level]} in training)" if ex.assigned[level] is not None else ""
        parts.append(f"<h2>Granularity {level}{draw.html_escape(own)}</h2>")
        rows = [[f"P{nb.prototype}", f"{nb.similarity:.3f}", f"{nb.audio_similarity:.3f}", f"{nb.video_similarity:.3f}",
                 f"{nb.posterior:.3f}", nb.clips, f"{nb.gamma:.3f}",
                 ", ".join(f"{n} {s:.0%}" for n, s in nb.makeup[:3]) or "-",
                 ", ".join(e.clip_id for e in nb.exemplars) or "-"] for nb in row]  # fmt: skip
        parts.append(draw.html_table(["prototype", "cos", "audio cos", "video cos", "posterior", "clips", "gamma",
                                      "label make-up", "exemplars"], rows, numeric=(1, 2, 3, 4, 5, 6)))  # fmt: skip
        for nb in row:
            shown = "".join(cards[e.index] for e in nb.exemplars) or "no other member"
            parts.append(f'<h3>P{nb.prototype}: exemplars</h3><div class="clips">{shown}</div>')
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


def render(ex: Explanation, dataset: AudioVisualDataset, out_dir: str | Path, order: Sequence[str] = ()) -> list[Path]:
    """Write explain.png, explain.html (with its ``media/``) and explain.json into ``out_dir``; their paths.

    ``dataset``: the training manifest (middle frame), where the exemplars are read from;
    ``order``: the run's class display names (label-CSV order: the classes' colours).
    """
    out_dir = Path(out_dir)
    clips = exemplar_clips(ex, dataset)
    png = explanation_figure(ex, dataset.cfg, clips, out_dir / "explain.png", order)
    html = explanation_html(ex, png, out_dir / "explain.html", clips, dataset.cfg)
    path = out_dir / "explain.json"
    atomic_write_text(path, json.dumps(ex.to_json(), indent=2) + "\n")
    return [png, html, path]
