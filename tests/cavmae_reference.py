"""A small reference of CAV-MAE's forward (Gong et al., ICLR 2023), written from the published
architecture (YuanGongND/cav-mae, src/models/cav_mae.py) for the import tests.

Its parameter names are CAV-MAE's, so its ``state_dict()`` (with ``module.`` prepended, as
DataParallel saves it) is what a CAV-MAE checkpoint holds. Nothing here imports pcav: the
position tables follow CAV-MAE's numpy ``get_2d_sincos_pos_embed`` (its ``meshgrid(w, h)``, the
column index first), the audio image is the fbank transposed to ``(B, 1, 128, T)``, and each
block computes ``x + attn(norm1*(x))``, ``x + mlp(norm2*(x))`` with timm's attention.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def cavmae_pos_embed(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """CAV-MAE's table: ``(1, grid_h * grid_w, dim)``, width index in the first half."""
    grid = np.stack(np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32)), axis=0)
    grid = grid.reshape(2, 1, grid_w, grid_h)  # CAV-MAE's reshape: the flat order is unchanged
    emb = np.concatenate([sincos_1d(dim // 2, grid[0]), sincos_1d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(emb).float()[None]


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1)) * (C // self.heads) ** -0.5
        return self.proj((attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """CAV-MAE's block: every instance has the three norm pairs; ``modality`` picks one."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1, self.norm1_a, self.norm1_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2, self.norm2_a, self.norm2_v = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, modality=None):
        n1, n2 = {None: (self.norm1, self.norm2), "a": (self.norm1_a, self.norm2_a), "v": (self.norm1_v, self.norm2_v)}[modality]
        x = x + self.attn(n1(x))
        return x + self.mlp(n2(x))


class PatchEmbed(nn.Module):
    def __init__(self, chans: int, dim: int, p: int):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, kernel_size=p, stride=p)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Encoders(nn.Module):
    """The parts CAVMAE and CAVMAEFT share."""

    def __init__(self, dim, depth_mod, depth_joint, heads, mlp_ratio, p, mel, frames, image, learned_pos):
        super().__init__()
        self.p, self.mel, self.frames, self.image = p, mel, frames, image
        self.patch_embed_a, self.patch_embed_v = PatchEmbed(1, dim, p), PatchEmbed(3, dim, p)
        self.modality_a, self.modality_v = nn.Parameter(torch.zeros(1, 1, dim)), nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed_a = nn.Parameter(cavmae_pos_embed(dim, mel // p, frames // p), requires_grad=learned_pos)
        self.pos_embed_v = nn.Parameter(cavmae_pos_embed(dim, image // p, image // p), requires_grad=learned_pos)
        self.blocks_a = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth_mod)])
        self.blocks_v = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth_mod)])
        self.blocks_u = nn.ModuleList([Block(dim, heads, mlp_ratio) for _ in range(depth_joint)])
        self.norm_a, self.norm_v, self.norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def embed(self, a, v):
        a = self.patch_embed_a(a.unsqueeze(1).transpose(2, 3)) + self.pos_embed_a + self.modality_a
        v = self.patch_embed_v(v) + self.pos_embed_v + self.modality_v
        return a, v

    def modality_blocks(self, a, v):
        for blk in self.blocks_a:
            a = blk(a)
        for blk in self.blocks_v:
            v = blk(v)
        return a, v

    def joint(self, x, modality):
        for blk in self.blocks_u:
            x = blk(x, modality)
        return {None: self.norm, "a": self.norm_a, "v": self.norm_v}[modality](x)


def random_masking(x, ratio):
    N, L, D = x.shape
    keep = int(L * (1 - ratio))
    ids_shuffle = torch.argsort(torch.rand(N, L, device=x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, device=x.device)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


class CAVMAE(Encoders):
    """Pre-training model: encoders + joint layer + decoder; no projection heads."""

    def __init__(self, dim, depth_mod, depth_joint, heads, mlp_ratio, p, mel, frames, image, dec_dim, dec_depth, dec_heads):
        super().__init__(dim, depth_mod, depth_joint, heads, mlp_ratio, p, mel, frames, image, learned_pos=False)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.decoder_pos_embed_a = nn.Parameter(cavmae_pos_embed(dec_dim, mel // p, frames // p), requires_grad=False)
        self.decoder_pos_embed_v = nn.Parameter(cavmae_pos_embed(dec_dim, image // p, image // p), requires_grad=False)
        self.decoder_blocks = nn.ModuleList([Block(dec_dim, dec_heads, mlp_ratio) for _ in range(dec_depth)])
        self.decoder_norm = nn.LayerNorm(dec_dim)
        self.decoder_pred_a = nn.Linear(dec_dim, p * p)
        self.decoder_pred_v = nn.Linear(dec_dim, p * p * 3)

    def forward_encoder(self, a, v, ratio_a, ratio_v):
        """-> joint tokens ``x``, masks, restores, and the per-modality joint outputs ``ca``, ``cv``."""
        a, v = self.embed(a, v)
        a, mask_a, ids_a = random_masking(a, ratio_a)
        v, mask_v, ids_v = random_masking(v, ratio_v)
        a, v = self.modality_blocks(a, v)
        x = self.joint(torch.cat((a, v), dim=1), None)
        return x, mask_a, ids_a, mask_v, ids_v, self.joint(a, "a"), self.joint(v, "v")

    def forward_decoder(self, x, mask_a, ids_a, mask_v, ids_v):
        x = self.decoder_embed(x)
        n_a, D = ids_a.shape[1], x.shape[2]
        keep_a = n_a - int(mask_a[0].sum())
        a_ = torch.cat([x[:, :keep_a], self.mask_token.repeat(x.shape[0], int(mask_a[0].sum()), 1)], dim=1)
        a_ = torch.gather(a_, 1, ids_a.unsqueeze(-1).repeat(1, 1, D))
        v_ = torch.cat([x[:, keep_a:], self.mask_token.repeat(x.shape[0], int(mask_v[0].sum()), 1)], dim=1)
        v_ = torch.gather(v_, 1, ids_v.unsqueeze(-1).repeat(1, 1, D))
        x = torch.cat([a_, v_], dim=1) + torch.cat([self.decoder_pos_embed_a, self.decoder_pos_embed_v], dim=1)
        x = torch.cat([x[:, :n_a] + self.decoder_modality_a, x[:, n_a:] + self.decoder_modality_v], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred_a(x[:, :n_a]), self.decoder_pred_v(x[:, n_a:])

    def forward_feat(self, a, v):
        """Unmasked per-modality joint outputs (CAV-MAE's retrieval features)."""
        a, v = self.modality_blocks(*self.embed(a, v))
        return self.joint(a, "a"), self.joint(v, "v")


class CAVMAEFT(Encoders):
    """Fine-tuning model: encoders + joint layer + ``mlp_head`` (LayerNorm, Linear)."""

    def __init__(self, classes, dim, depth_mod, depth_joint, heads, mlp_ratio, p, mel, frames, image):
        super().__init__(dim, depth_mod, depth_joint, heads, mlp_ratio, p, mel, frames, image, learned_pos=True)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))

    def forward(self, a, v, mode):
        a, v = self.modality_blocks(*self.embed(a, v))
        if mode == "multimodal":
            x = self.joint(torch.cat((a, v), dim=1), None)
        elif mode == "audioonly":
            x = self.joint(a, "a")
        else:
            x = self.joint(v, "v")
        return self.mlp_head(x.mean(dim=1))


def randomise(model: nn.Module, seed: int, scale: float = 0.2) -> nn.Module:
    """Every parameter random (norms too), so that a wrong mapping cannot go unnoticed;
    position tables kept unless ``learned`` positions are to be tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "pos_embed" in name and not p.requires_grad:
                continue
            p.copy_(torch.randn(p.shape, generator=g) * (scale if p.dim() > 1 else 0.5) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def checkpoint_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as CAV-MAE's training saves it (DataParallel's ``module.`` prefix)."""
    return {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
