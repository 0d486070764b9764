"""The M-step objective of one batch: the loss parts a stage asks for, and their weighted sum.

A part is computed only when it counts: InfoNCE when ``w_infonce != 0``; L_r (eq. 4, audio term
+ video term) when ``w_r != 0``; L_PJE (eq. 1) and L_PCPE (eq. 3) when their weight is non-zero
*and* prototypes exist for this epoch (after ``prototypes.warmup_epochs``). The decoder runs only
when L_r or L_PCPE is computed, so the encoder-only stage never touches it. Parts that are not
computed are absent from the result (and ``null`` in ``metrics.jsonl``). A (global) batch of one
clip has no negatives: its InfoNCE (log 1 = 0, no gradient) is not logged, so the logged means
are those of the batches where it measures something (``metrics.Meter``).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import Tensor

from pcavmae_cli.engine.losses import infonce, loss_weights, pcpe_loss, pje_loss, reconstruction_loss, total_loss
from pcavmae_cli.engine.model import PCAVMAE
from pcavmae_cli.engine.model.masking import global_batch_rows
from pcavmae_cli.engine.prototypes import Prototypes
from pcavmae_cli.engine.schema import LossConfig
from pcavmae_cli.engine.train.distributed import BatchShard
from pcavmae_cli.engine.train.replicas import Replicas
from pcavmae_cli.engine.train.runtime import Runtime


def decodes(loss: LossConfig, prototypes_on: bool) -> bool:
    """Whether a batch of this stage needs the decoder (L_r, or L_PCPE once prototypes exist)."""
    return loss.w_r != 0 or pools(loss, prototypes_on)


def pools(loss: LossConfig, prototypes_on: bool) -> bool:
    """Whether a batch needs the decoder's pooled projections zd_a, zd_v (L_PCPE)."""
    return loss.w_pcpe != 0 and prototypes_on


def batch_losses(
    model: PCAVMAE,
    batch: dict[str, Tensor],
    loss: LossConfig,
    protos: Sequence[Prototypes] | None,
    rt: Runtime,
    shard: BatchShard | None = None,
    replicas: Replicas | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward one batch and compute its losses.

    Args:
        batch: ``fbank`` (B, T, F), ``frames`` (B, 3, S, S), ``index`` (B,) manifest rows, on device.
        loss: the stage's loss weights and settings.
        protos: this epoch's prototypes (one per granularity), or ``None`` (warm-up, no prototypes).
        shard: under DDP, this rank's slice of the global batch: the masks are this slice of the
            global batch's, the contrastive losses (InfoNCE, eq. 1, eq. 3) see the gathered
            global batch, and L_r (per clip) is weighted by ``shard.local_weight``.
        replicas: in one CPU process, threads that run the forward pass in slices of the batch
            (``replicas.py``); the losses are this batch's all the same. The caller runs
            ``replicas.backward()`` after the loss's ``backward``.

    Returns:
        the weighted total to back-propagate, and the detached parts to log (``total`` included;
        ``r_a`` and ``r_v`` next to their sum ``r``); under DDP the logged parts are this rank's
        view (global-batch contrastive parts, local L_r), whose clip-weighted mean over ranks is
        the global batch's.
    """
    on = protos is not None
    rows = nullcontext() if shard is None else global_batch_rows(shard.start, shard.total)
    if replicas is not None:
        out = replicas.forward(batch, rt, decode=decodes(loss, on), pool_decoder=pools(loss, on))
    else:
        with rt.autocast(), rows:
            out = model(batch["fbank"], batch["frames"], decode=decodes(loss, on), pool_decoder=pools(loss, on))
    whole = (lambda t: t) if shard is None else shard.gather
    index = whole(batch["index"])
    parts: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    if loss.w_infonce != 0 or (on and loss.w_pje != 0):
        z_a, z_v = whole(out.z_a), whole(out.z_v)  # (B_global, D) under DDP
    if loss.w_infonce != 0:
        parts["infonce"] = infonce(z_a, z_v, loss.infonce_temperature)
    if loss.w_r != 0:
        extra["r_a"] = reconstruction_loss(out.pred_a, out.target_a, out.mask_a)
        extra["r_v"] = reconstruction_loss(out.pred_v, out.target_v, out.mask_v)
        parts["r"] = extra["r_a"] + extra["r_v"]
    if on and loss.w_pje != 0:
        parts["pje"] = pje_loss(z_a, z_v, protos, index, loss.num_negatives)
    if on and loss.w_pcpe != 0:
        parts["pcpe"] = pcpe_loss(whole(out.zd_a), whole(out.zd_v), protos, index, loss.num_negatives)
    weights = loss_weights(loss)
    total, logged = total_loss(parts, weights)
    if "infonce" in parts and z_a.shape[0] < 2:  # no negatives: log 1 = 0 says nothing, so it is not logged
        logged.pop("infonce", None)
    if shard is not None and "r" in parts and weights["r"] != 0:  # L_r is this rank's mean: reweight it
        total = total + (shard.local_weight - 1) * weights["r"] * parts["r"].float()
    logged.update({k: v.detach().float() for k, v in extra.items()})
    return total, logged


class BatchObjective(torch.nn.Module):
    """``batch_losses`` as a module, for DDP to wrap: its output is the loss itself, so DDP's search
    for unused parameters starts from what is back-propagated (the model's own outputs include
    heads a stage may leave out of the loss, e.g. the L_PCPE projections during warm-up)."""

    def __init__(self, model: PCAVMAE):
        super().__init__()
        self.model = model

    def forward(
        self, batch: dict[str, Tensor], loss: LossConfig, protos: Sequence[Prototypes] | None, rt: Runtime,
        shard: BatchShard | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:  # fmt: skip
        return batch_losses(self.model, batch, loss, protos, rt, shard)


def loss_values(logged: dict[str, Tensor]) -> dict[str, float]:
    """The logged parts as Python floats, read from the device in one transfer."""
    names = list(logged)
    return dict(zip(names, torch.stack([logged[n] for n in names]).tolist()))

