"""t-SNE of clip embeddings coloured by class, with prototypes overlaid (the paper's Figure 2).

Three panels: the audio embeddings z_a, the video embeddings z_v and the joint embedding
normalise(z_a + z_v) that the E-step clusters, all from the momentum encoder on the middle
frame (the space and the view the prototypes were computed in). Each panel is its own t-SNE
(scikit-learn, cosine metric, PCA initialisation, seeded). Prototypes are embedded together with
the clips, since t-SNE cannot place new points afterwards: p_a on the audio panel, p_v on the
video panel and the joint prototypes p^m on the joint panel, drawn as black stars.

Clips are coloured by their first label; beyond ``max_classes`` classes the rarer ones are grey
("other classes"), and unlabelled clips are grey too.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.manifold import TSNE

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.prototypes import Prototypes
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.run import RunView, display, embed_clips, evenly_spaced, resolve_device

PANELS = (("audio", "audio  z_a", "p_a"), ("video", "video  z_v", "p_v"), ("joint", "joint  normalise(z_a + z_v)", "centroids"))


@dataclass
class TsneResult:
    path: Path
    n_clips: int
    n_prototypes: int
    classes: list[str]


EXACT_UP_TO = 1000  # points: the exact O(N^2) gradient is faster than Barnes-Hut below this


def tsne_2d(x: np.ndarray, seed: int) -> np.ndarray:
    """(N, D) -> (N, 2); perplexity min(30, (N - 1) / 3), as t-SNE needs perplexity < N."""
    n = x.shape[0]
    if n < 3:
        raise UserError(f"t-SNE needs at least 3 clips, got {n}")
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    method = "exact" if n <= EXACT_UP_TO else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed, method=method)
    return tsne.fit_transform(x)


def tsne_figure(
    embeddings: dict[str, torch.Tensor],
    labels: list[list[str]],
    out: str | Path,
    *,
    prototypes: Prototypes | None = None,
    names: dict[str, str] | None = None,
    title: str = "t-SNE of clip embeddings",
    max_classes: int = 20,
    seed: int = 0,
) -> TsneResult:
    """Draw the three t-SNE panels; ``embeddings`` maps audio/video/joint to (N, D) tensors."""
    names = names or {}
    first = [ls[0] if ls else None for ls in labels]
    counts = Counter(lab for lab in first if lab is not None)
    shown = [lab for lab, _ in sorted(counts.items(), key=lambda t: (-t[1], display(t[0], names)))][:max_classes]
    shown.sort(key=lambda lab: display(lab, names))
    colours = draw.class_palette(list(names), shown)  # label-CSV order: one colour per class in a run
    point_colours = [colours.get(lab, draw.OTHER_COLOUR) for lab in first]
    n = len(labels)

    fig = draw.new_figure(18, 7.6)
    axes = fig.subplots(1, 3)
    k = 0
    for ax, (key, panel_title, proto_field) in zip(axes, PANELS):
        x = embeddings[key].float().cpu().numpy()
        protos = getattr(prototypes, proto_field).float().cpu().numpy() if prototypes is not None else None
        k = 0 if protos is None else protos.shape[0]
        xy = tsne_2d(np.concatenate([x, protos]) if protos is not None else x, seed)
        ax.scatter(xy[:n, 0], xy[:n, 1], c=point_colours, s=28 if n < 500 else 8, alpha=0.85, linewidths=0)
        if protos is not None:
            sizes = 80 + 220 * (prototypes.counts.float() / prototypes.counts.max()).cpu().numpy()
            ax.scatter(xy[n:, 0], xy[n:, 1], marker="*", s=sizes, c="black", edgecolors="white", linewidths=0.8)
            if k <= 20:
                for i, (px, py) in enumerate(xy[n:]):
                    ax.annotate(f"P{i}", (px, py), xytext=(4, 4), textcoords="offset points", fontsize=8,
                                bbox={"facecolor": "white", "alpha": 0.6, "pad": 0.5, "edgecolor": "none"})  # fmt: skip
        ax.set_title(panel_title)
        ax.set_xlabel("t-SNE 1")
        ax.set_ylabel("t-SNE 2")
        ax.set_xticks([])
        ax.set_yticks([])

    handles = [
        draw.plt.Line2D([], [], marker="o", linestyle="", color=colours[lab], markersize=8,
                        label=f"{display(lab, names)} ({counts[lab]})")
        for lab in shown
    ]  # fmt: skip
    rest = sum(1 for lab in first if lab not in colours)
    if rest:
        what = "other classes / unlabelled" if counts else "unlabelled"
        handles.append(draw.plt.Line2D([], [], marker="o", linestyle="", color=draw.OTHER_COLOUR, markersize=8,
                                       label=f"{what} ({rest})"))  # fmt: skip
    if prototypes is not None:
        handles.append(draw.plt.Line2D([], [], marker="*", linestyle="", color="black", markersize=12,
                                       label=f"prototype ({k}; size ~ members)"))  # fmt: skip
    ncol = min(len(handles), 5)
    rows = -(-len(handles) // max(ncol, 1))
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=10)
    fig.suptitle(title)
    fig.subplots_adjust(left=0.03, right=0.99, top=0.88, bottom=0.06 + 0.045 * rows, wspace=0.12)
    path = draw.save(fig, out)
    return TsneResult(path, n, k, [display(lab, names) for lab in shown])


def tsne_for_run(
    run: RunView,
    manifest: str | Path,
    out: str | Path | None = None,
    *,
    level: int | None = None,
    overlay: bool = True,
    max_clips: int | None = 2000,
    device: str = "auto",
    seed: int = 0,
) -> TsneResult:
    """Embed ``manifest`` with the run's momentum encoder and draw the t-SNE figure.

    Args:
        level: which granularity's prototypes to overlay (default: the finest, the last).
        overlay: ``False`` draws no prototypes (also when the run has none).
        max_clips: embed at most this many clips, evenly spaced over the manifest.
    """
    dev = resolve_device(device)
    _, momentum = run.load_model(dev)
    dataset = AudioVisualDataset(manifest, run.cfg.data, frames="middle")
    indices = evenly_spaced(len(dataset), max_clips)
    emb = embed_clips(momentum, dataset, indices, dev)
    labels = [list(dataset.records[i].labels) for i in indices]
    protos, note = None, ""
    if overlay and run.prototype_epochs():
        epoch, levels = run.latest_prototypes()
        level = len(levels) - 1 if level is None else level
        if not 0 <= level < len(levels):
            raise UserError(f"--level {level}: the run has granularities 0..{len(levels) - 1}")
        protos = levels[level]
        note = f"; prototypes of epoch {epoch + 1}, granularity {level} (K={protos.centroids.shape[0]})"
    out = Path(out) if out is not None else run.plots / "tsne.png"
    where = "/".join(Path(manifest).parts[-2:])
    title = f"t-SNE of {len(indices)} clips of {where}, momentum encoder of {run.run_dir.name}{note}"
    return tsne_figure(
        {"audio": emb.audio, "video": emb.video, "joint": emb.joint}, labels, out,
        prototypes=protos, names=run.label_names(), title=title, seed=seed,
    )  # fmt: skip
