"""PCAV-MAE: the backbone (encoders, joint layer, projections) plus the joint decoder.

The model computes no loss: ``forward`` returns what eqs. 1-4 need (``engine/losses.py``).

- ``z_a``, ``z_v``: clip embeddings of the *visible* tokens (L_PJE, eq. 1, and the instance InfoNCE);
- ``zd_a``, ``zd_v``: the decoder's masked-token outputs, mean-pooled per modality and projected
  (L_PCPE, eq. 3);
- ``pred_*``, ``target_*``, ``mask_*``: the reconstruction (L_r, eq. 4).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.backbone import Backbone, EncoderOutput, Embeddings, projection_head
from pcavmae_cli.engine.model.decoder import Decoder
from pcavmae_cli.engine.model.embed import audio_image, patchify
from pcavmae_cli.engine.schema import ModelConfig

INIT_STD = 0.02  # MAE's normal init of mask token and learnt embeddings

# Parameter-name prefixes of each trainable part; the training stages freeze parts by these names.
PARTS: dict[str, tuple[str, ...]] = {
    "encoder_a": ("backbone.encoder_a.",),
    "encoder_v": ("backbone.encoder_v.",),
    "joint": ("backbone.joint.",),
    "proj": ("backbone.proj_a.", "backbone.proj_v."),
    "decoder": ("decoder.",),
    "dproj": ("dproj_a.", "dproj_v."),
}


@dataclass
class DecoderOutput:
    pred_a: torch.Tensor  # (B, N_a, p*p) predicted fbank patches
    pred_v: torch.Tensor  # (B, N_v, p*p*3) predicted pixel patches
    zd_a: torch.Tensor | None  # (B, proj_dim) unit norm: masked audio tokens of the decoder, pooled, projected
    zd_v: torch.Tensor | None  # (B, proj_dim); both None when not pooled


@dataclass
class PCAVMAEOutput:
    """Everything the pre-training losses read. Decoder fields are ``None`` when not decoding."""

    z_a: torch.Tensor  # (B, proj_dim) unit norm, visible audio tokens
    z_v: torch.Tensor  # (B, proj_dim)
    mask_a: torch.Tensor  # (B, N_a) 1 = masked
    mask_v: torch.Tensor  # (B, N_v)
    zd_a: torch.Tensor | None = None  # (B, proj_dim) unit norm
    zd_v: torch.Tensor | None = None
    pred_a: torch.Tensor | None = None  # (B, N_a, p*p)
    pred_v: torch.Tensor | None = None  # (B, N_v, p*p*3)
    target_a: torch.Tensor | None = None  # (B, N_a, p*p), per-patch normalised if norm_pix_loss
    target_v: torch.Tensor | None = None  # (B, N_v, p*p*3)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the tokens where ``mask`` is 1: x ``(B, N, C)``, mask ``(B, N)`` -> ``(B, C)``.

    A sample with no masked token (mask ratio 0) gives a zero vector rather than NaN.
    """
    return (x * mask[..., None]).sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp_min(1)


