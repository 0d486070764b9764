"""Running models over a manifest: clip scores of a classifier, clip features of a backbone.

**Clip scores** (``clip_scores``): a clip's score is its class probabilities averaged over its
frames. Each frame is one forward pass (the clip's audio with that frame), its logits go
through the task's activation -- sigmoid per class for ``multi_hot`` (AudioSet), softmax over
classes for ``single`` (VGGSound) -- and the K probability vectors are averaged: CAV-MAE's
multi-frame evaluation, which averages ``sigmoid`` / ``softmax`` outputs rather than logits.
With the dataset's ``frames="all"`` K is ``data.video.n_frames`` (10); with ``"middle"`` (or a
frame index) K is 1 and the score is that frame's probabilities.

**Clip features** (``clip_features``): the unmasked backbone of a pre-training checkpoint:

- ``z_a``, ``z_v``: the clip embeddings of the contrastive space (what pre-training aligned),
  used for retrieval;
- ``joint``: the mean-pooled joint-layer output of the audio+video stream (what a fine-tuned
  ``av`` head reads);
- ``audio``, ``video``: the mean-pooled joint-layer outputs of each modality's own stream,
  before the projection.

With several frames per clip, the audio side is computed once and every frame-dependent
feature is averaged over the frames.

Rows are in manifest order (the batch's ``index``), whatever order the loader yields. The
loaders' batches are compact samples (``AudioVisualDataset(compact=True)``), normalised on the
device by ``model_inputs`` with the recipe's ``data`` statistics.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from pcavmae_cli.engine.data.model_inputs import model_inputs
from pcavmae_cli.engine.evaluate.metrics import LabelMode
from pcavmae_cli.engine.model.backbone import Backbone
from pcavmae_cli.engine.model.embed import audio_image
from pcavmae_cli.engine.schema import DataConfig
from pcavmae_cli.engine.train.runtime import Runtime

FEATURES = ("z_a", "z_v", "joint", "audio", "video")


def activation(logits: Tensor, label_mode: LabelMode) -> Tensor:
    """Logits ``(..., C)`` -> probabilities: sigmoid (``multi_hot``) or softmax over C (``single``)."""
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if label_mode == "single" else torch.sigmoid(logits)


def _frames_5d(frames: Tensor) -> Tensor:
    """``(B, 3, S, S)`` (one frame per clip) or ``(B, K, 3, S, S)`` -> ``(B, K, 3, S, S)``."""
    return frames.unsqueeze(1) if frames.dim() == 4 else frames


@torch.no_grad()
def clip_scores(
    model: nn.Module,
    loader: DataLoader,
    label_mode: LabelMode,
    rt: Runtime,
    advance: Callable[..., None] = lambda n=1, note="": None,
    *,
    data: DataConfig,
    rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Frame-averaged class probabilities of every clip, and the clips' label targets.

    Args:
        model: has ``frame_logits(fbank (B, T, F), frames (B, K, 3, S, S)) -> (B, K, C)``
            (``Classifier``); it is put in eval mode.
        loader: batches of compact samples with ``fbank``, ``frames``, ``label`` and ``index``.
        data: the recipe's ``data`` section, whose statistics normalise them.
        rows: N, the manifest's clips, when ``loader`` holds only some of them (a ``Subset``: a
            rank's shard in fine-tuning's validation): its clips fill their rows (the batch's
            ``index``), the others stay zero. Default: ``len(loader.dataset)``.
    Returns:
        scores ``(N, C)`` float32 on the CPU; targets ``(N, C)`` multi-hot or ``(N,)`` indices;
        ``None, None`` for a loader without batches.
    """
    model.eval()
    n = len(loader.dataset) if rows is None else rows
    scores = targets = None
    with rt.autocast():  # one context for all batches: autocast casts each weight once, not per batch
        for batch in loader:
            inputs = model_inputs(batch, data, rt.device)
            logits = model.frame_logits(inputs["fbank"], _frames_5d(inputs["frames"]))  # (B, K, C)
            probs = activation(logits, label_mode).mean(dim=1).cpu()  # (B, C): the mean over frames
            label = batch["label"]
            if scores is None:
                scores = torch.zeros(n, probs.shape[1])
                targets = torch.zeros((n, *label.shape[1:]), dtype=label.dtype)
            index = batch["index"]
            scores[index], targets[index] = probs, label
            advance(1)
    return scores, targets


def backbone_features(backbone: Backbone, fbank: Tensor, frames: Tensor) -> dict[str, Tensor]:
    """The unmasked features of a batch (module docstring): fbank ``(B, T, F)``, frames
    ``(B, K, 3, S, S)`` -> ``{name: (B, width)}``, frame-dependent ones averaged over K."""
    B, K = frames.shape[:2]
    bb = backbone
    a = bb.encoder_a(bb.encoder_a.embed(audio_image(fbank)))  # (B, N_a, D)
    v = bb.encoder_v(bb.encoder_v.embed(frames.flatten(0, 1)))  # (B K, N_v, D)
    pooled_a = bb.joint(a, "a").mean(dim=1)  # (B, D)
    pooled_v = bb.joint(v, "v").mean(dim=1)  # (B K, D)
    joint = bb.joint(torch.cat([a.repeat_interleave(K, dim=0), v], dim=1), "av").mean(dim=1)
    z_a = F.normalize(bb.proj_a(pooled_a), dim=-1)
    z_v = F.normalize(bb.proj_v(pooled_v), dim=-1)

    def per_clip(x: Tensor) -> Tensor:  # (B K, W) -> (B, W)
        return x.view(B, K, -1).mean(dim=1)

    return {"z_a": z_a, "z_v": per_clip(z_v), "joint": per_clip(joint), "audio": pooled_a, "video": per_clip(pooled_v)}


@torch.no_grad()
def clip_features(
    backbone: Backbone,
    loader: DataLoader,
    rt: Runtime,
    advance: Callable[..., None] = lambda n=1, note="": None,
    *,
    data: DataConfig,
    rows: int | None = None,
    first_row: int = 0,
    check: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """``backbone_features`` of every clip of ``loader``'s dataset (compact samples, normalised
    with ``data``'s statistics): ``{name: (N, width)}`` float32, CPU.

    ``rows``: the height of the matrices when the loader holds a shard of a manifest (a clip's
    row is its manifest row minus ``first_row``, other rows stay zero); default the dataset's
    length. ``check`` runs before each batch (``StopRequests.check``: Ctrl-C stops within a batch)."""
    backbone.eval()
    n = len(loader.dataset) if rows is None else rows
    out: dict[str, Tensor] = {}
    with rt.autocast():  # one context for all batches: autocast casts each weight once, not per batch
        for batch in loader:
            if check is not None:
                check()
            inputs = model_inputs(batch, data, rt.device)
            feats = backbone_features(backbone, inputs["fbank"], _frames_5d(inputs["frames"]))
            index = batch["index"] - first_row
            for name, value in feats.items():
                if name not in out:
                    out[name] = torch.zeros(n, value.shape[1])
                out[name][index] = value.float().cpu()
            advance(1)
    return out
