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

from pcavmae_cli.engine.model.cpu_attention import grouped_attention


def explicit_attention(qkv: torch.Tensor) -> bool:
    """Whether ``Attention`` takes ``cpu_attention.grouped_attention``: bf16 on the CPU, where
    torch's fused kernel runs at about half the rate of two batched products per group of heads
    (docs/benchmarks.md, "Where the bf16 step goes"). Everywhere else SDPA (on a GPU its flash
    kernel). The explicit path holds the (N, N) weights per head for the backward pass, which
    the flash kernel does not; CPU batches are small. Its softmax stays in bf16 (computed in
    fp32 inside the kernel, rounded once), as autocast's fp32 softmax would not."""
    return qkv.device.type == "cpu" and qkv.dtype == torch.bfloat16 and EXPLICIT_CPU_BF16


# The explicit bf16 CPU attention; benchmarks/pretrain_step.py turns it off to compare.
EXPLICIT_CPU_BF16 = True
# Bytes of (N, N) bf16 weights per group of heads in the explicit path (0: all heads at once).
# 2 MB: two heads of the paper's decoder (708 tokens); the 2-core EPYC has 1 MB of L2 per core
# and a shared L3.
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
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        if explicit_attention(qkv):
            return self.proj(grouped_attention(qkv, ATTENTION_GROUP_BYTES))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, nh, N, hd) each
        x = F.scaled_dot_product_attention(q, k, v)
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
