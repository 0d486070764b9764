"""Pre-norm Transformer blocks (timm's ``Block``/``Attention`` layout, fused SDPA).

One ``Block`` class serves the modality encoders, the joint layer and the decoder. The joint
layer of CAV-MAE runs the *same* attention and MLP weights on three input streams (the
audio+video sequence, audio alone, video alone) but gives each stream its own LayerNorms; a
block therefore holds one LayerNorm per stream in a ``ModuleDict`` and ``forward`` picks the
pair by name, so no code path switches on a modality.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for ``(B, nh, N, hd)`` inputs.

    Fused SDPA everywhere but for bf16 on the CPU: there torch's flash kernel runs at about half
    the rate of two batched bf16 products with the softmax between them (docs/benchmarks.md,
    "Where the bf16 step goes"), so that case takes the explicit path. It holds the (N, N)
    weights per head for the backward pass, which the flash kernel does not; CPU batches are
    small. The softmax stays in bf16 (computed in fp32 inside the kernel, rounded once), as
    autocast would not: autocast's fp32 softmax doubles the traffic of the (N, N) matrix.

    The explicit path runs a few heads at a time (``ATTENTION_GROUP_BYTES`` of weights), so the
    softmax and the second product read the weights from cache, not from memory, and so does
    the backward pass of each group: 1.9x faster than all heads at once on the paper's decoder
    shape (docs/benchmarks.md).
    """
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or not EXPLICIT_CPU_BF16:
        return F.scaled_dot_product_attention(q, k, v)
    B, H, N, D = q.shape
    heads = B * H
    group = heads if ATTENTION_GROUP_BYTES <= 0 else max(1, ATTENTION_GROUP_BYTES // (N * N * q.element_size()))
    with torch.autocast("cpu", enabled=False):
        qs = (q.reshape(heads, N, D) * D**-0.5).split(group)
        ks, vs = k.reshape(heads, N, D).split(group), v.reshape(heads, N, D).split(group)
        outs = [torch.bmm(torch.bmm(a, b.transpose(1, 2)).softmax(dim=-1), c) for a, b, c in zip(qs, ks, vs)]
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(B, H, N, D)


# The explicit bf16 CPU attention of ``attend``; benchmarks/pretrain_step.py turns it off to compare.
EXPLICIT_CPU_BF16 = True
# Bytes of (N, N) bf16 weights per group of heads in ``attend``'s explicit path (0: all heads at
# once). 2 MB: two heads of the paper's decoder (708 tokens); the 2-core EPYC has 1 MB of L2 per
# core and a shared L3.
ATTENTION_GROUP_BYTES = 2 * 2**20


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    Args:
        dim: token width; a multiple of ``num_heads``.
        num_heads: attention heads, each ``dim // num_heads`` wide.
    """

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)  # with bias, as ViT/MAE/CAV-MAE (checkpoint import)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, N, C)`` -> ``(B, N, C)``."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, nh, N, hd) each
        x = attend(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    """Linear -> GELU -> Linear.

    Args:
        dim: token width.
        hidden_dim: inner width (``mlp_ratio * dim`` in the encoders, 1536 in the paper's decoder).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, N, C)`` -> ``(B, N, C)``."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm Transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_dim: MLP inner width.
        eps: LayerNorm epsilon.
        streams: names of the inputs this block sees; each gets its own ``norm1``/``norm2``
            while ``attn`` and ``mlp`` are shared. Plain blocks have the single stream ``"x"``;
            CAV-MAE's joint block has ``("av", "a", "v")``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, eps: float, streams: Sequence[str] = ("x",)):
        super().__init__()
        self.norm1 = nn.ModuleDict({s: nn.LayerNorm(dim, eps=eps) for s in streams})
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.ModuleDict({s: nn.LayerNorm(dim, eps=eps) for s in streams})
        self.mlp = Mlp(dim, mlp_dim)
        self.checkpointed = False  # recompute activations in backward (train.activation_checkpointing)

    def forward(self, x: torch.Tensor, stream: str = "x") -> torch.Tensor:
        """x: ``(B, N, C)`` tokens of input ``stream`` -> ``(B, N, C)``."""
        if self.checkpointed and torch.is_grad_enabled():
            return checkpoint(self._forward, x, stream, use_reentrant=False)
        return self._forward(x, stream)

    def _forward(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        x = x + self.attn(self.norm1[stream](x))
        return x + self.mlp(self.norm2[stream](x))