class PCAVMAE(nn.Module):
    """Prototypical contrastive audio-visual masked autoencoder.

    Args:
        cfg: the recipe's ``model`` section; ``audio_frames``/``mel_bins``/``image_size`` fix the
            input shapes, the rest the sizes (a tiny test model and ViT-B share this code).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = Backbone(cfg)
        self.decoder = Decoder(cfg, self.backbone.encoder_a.patch_embed.grid, self.backbone.encoder_v.patch_embed.grid)
        self.dproj_a = projection_head(cfg.decoder_dim, cfg)
        self.dproj_v = projection_head(cfg.decoder_dim, cfg)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """MAE's initialisation: xavier-uniform Linears (patch-embedding convs viewed as Linears),
        zero biases, LayerNorms 1/0, learnt embeddings and mask token ~ N(0, 0.02)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight.data.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for p in (
            self.backbone.encoder_a.modality,
            self.backbone.encoder_v.modality,
            self.decoder.mask_token,
            self.decoder.modality_a,
            self.decoder.modality_v,
        ):
            nn.init.normal_(p, std=INIT_STD)

    def forward_encoder(
        self, audio: torch.Tensor, frames: torch.Tensor, mask_ratio_a: float, mask_ratio_v: float,
        with_joint: bool = True,
    ) -> EncoderOutput:
        """audio ``(B, T, F)``, frames ``(B, 3, S, S)`` -> visible tokens, joint tokens, masks; see ``Backbone``."""
        return self.backbone.forward_encoder(audio, frames, mask_ratio_a, mask_ratio_v, with_joint)

    def clip_embeddings(self, tokens_a: torch.Tensor, tokens_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens ``(B, K_a, D)``, ``(B, K_v, D)`` -> z_a, z_v ``(B, proj_dim)`` unit norm; see ``Backbone``."""
        return self.backbone.clip_embeddings(tokens_a, tokens_v)

    def forward_decoder(self, enc: EncoderOutput, pool: bool = True) -> DecoderOutput:
        """Reconstruct all patches from the joint tokens; with ``pool``, pool the masked decoder
        tokens into zd_a, zd_v (L_PCPE's input), else leave them ``None``."""
        pred_a, pred_v, h_a, h_v = self.decoder(enc.joint, enc.tokens_a.shape[1], enc.ids_restore_a, enc.ids_restore_v)
        if not pool:
            return DecoderOutput(pred_a, pred_v, None, None)
        zd_a = F.normalize(self.dproj_a(masked_mean(h_a, enc.mask_a)), dim=-1)
        zd_v = F.normalize(self.dproj_v(masked_mean(h_v, enc.mask_v)), dim=-1)
        return DecoderOutput(pred_a, pred_v, zd_a, zd_v)

    def targets(self, audio: torch.Tensor, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction targets: audio ``(B, T, F)`` -> ``(B, N_a, p*p)``; frames -> ``(B, N_v, p*p*3)``.

        With ``norm_pix_loss`` each patch is standardised by its own mean and variance (MAE), so
        the decoder is not asked to predict a patch's brightness or loudness.
        """
        p = self.cfg.patch_size
        out = []
        for t in (patchify(audio_image(audio), p), patchify(frames, p)):
            if self.cfg.norm_pix_loss:
                t = (t - t.mean(dim=-1, keepdim=True)) / (t.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            out.append(t)
        return out[0], out[1]

    def forward(
        self, audio: torch.Tensor, frames: torch.Tensor, decode: bool = True, pool_decoder: bool = True
    ) -> PCAVMAEOutput:
        """One pre-training pass with the recipe's mask ratios.

        Args:
            audio: ``(B, T, F)`` normalised fbank.
            frames: ``(B, 3, S, S)`` normalised RGB.
            decode: ``False`` skips the decoder (the stage without it), leaving its fields ``None``;
                a flag rather than a separate method so that DDP's forward hooks still run.
            pool_decoder: ``False`` leaves zd_a, zd_v ``None`` (no L_PCPE this batch), so the
                decoder projections get no gradient rather than a zero one: under torch.compile
                an unused output would give them zeros, and AdamW would then decay and count steps
                for weights that eager training leaves alone.
        """
        cfg = self.cfg
        enc = self.forward_encoder(audio, frames, cfg.mask_ratio_audio, cfg.mask_ratio_video, with_joint=decode)
        z_a, z_v = self.clip_embeddings(enc.tokens_a, enc.tokens_v)
        out = PCAVMAEOutput(z_a, z_v, enc.mask_a, enc.mask_v)
        if decode:
            dec = self.forward_decoder(enc, pool=pool_decoder)
            out.zd_a, out.zd_v, out.pred_a, out.pred_v = dec.zd_a, dec.zd_v, dec.pred_a, dec.pred_v
            out.target_a, out.target_v = self.targets(audio, frames)
        return out

    def embed(self, audio: torch.Tensor, frames: torch.Tensor) -> Embeddings:
        """Unmasked clip embeddings z_a, z_v ``(B, proj_dim)`` and the pooled joint token ``(B, D)``."""
        return self.backbone.embed(audio, frames)

    def named_parts(self) -> dict[str, dict[str, nn.Parameter]]:
        """Every parameter, by part (``PARTS``) and full name; each parameter is in exactly one part."""
        out: dict[str, dict[str, nn.Parameter]] = {part: {} for part in PARTS}
        for name, param in self.named_parameters():
            part = next(part for part, prefixes in PARTS.items() if name.startswith(prefixes))
            out[part][name] = param
        return out

    def parts(self) -> dict[str, list[nn.Parameter]]:
        """``{"encoder_a": [...], "encoder_v", "joint", "proj", "decoder", "dproj"}`` parameter lists."""
        return {part: list(params.values()) for part, params in self.named_parts().items()}

    def set_trainable(self, trainable: Collection[str]) -> None:
        """Train the parameters of the parts named in ``trainable`` and freeze all others."""
        unknown = sorted(set(trainable) - set(PARTS))
        if unknown:
            raise UserError(f"unknown model part(s) {', '.join(unknown)}; known: {', '.join(PARTS)}")
        for part, params in self.parts().items():
            for p in params:
                p.requires_grad_(part in trainable)
