"""The M-step losses: eq. 1 (L_PJE), eq. 3 (L_PCPE), eq. 4 (L_r) and CAV-MAE's InfoNCE.

Pure functions on tensors. Embeddings are expected L2-normalised (the model normalises its
clip embeddings); prototypes come from ``engine.prototypes.step`` and are detached here, so
gradients reach the embeddings only. Every loss runs in fp32 with autocast switched off, so
it gives the same value inside a bf16 autocast region; cross-entropies go through
``F.cross_entropy`` (log-softmax), never an explicit exp.

Readings of the paper (METHOD_NOTES, Losses; docs/method.md):
- The ``1 / tau`` in front of eq. 1 and eq. 3 is not applied: tau enters as the mean of the
  gammas (PCL's normalisation), and a constant factor would only rescale the loss weight.
- Negatives are the other prototypes of the same granularity: all of them, or PCL's r sampled
  ones (``num_negatives``) next to the batch's positives, each prototype listed once.
- L_PJE and L_PCPE average over granularities; L_PJE also over its audio and video terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.prototypes.step import Prototypes
from pcavmae_cli.engine.schema import LossConfig


@contextmanager
def _fp32(device: torch.device):
    """Autocast off: matmuls inside run in the dtype of their (fp32) inputs."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def infonce(z_a: Tensor, z_v: Tensor, temperature: float) -> Tensor:
    """CAV-MAE's symmetric cross-modal InfoNCE on a batch of paired clip embeddings.

    ``S = z_a z_v^T / temperature`` (B, B); audio->video is the cross-entropy of each row of S
    to its diagonal entry, video->audio that of each column; the loss is their mean.

    Args:
        z_a, z_v: (B, D) L2-normalised audio and video embeddings; row i of both is clip i.
        temperature: the instance temperature (METHOD_NOTES: tau).
    """
    with _fp32(z_a.device):
        sim = z_a.float() @ z_v.float().T / temperature  # (B, B)
        target = torch.arange(sim.shape[0], device=sim.device)
        return (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2


def select_prototypes(
    labels: Tensor, k: int, num_negatives: int | None, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """The prototype columns the batch's logits use, and each clip's target column.

    PCL: the batch's positive prototypes plus ``num_negatives`` (r) prototypes sampled from the
    rest. Each prototype appears once (PCL lists a positive once per clip, so a clip would meet
    its own prototype again as a "negative" whenever two clips of a batch share it). With
    ``num_negatives`` None or 0, or not fewer than the non-positive prototypes, all K are used.

    Sampling needs the number of distinct positives on the host (``torch.unique``, then a draw
    from the rest), a read of the device per call; without it nothing is read, so the default
    (all K) returns before ``unique``.

    Args:
        labels: (B,) assigned prototype of each clip.
    Returns:
        columns (C,) int64 prototype ids and targets (B,) positions of ``labels`` in columns.
    """
    if not num_negatives:
        return torch.arange(k, device=labels.device), labels
    positives = torch.unique(labels)  # sorted
    rest = k - positives.numel()
    if num_negatives >= rest:
        return torch.arange(k, device=labels.device), labels
    is_positive = torch.zeros(k, dtype=torch.bool, device=labels.device)
    is_positive[positives] = True
    pool = (~is_positive).nonzero().squeeze(1)
    pick = torch.randperm(rest, generator=generator)[:num_negatives].to(labels.device)
    columns = torch.cat([positives, pool[pick]])
    return columns, torch.searchsorted(positives, labels)


def pje_loss(
    z_a: Tensor,
    z_v: Tensor,
    protos_list: Sequence[Prototypes],
    clip_indices: Tensor,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_PJE, eq. 1: cross-modal ProtoNCE of the visible-token clip embeddings.

    For each granularity m, logits ``z . p_k / gamma_k`` over the selected prototypes
    (``select_prototypes``) and the cross-entropy to the clip's assigned prototype; the audio
    and video terms are averaged, then the M granularities. Both modalities are pulled to the
    same *joint* prototype (eq. 1 writes audio embeddings against video-side prototypes; the
    prototypes are found on the joint embedding, METHOD_NOTES).

    Args:
        z_a, z_v: (B, D) L2-normalised clip embeddings of the visible tokens.
        protos_list: one ``Prototypes`` per granularity.
        clip_indices: (B,) row of each clip in the E-step's embedding (``assignments``).
        num_negatives: r sampled negatives per granularity; None or 0: all prototypes.
        generator: the sampling RNG (CPU), for reproducible negatives.
    """
    with _fp32(z_a.device):
        za, zv = z_a.float(), z_v.float()
        terms = []
        for protos in protos_list:
            centroids = protos.centroids.detach().to(za.device, torch.float32)
            gamma = protos.gamma.detach().to(za.device, torch.float32)
            labels = protos.assignments.to(za.device)[clip_indices.to(za.device)]
            k = centroids.shape[0]
            columns, target = select_prototypes(labels, k, num_negatives, generator)
            p, g = centroids[columns], gamma[columns]
            audio = F.cross_entropy(za @ p.T / g, target)
            video = F.cross_entropy(zv @ p.T / g, target)
            terms.append((audio + video) / 2)
        return torch.stack(terms).mean()


def pcpe_loss(
    zd_a: Tensor,
    zd_v: Tensor,
    protos_list: Sequence[Prototypes],
    clip_indices: Tensor,
    num_negatives: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L_PCPE, eq. 3: prototype contrast of the decoder's masked-token embeddings.

    For each granularity, ``logit_k = (zd_a . p_a,k + zd_v . p_v,k) / gamma_k`` with p_a,k / p_v,k
    the (normalised) audio / video member means of joint cluster k; cross-entropy to the clip's
    assigned prototype; averaged over granularities. Negatives as in ``pje_loss``.

    Args:
        zd_a, zd_v: (B, D) L2-normalised projections of the mean-pooled decoder outputs at the
            masked audio / video positions.
    """
    with _fp32(zd_a.device):
        za, zv = zd_a.float(), zd_v.float()
        terms = []
        for protos in protos_list:
            p_a = protos.p_a.detach().to(za.device, torch.float32)
            p_v = protos.p_v.detach().to(za.device, torch.float32)
            gamma = protos.gamma.detach().to(za.device, torch.float32)
            labels = protos.assignments.to(za.device)[clip_indices.to(za.device)]
            columns, target = select_prototypes(labels, p_a.shape[0], num_negatives, generator)
            logits = (za @ p_a[columns].T + zv @ p_v[columns].T) / gamma[columns]
            terms.append(F.cross_entropy(logits, target))
        return torch.stack(terms).mean()


def reconstruction_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """One modality's term of eq. 4: MSE over the masked patches only.

    The squared error is averaged over each patch's P values, then over the masked patches of
    the whole batch (MAE). Eq. 4 writes plain sums; means keep the loss independent of the
    patch count and size. L_r adds the audio and the video term (eq. 4's sum, as CAV-MAE's
    ``loss_mae_a + loss_mae_v``), so each modality keeps the same weight whatever its patches.

    Args:
        pred, target: (B, L, P) predicted and true patches; the model normalises the targets per
            patch when ``model.norm_pix_loss`` is on (MAE's norm_pix_loss, ``PCAVMAE.targets``).
        mask: (B, L), 1 (True) where the patch was masked, 0 where visible.
    """
    with _fp32(pred.device):
        per_patch = (pred.float() - target.float()).square().mean(dim=-1)  # (B, L)
        mask = mask.to(per_patch.dtype)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1)


def loss_weights(cfg: LossConfig) -> dict[str, float]:
    """The weight of each named loss part: pje (eq. 1), pcpe (eq. 3), r (eq. 4), infonce."""
    return {"pje": cfg.w_pje, "pcpe": cfg.w_pcpe, "r": cfg.w_r, "infonce": cfg.w_infonce}


def total_loss(
    parts: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``sum_name weights[name] * parts[name]`` and the detached parts (plus ``total``) to log.

    ``parts`` holds the losses computed this step (e.g. no pcpe / r in the encoder-only stage);
    every one needs a weight. A part of weight 0 is logged but left out of the sum.
    """
    unknown = set(parts) - set(weights)
    if unknown:
        raise KeyError(f"loss parts without a weight: {sorted(unknown)}")
    terms = [weights[name] * value.float() for name, value in parts.items() if weights[name] != 0]
    total = torch.stack(terms).sum() if terms else torch.zeros(())
    logged = {name: value.detach().float() for name, value in parts.items()}
    logged["total"] = total.detach()
    return total, logged
