"""Prototype galleries: what each granularity's largest prototypes hold, and how they evolved.

For the prototypes of the run's latest epoch (the checkpoint's), per granularity:

- a gallery PNG: the ``top`` largest prototypes, one row each, with their size, concentration
  gamma, majority label and label make-up, and ``members`` exemplar clips (middle frame and
  spectrogram; exemplars are the members nearest the prototype, ``exemplars.py``);
- purity and NMI of the clustering against the training labels (``cluster_metrics.py``).

Over all epochs with a prototype file: purity, NMI and the largest prototype's share of the
clips per granularity (``evolution.png``). ``index.html`` is a small self-contained page that
shows the pictures (relative links) and tables of every number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.manifest import ClipRecord
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.prototypes import Prototypes, load_prototypes
from pcavmae_cli.engine.schema import DataConfig
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.cluster_metrics import cluster_members, label_makeup, nmi, purity
from pcavmae_cli.engine.viz.exemplars import EmbeddingCache, nearest_members
from pcavmae_cli.engine.viz.run import RunView, display, resolve_device

TABLE_ROWS = 50  # prototypes listed per granularity in the HTML page


@dataclass
class LevelStats:
    level: int
    epoch: int  # 1-based, as in metrics.jsonl and on screen
    k: int
    purity: float | None
    nmi: float | None
    largest_share: float


@dataclass
class PrototypeReport:
    html: Path
    pngs: list[Path]
    levels: list[LevelStats]  # the latest epoch
    history: list[LevelStats] = field(default_factory=list)  # every epoch, every granularity


def level_stats(protos: Prototypes, labels: Sequence[Sequence[str]], level: int, epoch: int) -> LevelStats:
    """Purity, NMI, size and largest share of one granularity's prototypes of epoch index ``epoch``
    (0-based, as the trainer counts; the stats carry it 1-based)."""
    assignments = protos.assignments.cpu().numpy()
    if len(assignments) != len(labels):
        raise UserError(
            f"prototypes of epoch {epoch + 1} assign {len(assignments)} clips but the run's train manifest has "
            f"{len(labels)}: the manifest changed after training"
        )
    counts = protos.counts.cpu()
    return LevelStats(level, epoch + 1, int(counts.numel()), purity(assignments, labels), nmi(assignments, labels),
                      float(counts.max() / counts.sum()))  # fmt: skip


def label_colours(labels: Sequence[Sequence[str]], names: dict[str, str]) -> dict[str, tuple]:
    """Display name -> colour, the same in every figure of the run (``draw.class_palette``)."""
    shown = sorted({display(lab, names) for ls in labels for lab in ls})
    return draw.class_palette([display(mid, names) for mid in names], shown)


def _clips(n: int) -> str:
    return f"{n} clip" if n == 1 else f"{n} clips"


def _short(text: str, n: int = 24) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def gallery_figure(
    protos: Prototypes,
    level: int,
    epoch: int,
    records: Sequence[ClipRecord],
    dataset: AudioVisualDataset,
    data: DataConfig,
    exemplars: dict[int, list[tuple[int, float | None]]],
    names: dict[str, str],
    colours: dict[str, tuple],
    out: Path,
    stats: LevelStats,
) -> Path:
    """One row per prototype of ``exemplars`` (largest first): facts, label make-up, member clips."""
    shown = list(exemplars)
    n_members = max((len(v) for v in exemplars.values()), default=0)
    cols = max(n_members, 1)
    row_h = 3.1
    height = row_h * len(shown) + 1.6
    fig = draw.new_figure(4.2 + 2.3 * cols, height)
    grid = fig.add_gridspec(len(shown), 1 + cols, width_ratios=[1.8] + [1] * cols, left=0.02, right=0.99,
                            top=1 - 1.45 / height, bottom=0.15 / height, hspace=0.35, wspace=0.12)  # fmt: skip
    members_of = cluster_members(protos.assignments.cpu().numpy())
    for r, k in enumerate(shown):
        clip_labels = [[display(lab, names) for lab in records[i].labels] for i in members_of.get(k, [])]
        makeup = label_makeup(clip_labels)
        info = grid[r, 0].subgridspec(2, 1, height_ratios=[1.1, 1], hspace=0.25)
        text_ax = fig.add_subplot(info[0])
        text_ax.axis("off")
        majority = f"{makeup[0][0]} ({makeup[0][1]:.0%})" if makeup else "no labels"
        text_ax.text(0, 1, f"P{k}", fontsize=14, fontweight="bold", va="top")
        text_ax.text(0, 0.62, f"{_clips(int(protos.counts[k]))}, gamma {float(protos.gamma[k]):.3f}\n"
                              f"majority: {_short(majority, 34)}", fontsize=9, va="top")  # fmt: skip
        bar_ax = fig.add_subplot(info[1])
        draw.makeup_bar(bar_ax, makeup, colours)
        bar_ax.set_title("label make-up", fontsize=8, pad=2)
        for c, (i, sim) in enumerate(exemplars[k]):
            cell = grid[r, 1 + c].subgridspec(2, 1, height_ratios=[2.0, 0.9], hspace=0.05)
            sample = dataset[i]
            record = records[i]
            label = display(record.labels[0], names) if record.labels else "unlabelled"
            head = f"{_short(record.id, 18)}" + (f"  cos {sim:.2f}" if sim is not None else "")
            draw.show_frame(fig.add_subplot(cell[0]), draw.frame_image(sample["frames"], data), f"{head}\n{_short(label)}",
                            fontsize=8)
            draw.show_spectrogram(fig.add_subplot(cell[1]), draw.spectrogram_image(sample["fbank"]), data,
                                  axes_labels=False)  # fmt: skip
        if not exemplars[k]:
            ax = fig.add_subplot(grid[r, 1])
            ax.axis("off")
            ax.text(0, 0.5, "no member clips to show", fontsize=9)
    scores = f"purity {draw.fmt(stats.purity)}, NMI {draw.fmt(stats.nmi)}" if stats.purity is not None else "no labels"
    fig.suptitle(
        f"Granularity {level}: the {len(shown)} largest of {stats.k} prototypes (epoch {stats.epoch}; {scores})\n"
        "members shown: middle frame and spectrogram of the clips nearest each prototype",
        fontsize=12,
    )
    return draw.save(fig, out)


def evolution_figure(history: Sequence[LevelStats], out: Path, title: str) -> Path:
    """Purity, NMI and the largest prototype's share per epoch, one line per granularity."""
    levels = sorted({s.level for s in history})
    labelled = any(s.purity is not None for s in history)
    panels = [("purity", "purity (share of clips in their prototype's majority class)"),
              ("nmi", "NMI (clusters vs. first label)")] if labelled else []  # fmt: skip
    panels.append(("largest_share", "largest prototype's share of the clips"))
    fig = draw.new_figure(6.0 * len(panels), 4.6)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (key, panel_title) in zip(axes, panels):
        for level in levels:
            rows = [s for s in history if s.level == level]
            ks = sorted({s.k for s in rows})
            k_text = f"K={ks[0]}" if len(ks) == 1 else f"K={ks[0]}..{ks[-1]}"
            ax.plot([s.epoch for s in rows], [getattr(s, key) for s in rows], marker="o", ms=4,
                    label=f"granularity {level} ({k_text})")  # fmt: skip
        ax.set_title(panel_title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.06, right=0.98, top=0.84, bottom=0.13, wspace=0.22)
    return draw.save(fig, out)


