"""Attention for bf16 on the CPU: two batched products per group of heads, one autograd node.

On the CPU torch's fused attention kernel runs bf16 at about half the rate of two batched bf16
products with the softmax between them (docs/benchmarks.md, "Where the bf16 step goes"), so
bf16 CPU attention takes the products. Written with autograd (a reshape, a product, a softmax,
a product per group of heads, then ``cat``) the backward pass reads each group's (N, N) weights
twice from memory, in the order the autograd engine happens to take the nodes, and every layer
pays copies for the reshapes into and out of the head-major layout and for the ``cat``.

``grouped_attention`` is one ``autograd.Function`` over the fused qkv projection's output:

- it takes the ``(B, N, 3, H, D)`` projection into the head-major layout with one copy (q
  scaled in place), and the products write each group's result into its slice of one output
  (``out=``): no ``cat``, no per-group allocation of outputs, on either pass;
- a group is as many (sample, head) pairs as fit ``group_bytes`` of weights (a cache's worth),
  so the softmax and the second product read the weights from cache;
- its backward pass takes one group at a time in the order that reads the saved weights once
  from memory: the gradient of the weights (from the output gradient and v), the softmax's
  backward (reads the weights), then the value gradient (the weights now in cache), then the
  q and k gradients from the softmax gradient, which is still in cache too. Each group's weights
  are released as soon as its backward is done.

The arithmetic is that of the autograd version op for op (the same products, the softmax and
its backward kernel on the same bf16 tensors), so the two agree to bf16 rounding.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.autograd.function import once_differentiable

_kept = threading.local()  # bytes of weights kept for the backward pass while counted (kept_weights)


@contextmanager
def kept_weights() -> Iterator[list[int]]:
    """Counts, in this thread, the bytes of attention weights ``grouped_attention`` keeps for the
    backward pass (``[bytes]``, filled as it runs): they live on the autograd node, where
    autograd's saved-tensor hooks do not see them (``train/memory.py``'s estimate)."""
    _kept.count = [0]
    try:
        yield _kept.count
    finally:
        _kept.count = None


def _group_slices(heads: int, tokens: int, group_bytes: int) -> list[slice]:
    """Consecutive (sample, head) pairs, as many per group as fit ``group_bytes`` of bf16
    weights (at least one; 0: all at once)."""
    size = heads if group_bytes <= 0 else max(1, group_bytes // (tokens * tokens * 2))
    return [slice(i, min(i + size, heads)) for i in range(0, heads, size)]


class GroupedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, group_bytes: int) -> torch.Tensor:
        B, N, _, H, D = qkv.shape
        scale = D**-0.5
        # (3, B * H, N, D): one copy into the head-major layout; q carries the scale
        packed = qkv.new_empty(3, B * H, N, D)
        packed.view(3, B, H, N, D).copy_(qkv.permute(2, 0, 3, 1, 4))
        q, k, v = packed
        q.mul_(scale)
        out = qkv.new_empty(B * H, N, D)
        groups = _group_slices(B * H, N, group_bytes)
        weights = []
        with torch.autocast("cpu", enabled=False):
            for g in groups:
                w = torch.bmm(q[g], k[g].transpose(1, 2)).softmax(dim=-1)
                torch.bmm(w, v[g], out=out[g])
                if ctx.needs_input_grad[0]:  # inference keeps no weights
                    weights.append(w)
                    if getattr(_kept, "count", None) is not None:
                        _kept.count[0] += w.nbytes
        ctx.save_for_backward(packed)
        ctx.groups, ctx.weights, ctx.scale = groups, weights, scale
        return out.view(B, H, N, D).transpose(1, 2).reshape(B, N, H * D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        (packed,) = ctx.saved_tensors
        q, k, v = packed  # q scaled
        _, BH, N, D = packed.shape
        B = grad_out.shape[0]
        H = BH // B
        grad_out = grad_out.to(packed.dtype).reshape(B, N, H, D).transpose(1, 2).reshape(BH, N, D)
        grad = packed.new_empty(packed.shape)
        grad_q, grad_k, grad_v = grad
        with torch.autocast("cpu", enabled=False):
            for i, g in enumerate(ctx.groups):
                w, ctx.weights[i] = ctx.weights[i], None
                grad_scores = torch._softmax_backward_data(torch.bmm(grad_out[g], v[g].transpose(1, 2)), w, -1, w.dtype)
                torch.bmm(w.transpose(1, 2), grad_out[g], out=grad_v[g])  # the weights now in cache
                del w
                torch.bmm(grad_scores, k[g], out=grad_q[g])
                torch.bmm(grad_scores.transpose(1, 2), q[g], out=grad_k[g])
        grad_q.mul_(ctx.scale)
        return grad.view(3, B, H, N, D).permute(1, 3, 0, 2, 4).reshape(B, N, 3, H, D), None


def grouped_attention(qkv: torch.Tensor, group_bytes: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v per head for a ``(B, N, 3, H, D)`` bf16 CPU tensor -> ``(B, N, H * D)``."""
    return GroupedAttention.apply(qkv, group_bytes)
