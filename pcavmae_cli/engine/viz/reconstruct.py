"""Masked inputs and their reconstructions (eq. 4), for a few clips.

For each clip, two rows of four panels: the middle frame and the spectrogram as the model
gets them (input), with the masked patches greyed out (masked, the recipe's mask ratios), as
the decoder predicts every patch (reconstruction), and with the visible patches pasted back
over the prediction (reconstruction + visible, MAE's visualisation).

With ``model.norm_pix_loss`` the decoder predicts each patch standardised by its own mean and
variance; to draw it, each predicted patch gets the input patch's mean and standard deviation
back (as MAE's demo does). That borrows two numbers per patch from the input, so such a
reconstruction looks better than what the decoder knows; the figure says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model import PCAVMAE
from pcavmae_cli.engine.model.embed import audio_image, patchify, unpatchify
from pcavmae_cli.engine.schema import DataConfig
from pcavmae_cli.engine.viz import draw
from pcavmae_cli.engine.viz.run import RunView, display, evenly_spaced, resolve_device

COLUMNS = ("input", "masked", "reconstruction", "reconstruction + visible")


@dataclass
class Reconstruction:
    """One clip's images: ``frames`` / ``specs`` hold the four columns of ``COLUMNS``."""

    clip_id: str
    label: str
    frames: list[np.ndarray]  # (S, S, 3) in [0, 1]; masked patches grey
    specs: list[np.ndarray]  # (F, T); masked patches NaN
    mask_ratio_a: float
    mask_ratio_v: float


