"""The joint decoder: a vanilla pre-norm Transformer over both modalities' full token grids."""

from __future__ import annotations

import torch
from torch import nn

from pcavmae_cli.engine.model.blocks import Block
from pcavmae_cli.engine.model.embed import sincos_2d
from pcavmae_cli.engine.model.masking import unshuffle
from pcavmae_cli.engine.schema import ModelConfig


class Decoder(nn.Module):
    """Visible tokens + mask tokens, in patch order, with positions and modality embeddings.

    The positions are sin-cos tables, fixed or (``model.decoder_pos_embed: learned``) parameters
    that start as those tables and train with the rest of the decoder.

    Args:
        cfg: the recipe's ``model`` section.
        grid_a: audio patch grid ``(frequency, time)``.
        grid_v: video patch grid ``(rows, columns)``.
    """

    def __init__(self, cfg: ModelConfig, grid_a: tuple[int, int], grid_v: tuple[int, int]):
        super().__init__()
        dd, p = cfg.decoder_dim, cfg.patch_size
        self.embed = nn.Linear(cfg.embed_dim, dd)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        table_a, table_v = sincos_2d(dd, *grid_a)[None], sincos_2d(dd, *grid_v)[None]  # (1, N, dd)
        if cfg.decoder_pos_embed == "learned":  # CAV-MAE's tr_pos=True: starts as the table, then trains
            self.pos_embed_a, self.pos_embed_v = nn.Parameter(table_a), nn.Parameter(table_v)
        else:  # buffers: fixed, a function of the config, and so left out of checkpoints
            self.register_buffer("pos_embed_a", table_a, persistent=False)
            self.register_buffer("pos_embed_v", table_v, persistent=False)
        self.modality_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.blocks = nn.ModuleList(
            [Block(dd, cfg.decoder_heads, cfg.decoder_mlp_dim, cfg.layer_norm_eps) for _ in range(cfg.decoder_depth)]
        )
        self.norm = nn.LayerNorm(dd, eps=cfg.layer_norm_eps)
        self.pred_a = nn.Linear(dd, p * p * 1)
        self.pred_v = nn.Linear(dd, p * p * 3)

    def forward(
        self, joint: torch.Tensor, n_visible_a: int, ids_restore_a: torch.Tensor, ids_restore_v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reconstruct every patch of both modalities.

        Args:
            joint: ``(B, K_a + K_v, D)`` joint-layer output, the ``n_visible_a`` audio tokens first.
            n_visible_a: ``K_a``.
            ids_restore_a, ids_restore_v: ``(B, N_a)``, ``(B, N_v)`` from the masking.

        Returns:
            pred_a ``(B, N_a, p*p)``, pred_v ``(B, N_v, p*p*3)``, and the decoder's final
            (normalised) tokens h_a ``(B, N_a, dd)``, h_v ``(B, N_v, dd)`` in patch order.
        """
        x = self.embed(joint)
        a = unshuffle(x[:, :n_visible_a], self.mask_token, ids_restore_a) + self.pos_embed_a + self.modality_a
        v = unshuffle(x[:, n_visible_a:], self.mask_token, ids_restore_v) + self.pos_embed_v + self.modality_v
        x = torch.cat([a, v], dim=1)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        h_a, h_v = x[:, : a.shape[1]], x[:, a.shape[1] :]
        return self.pred_a(h_a), self.pred_v(h_v), h_a, h_v
