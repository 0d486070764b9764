"""The encoder side of PCAV-MAE: two modality encoders, the joint layer, the projection heads.

This is everything the momentum encoder copies and fine-tuning keeps; ``PCAVMAE`` adds the
decoder. Audio and video are embedded and encoded separately (``depth_modality`` blocks each),
then the joint layer (``depth_joint`` blocks) runs on one of three streams:

- ``"av"``: the concatenated audio+video sequence, which feeds the decoder;
- ``"a"`` / ``"v"``: one modality alone, whose mean-pooled output is projected to the clip
  embeddings ``z_a`` / ``z_v`` (CAV-MAE's contrastive branch).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.blocks import Block
from pcavmae_cli.engine.model.embed import PatchEmbed, audio_image, sincos_2d
from pcavmae_cli.engine.model.masking import random_masking
from pcavmae_cli.engine.schema import ModelConfig


def check_config(cfg: ModelConfig) -> None:
    """Refuse sizes the model cannot be built with, naming the recipe key."""
    p = cfg.patch_size
    rules = [
        (cfg.embed_dim % cfg.num_heads == 0, "model.embed_dim must be a multiple of model.num_heads"),
        (cfg.decoder_dim % cfg.decoder_heads == 0, "model.decoder_dim must be a multiple of model.decoder_heads"),
        (cfg.embed_dim % 4 == 0 and cfg.decoder_dim % 4 == 0,
         "model.embed_dim and model.decoder_dim must be multiples of 4 (2-D sin-cos positions)"),
        (cfg.audio_frames % p == 0 and cfg.mel_bins % p == 0,
         "model.audio_frames and model.mel_bins must be multiples of model.patch_size"),
        (cfg.image_size % p == 0, "model.image_size must be a multiple of model.patch_size"),
        (0 <= cfg.mask_ratio_audio < 1 and 0 <= cfg.mask_ratio_video < 1,
         "model.mask_ratio_audio and model.mask_ratio_video must lie in [0, 1)"),
        (0 <= cfg.momentum <= 1, "model.momentum must lie in [0, 1]"),
        (min(cfg.depth_modality, cfg.depth_joint, cfg.decoder_depth) >= 0 and cfg.depth_joint >= 1,
         "model depths must be >= 0, and model.depth_joint >= 1"),
        (cfg.projection_heads or cfg.proj_dim == cfg.embed_dim,
         "model.projection_heads is false, so model.proj_dim must equal model.embed_dim"),
    ]
    for ok, message in rules:
        if not ok:
            raise UserError(message)


def projection_head(in_dim: int, cfg: ModelConfig) -> nn.Module:
    """``in_dim`` -> ``cfg.proj_dim``: one Linear, or Linear-GELU-Linear when ``proj_hidden_dim`` is set;
    with ``projection_heads: false`` (CAV-MAE) no head at all, and the width stays ``in_dim``."""
    if not cfg.projection_heads:
        return nn.Identity()
    if cfg.proj_hidden_dim is None:
        return nn.Linear(in_dim, cfg.proj_dim)
    hidden = cfg.proj_hidden_dim
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.proj_dim))


class ModalityEncoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + a learnt modality embedding, then blocks.

    Masking sits between ``embed`` and ``forward`` so that the blocks only see visible tokens.

    Args:
        in_chans: 1 (audio as a frequency x time image) or 3 (RGB).
        size: input ``(H, W)``.
        cfg: the recipe's ``model`` section.
    """

    def __init__(self, in_chans: int, size: tuple[int, int], cfg: ModelConfig):
        super().__init__()
        D = cfg.embed_dim
        self.patch_embed = PatchEmbed(in_chans, size, cfg.patch_size, D)
        table = sincos_2d(D, *self.patch_embed.grid)[None]  # (1, N, D)
        if cfg.pos_embed == "learned":  # CAV-MAE fine-tuning: starts as the table, then trains
            self.pos_embed = nn.Parameter(table)
        else:  # a buffer: fixed, a function of the config, and so left out of checkpoints
            self.register_buffer("pos_embed", table, persistent=False)
        self.modality = nn.Parameter(torch.zeros(1, 1, D))
        mlp_dim = int(D * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, mlp_dim, cfg.layer_norm_eps) for _ in range(cfg.depth_modality)]
        )

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, C, H, W)`` -> ``(B, N, D)`` tokens with position and modality added."""
        return self.patch_embed(x) + self.pos_embed + self.modality

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, K, D)`` embedded (visible) tokens -> ``(B, K, D)``."""
        for blk in self.blocks:
            x = blk(x)
        return x