def _denormalise(pred: torch.Tensor, target_raw: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Predicted patches in the input's units: undo the per-patch standardisation of the targets."""
    if not norm_pix:
        return pred
    mean = target_raw.mean(dim=-1, keepdim=True)
    std = (target_raw.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
    return pred * std + mean


def _columns(raw: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, p: int, grid: tuple[int, int], chans: int,
             fill: torch.Tensor) -> list[torch.Tensor]:  # fmt: skip
    """raw/pred patches (N, p*p*C), mask (N,) -> input, masked, reconstruction, pasted images (C, H, W).

    Masked patches of the second image take the values ``fill`` (broadcast to a patch row).
    """
    m = mask[:, None].bool()
    masked = torch.where(m, fill.to(raw).expand_as(raw), raw)
    pasted = torch.where(m, pred, raw)
    return [unpatchify(x[None], p, grid, chans)[0] for x in (raw, masked, pred, pasted)]


@torch.no_grad()
def reconstruct_clips(
    model: PCAVMAE, dataset: AudioVisualDataset, indices: Sequence[int], device: torch.device, seed: int = 0
) -> list[Reconstruction]:
    """Mask, encode and decode each clip (middle frame) with the recipe's mask ratios; seeded masks."""
    cfg, data = model.cfg, dataset.cfg
    p = cfg.patch_size
    grid_a = model.backbone.encoder_a.patch_embed.grid
    grid_v = model.backbone.encoder_v.patch_embed.grid
    torch.manual_seed(seed)
    out = []
    for i in indices:
        sample = dataset[i]
        fbank, frame = sample["fbank"][None].to(device), sample["frames"][None].to(device)
        enc = model.forward_encoder(fbank, frame, cfg.mask_ratio_audio, cfg.mask_ratio_video)
        dec = model.forward_decoder(enc)
        raw_a, raw_v = patchify(audio_image(fbank), p)[0], patchify(frame, p)[0]
        pred_a = _denormalise(dec.pred_a[0].float(), raw_a, cfg.norm_pix_loss)
        pred_v = _denormalise(dec.pred_v[0].float(), raw_v, cfg.norm_pix_loss)
        specs = _columns(raw_a, pred_a, enc.mask_a[0], p, grid_a, 1, torch.tensor(float("nan")))
        # Mid grey in normalised units; patch rows are (row, column, channel), channel fastest.
        grey = (0.5 - torch.tensor(data.video.mean)) / torch.tensor(data.video.std)
        pics = _columns(raw_v, pred_v, enc.mask_v[0], p, grid_v, 3, grey.repeat(p * p))
        record = dataset.records[i]
        out.append(Reconstruction(
            clip_id=record.id,
            label=record.labels[0] if record.labels else "",
            frames=[draw.frame_image(x, data) for x in pics],
            specs=[x[0].cpu().numpy() for x in specs],
            mask_ratio_a=cfg.mask_ratio_audio,
            mask_ratio_v=cfg.mask_ratio_video,
        ))  # fmt: skip
    return out


def reconstruction_figure(
    items: Sequence[Reconstruction], data: DataConfig, out: str | Path, *, names: dict[str, str] | None = None,
    norm_pix: bool = False, title: str = "Masked inputs and reconstructions",
) -> Path:  # fmt: skip
    """A grid: per clip a row of frames and a row of spectrograms, four columns each."""
    if not items:
        raise UserError("no clips to reconstruct")
    names = names or {}
    frame_h, spec_h, head = 3.4, 2.0, 0.45
    height = len(items) * (frame_h + spec_h + head) + 1.5
    fig = draw.new_figure(15, height)
    ratios = []
    for _ in items:
        ratios += [head, frame_h, spec_h]
    grid = fig.add_gridspec(len(ratios), 4, height_ratios=ratios, hspace=0.35, wspace=0.08,
                            left=0.05, right=0.99, top=1 - 0.75 / height, bottom=0.75 / height)  # fmt: skip
    for r, item in enumerate(items):
        label = display(item.label, names) if item.label else "unlabelled"
        header = fig.add_subplot(grid[3 * r, :])
        header.axis("off")
        header.text(0, 0.1, f"{item.clip_id}  ({label})", fontsize=12, fontweight="bold", va="bottom")
        vrange = draw.spectrogram_range(item.specs[0])
        for c, name in enumerate(COLUMNS):
            ratio = {1: f" ({item.mask_ratio_v:.0%} of patches)"}.get(c, "")
            draw.show_frame(fig.add_subplot(grid[3 * r + 1, c]), item.frames[c], f"frame: {name}{ratio}")
            ratio = {1: f" ({item.mask_ratio_a:.0%})"}.get(c, "")
            draw.show_spectrogram(fig.add_subplot(grid[3 * r + 2, c]), item.specs[c], data,
                                  title=f"spectrogram: {name}{ratio}", vrange=vrange, axes_labels=c == 0)  # fmt: skip
    note = "  (norm_pix_loss: each predicted patch drawn with the input patch's mean and std)" if norm_pix else ""
    fig.suptitle(title + note, fontsize=13)
    return draw.save(fig, out)


def reconstruct_for_run(
    run: RunView,
    manifest: str | Path | None = None,
    out: str | Path | None = None,
    *,
    clips: Sequence[str] | None = None,
    n: int = 3,
    device: str = "auto",
    seed: int = 0,
) -> Path:
    """Reconstruct ``n`` clips (evenly spaced) or the named ``clips`` of ``manifest`` (default: the run's eval
    manifest, else its train manifest)."""
    if n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    manifest = manifest or run.cfg.data.eval_manifest or run.cfg.data.train_manifest
    if manifest is None:
        raise UserError("pass --data MANIFEST: the run's recipe names no manifest")
    dev = resolve_device(device)
    model, _ = run.load_model(dev)
    dataset = AudioVisualDataset(manifest, run.cfg.data, frames="middle")
    if clips:
        ids = {r.id: i for i, r in enumerate(dataset.records)}
        missing = [c for c in clips if c not in ids]
        if missing:
            raise UserError(f"clip {missing[0]!r} is not in {manifest}")
        indices = [ids[c] for c in clips]
    else:
        indices = evenly_spaced(len(dataset), n)
    items = reconstruct_clips(model, dataset, indices, dev, seed)
    where = "/".join(Path(manifest).parts[-2:])
    title = f"Masked inputs and reconstructions: {run.run_dir.name}, clips of {where}"
    out = Path(out) if out is not None else run.plots / "reconstruct.png"
    return reconstruction_figure(items, run.cfg.data, out, names=run.label_names(),
                                 norm_pix=run.cfg.model.norm_pix_loss, title=title)  # fmt: skip