def prototypes_report(
    run: RunView,
    out_dir: str | Path | None = None,
    *,
    top: int = 6,
    members: int = 4,
    candidates: int = 64,
    device: str = "auto",
    seed: int = 0,
) -> PrototypeReport:
    """Galleries, evolution figure and ``index.html`` of the run's prototypes under ``out_dir``
    (default ``RUN/plots/prototypes``). Without a checkpoint, exemplars are random members."""
    if top < 1 or members < 0:
        raise UserError(f"--top must be >= 1 and --members >= 0 (got {top}, {members})")
    out_dir = Path(out_dir) if out_dir is not None else run.plots / "prototypes"
    epoch, levels = run.latest_prototypes()
    manifest, records = run.train_clips()
    labels = [list(r.labels) for r in records]
    names = run.label_names()
    colours = label_colours(labels, names)
    dataset = AudioVisualDataset(manifest, run.cfg.data, frames="middle")
    cache = None
    if run.checkpoint is not None:
        dev = resolve_device(device)
        _, momentum = run.load_model(dev)
        cache = EmbeddingCache(momentum, dataset, dev)

    history = []
    for e in run.prototype_epochs():
        for level, protos in enumerate(load_prototypes(run.run_dir / "prototypes", e)):
            history.append(level_stats(protos, labels, level, e))
    latest = [level_stats(p, labels, level, epoch) for level, p in enumerate(levels)]

    pngs, sections = [], []
    for level, (protos, stats) in enumerate(zip(levels, latest)):
        counts = protos.counts.cpu()
        order = sorted(range(len(counts)), key=lambda k: (-int(counts[k]), k))
        members_of = cluster_members(protos.assignments.cpu().numpy())
        exemplars = {
            k: nearest_members(cache, members_of.get(k, []), protos.centroids[k], members,
                               candidates=candidates, seed=seed + k)
            for k in order[:top]
        }  # fmt: skip
        png = gallery_figure(protos, level, epoch, records, dataset, run.cfg.data, exemplars, names, colours,
                             out_dir / f"gallery-granularity{level}.png", stats)  # fmt: skip
        pngs.append(png)
        rows = []
        for k in order[:TABLE_ROWS]:
            makeup = label_makeup([[display(lab, names) for lab in labels[i]] for i in members_of.get(k, [])])
            rows.append([f"P{k}", int(counts[k]), f"{float(protos.gamma[k]):.3f}",
                         ", ".join(f"{n} {s:.0%}" for n, s in makeup[:3]) or "-"])  # fmt: skip
        more = f'<p class="note">{len(order) - TABLE_ROWS} smaller prototypes not listed.</p>' if len(order) > TABLE_ROWS else ""
        sections.append(
            f"<h2>Granularity {level}: {stats.k} prototypes</h2>"
            f'<p>purity {draw.fmt(stats.purity)}, NMI {draw.fmt(stats.nmi)}, largest prototype '
            f"{stats.largest_share:.0%} of the clips.</p>"
            f'<p><a href="{png.name}"><img src="{png.name}" alt="gallery of granularity {level}"></a></p>'
            + draw.html_table(["prototype", "clips", "gamma", "label make-up (top 3)"], rows, numeric=(1, 2))
            + more
        )
    evo = evolution_figure(history, out_dir / "evolution.png",
                           f"Prototypes of {run.run_dir.name} over {len(run.prototype_epochs())} epochs")  # fmt: skip
    pngs.append(evo)
    summary = draw.html_table(
        ["granularity", "prototypes", "purity", "NMI", "largest share"],
        [[s.level, s.k, draw.fmt(s.purity), draw.fmt(s.nmi), f"{s.largest_share:.0%}"] for s in latest],
        numeric=(1, 2, 3, 4),
    )
    hist_rows = [[s.epoch, s.level, s.k, draw.fmt(s.purity), draw.fmt(s.nmi), f"{s.largest_share:.0%}"]
                 for s in history]  # fmt: skip
    body = (
        f'<p class="note">Run <code>{draw.html_escape(run.run_dir)}</code>, prototypes of epoch {epoch + 1} '
        f"(1-based), {len(records)} training clips of <code>{draw.html_escape(manifest)}</code>. Purity: share of "
        "labelled clips that carry their prototype's majority label; NMI: normalised mutual information "
        "between prototypes and first labels. Exemplars are the members nearest each prototype.</p>"
        + summary
        + "".join(sections)
        + f'<h2>Over the epochs</h2><p><img src="{evo.name}" alt="purity, NMI and cluster sizes per epoch"></p>'
        + draw.html_table(["epoch", "granularity", "prototypes", "purity", "NMI", "largest share"], hist_rows,
                          numeric=(0, 1, 2, 3, 4, 5))  # fmt: skip
    )
    html = draw.write_html(out_dir / "index.html", f"Prototypes of {run.run_dir.name}", body)
    return PrototypeReport(html=html, pngs=pngs, levels=latest, history=history)
