"""The momentum (EMA) encoder whose embeddings the prototypes are computed from (eq. 2, PCL).

It copies the backbone only (encoders, joint layer, projections): the decoder plays no part in
the E-step. Its parameters never take gradients; ``update`` moves them towards the model's.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from pcavmae_cli.engine.model.backbone import Embeddings
from pcavmae_cli.engine.model.pcavmae import PCAVMAE


class MomentumEncoder(nn.Module):
    """An EMA copy of ``model.backbone``.

    Args:
        model: the (unwrapped, not DDP) model it starts as a copy of.
    """

    def __init__(self, model: PCAVMAE):
        super().__init__()
        self.backbone = copy.deepcopy(model.backbone)
        self.backbone.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: PCAVMAE, momentum: float) -> None:
        """``theta_m <- momentum * theta_m + (1 - momentum) * theta`` for every backbone parameter."""
        ema = list(self.backbone.parameters())
        new = [p.detach() for p in model.backbone.parameters()]
        torch._foreach_lerp_(ema, new, 1.0 - momentum)  # theta_m + (1 - m) (theta - theta_m)

    @torch.no_grad()
    def embed(self, audio: torch.Tensor, frames: torch.Tensor) -> Embeddings:
        """Unmasked embeddings, as ``PCAVMAE.embed``: audio ``(B, T, F)``, frames ``(B, 3, S, S)``."""
        return self.backbone.embed(audio, frames)
