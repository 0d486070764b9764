"""Patch embeddings, fixed 2-D sin-cos positions, and (un)patchify for reconstruction targets.

Audio is a 1-channel image of frequency x time, as in CAV-MAE: the fbank ``(B, T, F)`` becomes
``(B, 1, F, T)``, so 128 x 1024 gives a grid of 8 (frequency) x 64 (time) = 512 patches of 16 x 16.
Tokens are numbered row-major over that grid (frequency row, then time), the order of both the
``Conv2d`` patch embedding and ``patchify``.
"""

from __future__ import annotations

import torch
from torch import nn


def audio_image(fbank: torch.Tensor) -> torch.Tensor:
    """fbank: ``(B, T, F)`` -> ``(B, 1, F, T)``, frequency as height and time as width."""
    return fbank.unsqueeze(1).transpose(2, 3)


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: ``(M,)`` -> ``(M, dim)``: ``[sin(pos * w_k), cos(pos * w_k)]``, ``w_k = 10000^(-2k/dim)``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D positions of a ``grid_h x grid_w`` patch grid, row-major: ``(grid_h * grid_w, dim)``.

    The first half of each row encodes the column (width) index and the second half the row
    index: the layout of MAE's and CAV-MAE's ``get_2d_sincos_pos_embed``, so their position
    tables and ours agree element for element. Computed in float64, returned as float32.
    """
    rows, cols = torch.meshgrid(torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols.reshape(-1)), sincos_1d(dim // 2, rows.reshape(-1))], dim=1)
    return emb.float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches to tokens with a strided ``Conv2d`` (a Linear per patch).

    Args:
        in_chans: 1 for audio, 3 for video.
        size: input ``(H, W)``; both multiples of ``patch_size``.
        patch_size: side ``p`` of a square patch.
        dim: token width.
    """

    def __init__(self, in_chans: int, size: tuple[int, int], patch_size: int, dim: int):
        super().__init__()
        self.grid = (size[0] // patch_size, size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, C, H, W)`` -> ``(B, h * w, dim)``, contiguous: the transposed view of the
        convolution's ``(B, dim, h * w)`` output would pass its layout (tokens innermost) on to
        every residual add of the encoder, where each LayerNorm and each add then ran on strided
        memory, several times slower (unmasked inference: all tokens)."""
        return self.proj(x).flatten(2).transpose(1, 2).contiguous()


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: ``(B, C, H, W)`` -> ``(B, h * w, p * p * C)``, each row a patch in (row, column, channel) order.

    The order of MAE and CAV-MAE, so an imported ``decoder_pred`` predicts the same values.
    """
    B, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(B, C, h, p, w, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int], chans: int) -> torch.Tensor:
    """x: ``(B, h * w, p * p * C)`` -> ``(B, C, h * p, w * p)``, the inverse of ``patchify``."""
    (h, w), B = grid, x.shape[0]
    x = x.reshape(B, h, w, p, p, chans)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, chans, h * p, w * p)
