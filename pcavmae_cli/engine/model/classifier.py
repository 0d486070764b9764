"""The fine-tuning model: the pre-trained encoders and joint layer, plus a classification head.

Fine-tuning keeps the two modality encoders and the joint layer (with its per-stream norms) and
drops everything else of PCAV-MAE: the decoder, its projections, and the projections to the
contrastive space (METHOD_NOTES, Downstream; CAV-MAE's ``CAVMAEFT`` has none of them either).
No token is masked. The head is CAV-MAE's ``mlp_head``, a LayerNorm then a Linear, on the
mean-pooled joint-layer output of the stream(s) of ``finetune.mode``:

- ``"av"``: the joint layer on the audio+video sequence (its ``av`` norms);
- ``"a"`` / ``"v"``: one modality alone through the joint layer with its own norms;
- ``"sum"``: the pooled outputs of the ``av``, ``a`` and ``v`` streams added (the paper: "the
  sum of the single-modality stream output and the multi-modal stream output ... perform
  similarly").

``load_pretrained`` maps a pre-training checkpoint's keys explicitly and strictly
(``PRETRAINED_KEY_MAP``, ``PRETRAINED_DROPPED``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.backbone import JointLayer, ModalityEncoder, check_config
from pcavmae_cli.engine.model.embed import audio_image
from pcavmae_cli.engine.schema import ModelConfig
from pcavmae_cli.engine.tensor_io import read_safetensors

Mode = Literal["a", "v", "av", "sum"]

# Pre-training key prefix -> classifier key prefix. Every classifier key outside ``head.`` must
# come from one of these; every other pre-training key must be in PRETRAINED_DROPPED.
PRETRAINED_KEY_MAP = {
    "backbone.encoder_a.": "encoder_a.",
    "backbone.encoder_v.": "encoder_v.",
    "backbone.joint.": "joint.",
}
PRETRAINED_DROPPED = ("backbone.proj_a.", "backbone.proj_v.", "decoder.", "dproj_a.", "dproj_v.")
HEAD_PREFIX = "head."
LEARNED_POSITIONS = ("encoder_a.pos_embed", "encoder_v.pos_embed")  # only with model.pos_embed: learned


class Classifier(nn.Module):
    """Encoders + joint layer + head; logits ``(B, num_classes)`` of one frame per clip.

    Args:
        cfg: the recipe's ``model`` section (the pre-training sizes).
        num_classes: C, the rows of the label CSV.
        mode: which joint-layer stream(s) the head reads (module docstring).
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, mode: Mode):
        super().__init__()
        check_config(cfg)
        if mode not in ("a", "v", "av", "sum"):
            raise ValueError(f"mode must be 'a', 'v', 'av' or 'sum', got {mode!r}")
        self.cfg, self.mode, self.num_classes = cfg, mode, num_classes
        self.encoder_a = ModalityEncoder(1, (cfg.mel_bins, cfg.audio_frames), cfg)
        self.encoder_v = ModalityEncoder(3, (cfg.image_size, cfg.image_size), cfg)
        self.joint = JointLayer(cfg)
        self.head = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps), nn.Linear(cfg.embed_dim, num_classes))
        self.num_layers = cfg.depth_modality + cfg.depth_joint
        self.reset_head()

    @property
    def uses_audio(self) -> bool:
        return self.mode != "v"

    @property
    def uses_video(self) -> bool:
        return self.mode != "a"

    def reset_head(self) -> None:
        """CAV-MAE's initialisation of the new head: LayerNorm 1/0, xavier-uniform Linear, zero bias."""
        norm, linear = self.head
        nn.init.ones_(norm.weight)
        nn.init.zeros_(norm.bias)
        nn.init.xavier_uniform_(linear.weight)
        nn.init.zeros_(linear.bias)

    def layer_id(self, name: str) -> int:
        """Depth of parameter ``name`` for layer-wise lr decay: 0 the embeddings, i + 1 block i of
        a modality encoder, ``depth_modality + j + 1`` joint block j, ``num_layers + 1`` the joint
        layer's final norms and the head."""
        parts = name.split(".")
        if parts[0] in ("encoder_a", "encoder_v"):
            return int(parts[2]) + 1 if parts[1] == "blocks" else 0
        if parts[0] == "joint" and parts[1] == "blocks":
            return self.cfg.depth_modality + int(parts[2]) + 1
        return self.num_layers + 1

    def encode_audio(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank ``(B, T, F)`` -> audio encoder tokens ``(B, N_a, D)`` (all of them: no masking)."""
        return self.encoder_a(self.encoder_a.embed(audio_image(fbank)))

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """frames ``(B, 3, S, S)`` -> video encoder tokens ``(B, N_v, D)``."""
        return self.encoder_v(self.encoder_v.embed(frames))

    def pooled(self, tokens_a: torch.Tensor | None, tokens_v: torch.Tensor | None) -> torch.Tensor:
        """The mean-pooled joint-layer output the head reads: ``(B, D)``."""
        streams = []
        if self.mode in ("av", "sum"):
            streams.append(self.joint(torch.cat([tokens_a, tokens_v], dim=1), "av").mean(dim=1))
        if self.mode in ("a", "sum"):
            streams.append(self.joint(tokens_a, "a").mean(dim=1))
        if self.mode in ("v", "sum"):
            streams.append(self.joint(tokens_v, "v").mean(dim=1))
        return torch.stack(streams).sum(dim=0)

    def forward(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """fbank ``(B, T, F)``, frames ``(B, 3, S, S)`` (one frame per clip) -> logits ``(B, C)``."""
        a = self.encode_audio(fbank) if self.uses_audio else None
        v = self.encode_video(frames) if self.uses_video else None
        return self.head(self.pooled(a, v))

    def frame_logits(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Logits of every frame of every clip: fbank ``(B, T, F)``, frames ``(B, K, 3, S, S)`` -> ``(B, K, C)``.

        The same as ``forward`` on each (clip, frame) pair, but the audio encoder runs once per
        clip, not once per frame; an audio-only model runs once and repeats its logits K times.
        """
        B, K = frames.shape[:2]
        a = self.encode_audio(fbank) if self.uses_audio else None
        if not self.uses_video:
            return self.head(self.pooled(a, None)).unsqueeze(1).expand(B, K, self.num_classes)
        v = self.encode_video(frames.flatten(0, 1))  # (B K, N_v, D)
        if a is not None:
            a = a.repeat_interleave(K, dim=0)  # (B K, N_a, D), clip-major like v
        return self.head(self.pooled(a, v)).view(B, K, -1)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: the source file, the keys taken and the keys dropped on purpose."""

    path: Path
    loaded: list[str]  # classifier keys filled from the checkpoint
    dropped: list[str]  # checkpoint keys left out on purpose (decoder, projections)


def map_pretrained(state: dict[str, torch.Tensor], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pre-training keys -> classifier keys, and the keys dropped on purpose.

    A key that is neither mapped nor deliberately dropped is an error naming it: it would mean
    the checkpoint is not a PCAV-MAE pre-training checkpoint of this version.
    """
    mapped, dropped = {}, []
    for key, value in state.items():
        prefix = next((p for p in PRETRAINED_KEY_MAP if key.startswith(p)), None)
        if prefix is not None:
            mapped[PRETRAINED_KEY_MAP[prefix] + key[len(prefix) :]] = value
        elif key.startswith(PRETRAINED_DROPPED):
            dropped.append(key)
        else:
            raise UserError(f"{path}: unexpected key '{key}' (not a PCAV-MAE pre-training checkpoint?)")
    return mapped, sorted(dropped)


def load_pretrained(model: Classifier, path: str | Path) -> LoadReport:
    """Fill every encoder and joint-layer weight of ``model`` from a pre-training ``model.safetensors``.

    Strict: a classifier key the checkpoint lacks, a checkpoint key that fits nowhere, or a shape
    that differs is a ``UserError`` naming the key. The head is left as initialised (fresh).
    """
    path = Path(path)
    return load_pretraining_state(model, read_safetensors(path), path)


def load_pretraining_state(model: Classifier, state: dict[str, torch.Tensor], source: str | Path) -> LoadReport:
    """``load_pretrained`` on a PCAV-MAE state dict already in memory (``source`` names it in errors)."""
    source = Path(source)
    mapped, dropped = map_pretrained(state, source)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(HEAD_PREFIX)}
    for key in LEARNED_POSITIONS:
        # A fixed-position checkpoint fine-tuned with ``pos_embed: learned`` (CAV-MAE's tr_pos):
        # the positions start as the sin-cos table the checkpoint was trained with.
        if key in own and key not in mapped:
            mapped[key] = own[key].clone()
    missing = sorted(set(own) - set(mapped))
    if missing:
        raise UserError(
            f"{source}: no weight for '{missing[0]}' ({len(missing)} missing); the recipe's model is not the checkpoint's"
        )
    unexpected = sorted(set(mapped) - set(own))
    if unexpected:
        raise UserError(f"{source}: key '{unexpected[0]}' has no place in the fine-tuning model ({len(unexpected)} such keys)")
    for key, value in mapped.items():
        if value.shape != own[key].shape:
            raise UserError(
                f"{source}: key '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the recipe's model"
            )
    head = {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)}
    model.load_state_dict({**mapped, **head}, strict=True)
    return LoadReport(path=source, loaded=sorted(mapped), dropped=dropped)
