"""``pcav visualize`` figures drawn during pre-training, at chosen epochs.

Every ``validation.figures_every_epochs``-th epoch that is validated, the trainer draws two
figures of the model as that epoch leaves it, from the validation's own clips and features (no
extra embedding pass): the t-SNE of the eval clips' z_a, z_v and joint embeddings with this
epoch's finest prototypes (``viz/tsne.tsne_figure``), and masked inputs with their
reconstructions for a few eval clips (``viz/reconstruct``). They are written to
``RUN/plots/epochNNNN/`` (the epoch's number) and, with TensorBoard on, added as images
(``figures/tsne``, ``figures/reconstruct``) at the epoch's last step, so the representation can
be watched forming. Drawing uses its own random state (``torch.random.fork_rng``): the training's
masks and resume are untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.model import PCAVMAE
from pcavmae_cli.engine.prototypes.step import Prototypes, joint_embedding
from pcavmae_cli.engine.schema import DataConfig

MAX_TSNE_CLIPS = 1000  # evenly spaced eval clips: the exact t-SNE stays a few seconds
RECONSTRUCTED_CLIPS = 2


def epoch_folder(run_dir: Path, epoch: int) -> Path:
    """``RUN/plots/epochNNNN`` for epoch index ``epoch`` (named by its number, ``epoch + 1``)."""
    return run_dir / "plots" / f"epoch{epoch + 1:04d}"


def draw_epoch_figures(
    model: PCAVMAE,
    data: DataConfig,
    feats: dict[str, Tensor],
    prototypes: list[Prototypes] | None,
    names: dict[str, str],
    out_dir: Path,
    epoch: int,
) -> dict[str, Path]:
    """Draw the t-SNE and reconstruction figures into ``out_dir``; returns ``{name: png}``.

    Args:
        model: the model being trained (put in eval mode for the drawing, then restored).
        data: the recipe's data section; its ``eval_manifest`` holds the clips.
        feats: the validation's features of every eval clip (``z_a``, ``z_v``).
        names: label id -> display name (the run's label CSV; fixes the class colours too).
        epoch: the epoch index (0-based), for the titles.
    """
    from pcavmae_cli.engine.viz.reconstruct import reconstruct_clips, reconstruction_figure
    from pcavmae_cli.engine.viz.run import evenly_spaced
    from pcavmae_cli.engine.viz.tsne import tsne_figure

    dataset = AudioVisualDataset(data.eval_manifest, data, frames="middle")
    device = next(model.parameters()).device
    rows = evenly_spaced(len(dataset), MAX_TSNE_CLIPS)
    z_a, z_v = feats["z_a"][rows], feats["z_v"][rows]
    labels = [list(dataset.records[i].labels) for i in rows]
    finest = prototypes[-1] if prototypes else None
    out: dict[str, Path] = {}
    was_training = model.training
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        model.eval()
        try:
            note = f", prototypes K={finest.centroids.shape[0]}" if finest is not None else ""
            out["tsne"] = tsne_figure(
                {"audio": z_a, "video": z_v, "joint": joint_embedding(z_a, z_v)}, labels, out_dir / "tsne.png",
                prototypes=None if finest is None else finest.to("cpu"), names=names,
                title=f"t-SNE of {len(rows)} eval clips, model after epoch {epoch + 1}{note}",
            ).path  # fmt: skip
            picked = evenly_spaced(len(dataset), RECONSTRUCTED_CLIPS)
            items = reconstruct_clips(model, dataset, picked, device, seed=0)
            out["reconstruct"] = reconstruction_figure(
                items, dataset.cfg, out_dir / "reconstruct.png", names=names, norm_pix=model.cfg.norm_pix_loss,
                title=f"Masked inputs and reconstructions after epoch {epoch + 1}",
            )  # fmt: skip
        finally:
            model.train(was_training)
    return out