class JointLayer(nn.Module):
    """Shared blocks after the modality encoders, plus the final LayerNorm of each stream.

    With ``joint_norms: per_modality`` every block has LayerNorms ``av``, ``a`` and ``v`` (CAV-MAE's
    ``norm1``/``norm1_a``/``norm1_v``, likewise ``norm2``), and the final norms are CAV-MAE's
    ``norm``/``norm_a``/``norm_v``; with ``shared`` the streams all route to the ``av`` norms.
    """

    STREAMS = ("av", "a", "v")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        D, eps = cfg.embed_dim, cfg.layer_norm_eps
        names = self.STREAMS if cfg.joint_norms == "per_modality" else ("av",)
        self.route = {s: (s if s in names else "av") for s in self.STREAMS}
        mlp_dim = int(D * cfg.mlp_ratio)
        self.blocks = nn.ModuleList(
            [Block(D, cfg.num_heads, mlp_dim, eps, streams=names) for _ in range(cfg.depth_joint)]
        )
        self.norm = nn.ModuleDict({n: nn.LayerNorm(D, eps=eps) for n in names})

    def forward(self, x: torch.Tensor, stream: str) -> torch.Tensor:
        """x: ``(B, N, D)`` tokens of stream ``"av"``, ``"a"`` or ``"v"`` -> ``(B, N, D)``, normalised."""
        key = self.route[stream]
        for blk in self.blocks:
            x = blk(x, key)
        return self.norm[key](x)


@dataclass
class EncoderOutput:
    """What ``Backbone.forward_encoder`` returns (K_a, K_v: visible tokens; N_a, N_v: all tokens)."""

    tokens_a: torch.Tensor  # (B, K_a, D) audio encoder output, before the joint layer
    tokens_v: torch.Tensor  # (B, K_v, D)
    joint: torch.Tensor | None  # (B, K_a + K_v, D) joint layer on the concatenated sequence, audio first; None when skipped
    mask_a: torch.Tensor  # (B, N_a) 1 = masked
    mask_v: torch.Tensor  # (B, N_v)
    ids_restore_a: torch.Tensor  # (B, N_a)
    ids_restore_v: torch.Tensor  # (B, N_v)


@dataclass
class Embeddings:
    """Clip-level outputs of the unmasked path (E-step, retrieval, downstream heads)."""

    z_a: torch.Tensor  # (B, proj_dim) unit norm
    z_v: torch.Tensor  # (B, proj_dim) unit norm
    joint: torch.Tensor  # (B, D) mean of the joint layer's audio+video tokens


class Backbone(nn.Module):
    """Audio and video encoders, joint layer, and the projections to the contrastive space.

    Args:
        cfg: the recipe's ``model`` section.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.encoder_a = ModalityEncoder(1, (cfg.mel_bins, cfg.audio_frames), cfg)
        self.encoder_v = ModalityEncoder(3, (cfg.image_size, cfg.image_size), cfg)
        self.joint = JointLayer(cfg)
        self.proj_a = projection_head(cfg.embed_dim, cfg)
        self.proj_v = projection_head(cfg.embed_dim, cfg)

    def forward_encoder(
        self, audio: torch.Tensor, frames: torch.Tensor, mask_ratio_a: float, mask_ratio_v: float,
        with_joint: bool = True,
    ) -> EncoderOutput:
        """Mask each modality, encode the visible tokens, run the joint layer on their concatenation.

        Args:
            audio: ``(B, T, F)`` normalised fbank.
            frames: ``(B, 3, S, S)`` normalised RGB.
            mask_ratio_a, mask_ratio_v: fraction of tokens masked per modality.
            with_joint: ``False`` skips the audio+video joint pass (``joint`` is ``None``); only
                the decoder reads it, so the encoder-only stage need not pay for it.
        """
        a, mask_a, ids_a = random_masking(self.encoder_a.embed(audio_image(audio)), mask_ratio_a)
        v, mask_v, ids_v = random_masking(self.encoder_v.embed(frames), mask_ratio_v)
        a, v = self.encoder_a(a), self.encoder_v(v)
        joint = self.joint(torch.cat([a, v], dim=1), "av") if with_joint else None
        return EncoderOutput(a, v, joint, mask_a, mask_v, ids_a, ids_v)

    def clip_embeddings(self, tokens_a: torch.Tensor, tokens_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint layer on each modality alone, mean-pool, project, L2-normalise.

        Args:
            tokens_a: ``(B, K_a, D)`` audio encoder output (visible tokens, or all of them).
            tokens_v: ``(B, K_v, D)``.

        Returns:
            z_a, z_v: ``(B, proj_dim)``, unit norm.
        """
        z_a = self.proj_a(self.joint(tokens_a, "a").mean(dim=1))
        z_v = self.proj_v(self.joint(tokens_v, "v").mean(dim=1))
        return F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)

    def embed(self, audio: torch.Tensor, frames: torch.Tensor) -> Embeddings:
        """The unmasked ("full-set") path: audio ``(B, T, F)``, frames ``(B, 3, S, S)`` -> ``Embeddings``."""
        a = self.encoder_a(self.encoder_a.embed(audio_image(audio)))
        v = self.encoder_v(self.encoder_v.embed(frames))
        z_a, z_v = self.clip_embeddings(a, v)
        joint = self.joint(torch.cat([a, v], dim=1), "av").mean(dim=1)
        return Embeddings(z_a, z_v, joint)
