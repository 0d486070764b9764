"""The prototype head: logits that are, exactly, a sum of prototype contributions plus a bias.

A linear head on the pooled joint-layer output can only be *approximately* explained by
prototypes (``viz/contributions.py`` leaves a residual). This head makes the explanation the
model itself: the clip's embedding e in the contrastive space is compared with every
pre-training prototype (all granularities, concatenated), and the logits are a linear function
of those similarities,

    s_k = cos(e, p_k) / T          (P values; T the recipe's temperature)
    l_c = b_c + sum_k W[c, k] s_k  (so contribution_k = W[c, k] s_k, and nothing else)

e and the prototypes depend on ``finetune.mode``, so that each is compared with prototypes of its
own space: ``av`` and ``sum`` the joint embedding normalise(normalise(z_a) + normalise(z_v))
with the joint prototypes p^m (as the E-step clusters it), ``a`` z_a with the audio member means
p_a, ``v`` z_v with the video member means p_v (eq. 3). The prototypes are a buffer (frozen)
or a parameter (trainable); either way they are saved with the weights, under ``head.prototypes``,
together with ``head.sizes`` (prototypes per granularity), so a checkpoint explains itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pcavmae_cli.engine.errors import UserError

# Which prototype tensor of a granularity each fine-tuning mode compares with (module docstring).
PROTOTYPE_FIELD = {"av": "centroids", "sum": "centroids", "a": "p_a", "v": "p_v"}


@dataclass(frozen=True)
class PrototypeHeadSpec:
    """What shapes a prototype head: prototypes per granularity, trainability, temperature."""

    sizes: tuple[int, ...]  # K of each granularity, in order; the head holds sum(sizes) prototypes
    trainable: bool
    temperature: float


class PrototypeHead(nn.Module):
    """``e (B, d)`` unit-norm embeddings -> logits ``(B, C)`` through prototype similarities.

    Args:
        spec: sizes, trainability and temperature.
        dim: d, the width of the contrastive space (``model.proj_dim``).
        num_classes: C.
    """

    def __init__(self, spec: PrototypeHeadSpec, dim: int, num_classes: int):
        super().__init__()
        if not spec.sizes or min(spec.sizes) < 1:
            raise UserError("key 'finetune.head': the prototype head needs at least one prototype per granularity")
        if not spec.temperature > 0:
            raise UserError(f"key 'finetune.prototype_head.temperature' must be > 0, got {spec.temperature}")
        self.spec = spec
        total = sum(spec.sizes)
        initial = torch.zeros(total, dim)  # filled by ``set_prototypes`` or a checkpoint
        if spec.trainable:
            self.prototypes = nn.Parameter(initial)
        else:
            self.register_buffer("prototypes", initial)
        self.register_buffer("sizes", torch.tensor(spec.sizes, dtype=torch.int64))
        self.linear = nn.Linear(total, num_classes)

    def set_prototypes(self, prototypes: Tensor) -> None:
        """Copy ``(P, d)`` prototypes in (the pre-training run's, at the start of fine-tuning)."""
        if prototypes.shape != self.prototypes.shape:
            raise UserError(f"the prototype head holds {tuple(self.prototypes.shape)} prototypes, "
                            f"got {tuple(prototypes.shape)}")  # fmt: skip
        with torch.no_grad():
            self.prototypes.copy_(prototypes)

    def similarities(self, e: Tensor) -> Tensor:
        """s = cos(e, p) / T: ``(B, d)`` -> ``(B, P)``; the prototypes are normalised on use, so a
        trainable one moves in direction only."""
        return F.normalize(e.float(), dim=-1) @ F.normalize(self.prototypes.float(), dim=-1).T / self.spec.temperature

    def forward(self, e: Tensor) -> Tensor:
        return self.linear(self.similarities(e))

    def level_slices(self) -> list[slice]:
        """The columns of each granularity in the concatenated prototypes."""
        out, start = [], 0
        for n in self.spec.sizes:
            out.append(slice(start, start + n))
            start += n
        return out


def stack_prototypes(levels: list, mode: str) -> tuple[Tensor, tuple[int, ...]]:
    """The ``(P, d)`` prototypes a head of ``mode`` compares with, all granularities concatenated,
    and the count per granularity; ``levels`` are ``prototypes.step.Prototypes``."""
    name = PROTOTYPE_FIELD[mode]
    tensors = [getattr(p, name).float().cpu() for p in levels]
    return torch.cat(tensors), tuple(int(t.shape[0]) for t in tensors)
