"""AdamW with decoupled weight decay on weight matrices only.

No weight decay on LayerNorm weights, biases, the learnt modality embeddings and the decoder's
mask token (MAE/timm convention: 1-D parameters and embeddings are not decayed). Positional
embeddings are fixed buffers, not parameters. Every parameter is in the optimiser from the start,
whatever the stage: a frozen part (``requires_grad=False``) has no gradient, and AdamW skips
parameters without a gradient, so it gets neither an update nor weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from pcavmae_cli.engine.schema import OptimConfig

NO_DECAY_NAMES = ("mask_token", "modality", "modality_a", "modality_v")


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether parameter ``name`` takes weight decay."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over every parameter of ``model``: group 0 decayed, group 1 not; lr set per step."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    beta1, beta2 = cfg.betas
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
