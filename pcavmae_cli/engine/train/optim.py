"""AdamW with decoupled weight decay on weight matrices only (pre-training and fine-tuning).

No weight decay on LayerNorm weights, biases, the learnt modality embeddings, the decoder's
mask token, learned position tables (``model.pos_embed`` / ``model.decoder_pos_embed:
learned``) and a prototype head's trainable prototypes. MAE/timm convention: 1-D parameters and
embeddings are not decayed; decay would pull positions towards zero, erasing the order they
encode, and prototypes are normalised on use, so decay would only fight their gradient. Fixed
(sin-cos) position tables are buffers, not parameters. Every parameter is in the optimiser from
the start, whatever the stage: a frozen part (``requires_grad=False``) has no gradient, and
AdamW skips parameters without a gradient, so it gets neither an update nor weight decay.
"""

from __future__ import annotations

import torch
from torch import nn

from pcavmae_cli.engine.schema import OptimConfig

NO_DECAY_NAMES = (
    "mask_token", "modality", "modality_a", "modality_v", "pos_embed", "pos_embed_a", "pos_embed_v",
    "prototypes",  # a prototype head's trainable prototypes: directions, normalised on use
)


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether parameter ``name`` takes weight decay."""
    return param.ndim >= 2 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def adamw(groups: list[dict], cfg: OptimConfig, *, fused: bool = True) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``groups`` with the recipe's rate and betas.

    ``fused``: one fused kernel per step for all parameters (CUDA, and CPU since torch 2.4)
    instead of a Python loop over tensors; the same update up to float rounding. Where the
    parameters' device or dtype has no fused kernel, the multi-tensor ``foreach`` path is used.
    ``fused=False`` gives torch's default implementation (``pcav bench``'s plain step).
    """
    beta1, beta2 = cfg.betas
    if fused:
        try:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2), fused=True)
        except (RuntimeError, ValueError):  # no fused kernel for this device / dtype
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2), foreach=True)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(beta1, beta2))


def build_optimizer(model: nn.Module, cfg: OptimConfig, *, fused: bool = True) -> torch.optim.AdamW:
    """AdamW over every parameter of ``model``: group 0 decayed, group 1 not; lr set per step.

    Build it after the model is on its device (the fused kernel is chosen by device)."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if decays(n, p)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
    ]
    return adamw(groups, cfg, fused=fused)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's rate to ``lr`` times the group's ``lr_scale`` (1 when it has none)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_finetune_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    *,
    head_lr_multiplier: float,
    layer_decay: float | None,
) -> torch.optim.AdamW:
    """AdamW for fine-tuning: parameter groups by learning-rate scale and weight decay.

    The head (parameters named ``head.*``) runs at ``head_lr_multiplier`` x the scheduled rate
    (CAV-MAE's ``head_lr``). With ``layer_decay`` null every other parameter runs at the
    scheduled rate (CAV-MAE's plain setting); with a decay d, parameter ``name`` runs at
    ``d ** (model.num_layers + 1 - model.layer_id(name))`` of it (BEiT / MAE fine-tuning), so the
    embeddings are scaled most and the joint layer's final norms not at all. Each group
    carries ``lr_scale``, which ``set_lr`` applies.
    """
    groups: dict[tuple[float, bool], dict] = {}
    depth = getattr(model, "num_layers", 0)
    for name, param in model.named_parameters():
        if name.startswith("head."):
            scale = head_lr_multiplier
        elif layer_decay is None:
            scale = 1.0
        else:
            scale = layer_decay ** (depth + 1 - model.layer_id(name))
        decay = decays(name, param)
        group = groups.setdefault((scale, decay), {
            "params": [], "lr_scale": scale, "weight_decay": cfg.weight_decay if decay else 0.0,
        })  # fmt: skip
        group["params"].append(param)
    return adamw(list(groups.values()), cfg)
