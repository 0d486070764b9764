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

With a ``PrototypeHeadSpec`` the head is instead a ``PrototypeHead`` (``prototype_head.py``):
the model keeps the projections to the contrastive space (``proj_a``, ``proj_v``, from the
pre-training checkpoint), embeds the clip as the E-step does, and its logits are a linear
function of the clip's similarities to the pre-training prototypes.

``load_pretrained`` maps a pre-training checkpoint's keys explicitly and strictly
(``PRETRAINED_KEY_MAP``, ``PRETRAINED_DROPPED``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.backbone import JointLayer, ModalityEncoder, check_config, projection_head
from pcavmae_cli.engine.model.embed import audio_image
from pcavmae_cli.engine.model.prototype_head import PrototypeHead, PrototypeHeadSpec
from pcavmae_cli.engine.prototypes.step import joint_embedding
from pcavmae_cli.engine.schema import FinetuneConfig, ModelConfig
from pcavmae_cli.engine.tensor_io import open_safetensors, read_safetensors

Mode = Literal["a", "v", "av", "sum"]

# Pre-training key prefix -> classifier key prefix. Every classifier key outside ``head.`` must
# come from one of these; every other pre-training key must be in PRETRAINED_DROPPED.
PRETRAINED_KEY_MAP = {
    "backbone.encoder_a.": "encoder_a.",
    "backbone.encoder_v.": "encoder_v.",
    "backbone.joint.": "joint.",
}
PRETRAINED_DROPPED = ("backbone.proj_a.", "backbone.proj_v.", "decoder.", "dproj_a.", "dproj_v.")
# Kept, not dropped, by a model with a prototype head: it embeds clips in the contrastive space.
PROJECTION_KEY_MAP = {"backbone.proj_a.": "proj_a.", "backbone.proj_v.": "proj_v."}
HEAD_PREFIX = "head."
LEARNED_POSITIONS = ("encoder_a.pos_embed", "encoder_v.pos_embed")  # only with model.pos_embed: learned


class Classifier(nn.Module):
    """Encoders + joint layer + head; logits ``(B, num_classes)`` of one frame per clip.

    Args:
        cfg: the recipe's ``model`` section (the pre-training sizes).
        num_classes: C, the rows of the label CSV.
        mode: which joint-layer stream(s) the head reads (module docstring).
        prototype_head: ``None`` for the linear head, else the prototype head's shape.
    """

    def __init__(self, cfg: ModelConfig, num_classes: int, mode: Mode, prototype_head: PrototypeHeadSpec | None = None):
        super().__init__()
        check_config(cfg)
        if mode not in ("a", "v", "av", "sum"):
            raise ValueError(f"mode must be 'a', 'v', 'av' or 'sum', got {mode!r}")
        self.cfg, self.mode, self.num_classes = cfg, mode, num_classes
        self.encoder_a = ModalityEncoder(1, (cfg.mel_bins, cfg.audio_frames), cfg)
        self.encoder_v = ModalityEncoder(3, (cfg.image_size, cfg.image_size), cfg)
        self.joint = JointLayer(cfg)
        self.prototype_head = prototype_head
        if prototype_head is None:
            self.head = nn.Sequential(nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps), nn.Linear(cfg.embed_dim, num_classes))
        else:  # the contrastive space of pre-training, where the prototypes live
            self.proj_a = projection_head(cfg.embed_dim, cfg)
            self.proj_v = projection_head(cfg.embed_dim, cfg)
            self.head = PrototypeHead(prototype_head, cfg.proj_dim, num_classes)
        self.num_layers = cfg.depth_modality + cfg.depth_joint
        self.reset_head()

    @property
    def uses_audio(self) -> bool:
        return self.mode != "v"

    @property
    def uses_video(self) -> bool:
        return self.mode != "a"

    @property
    def head_linear(self) -> nn.Linear:
        """The head's last layer: the logits are ``head_linear(head_input(...))``."""
        return self.head.linear if self.prototype_head is not None else self.head[1]

    def reset_head(self) -> None:
        """CAV-MAE's initialisation of the new head: LayerNorm 1/0, xavier-uniform Linear, zero bias
        (the prototype head: its Linear alike; its prototypes come from the pre-training run)."""
        if self.prototype_head is None:
            norm = self.head[0]
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)
        nn.init.xavier_uniform_(self.head_linear.weight)
        nn.init.zeros_(self.head_linear.bias)

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

    def embedding(self, tokens_a: torch.Tensor | None, tokens_v: torch.Tensor | None) -> torch.Tensor:
        """The clip in the contrastive space, as pre-training embeds it: ``(B, proj_dim)`` unit norm.

        ``a``: z_a; ``v``: z_v; ``av`` and ``sum``: the E-step's joint embedding of the two."""
        z_a = z_v = None
        if tokens_a is not None:
            z_a = F.normalize(self.proj_a(self.joint(tokens_a, "a").mean(dim=1)), dim=-1)
        if tokens_v is not None:
            z_v = F.normalize(self.proj_v(self.joint(tokens_v, "v").mean(dim=1)), dim=-1)
        if z_a is None or z_v is None:
            return z_a if z_v is None else z_v
        return joint_embedding(z_a, z_v)

    def head_input(self, tokens_a: torch.Tensor | None, tokens_v: torch.Tensor | None) -> torch.Tensor:
        """What ``head_linear`` reads: LayerNorm(pooled) ``(B, D)``, or the prototype similarities ``(B, P)``."""
        if self.prototype_head is None:
            return self.head[0](self.pooled(tokens_a, tokens_v))
        return self.head.similarities(self.embedding(tokens_a, tokens_v))

    def forward(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """fbank ``(B, T, F)``, frames ``(B, 3, S, S)`` (one frame per clip) -> logits ``(B, C)``."""
        a = self.encode_audio(fbank) if self.uses_audio else None
        v = self.encode_video(frames) if self.uses_video else None
        return self.head_linear(self.head_input(a, v))

    def frame_logits(self, fbank: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
        """Logits of every frame of every clip: fbank ``(B, T, F)``, frames ``(B, K, 3, S, S)`` -> ``(B, K, C)``.

        The same as ``forward`` on each (clip, frame) pair, but the audio encoder runs once per
        clip, not once per frame; an audio-only model runs once and repeats its logits K times.
        """
        B, K = frames.shape[:2]
        a = self.encode_audio(fbank) if self.uses_audio else None
        if not self.uses_video:
            return self.head_linear(self.head_input(a, None)).unsqueeze(1).expand(B, K, self.num_classes)
        v = self.encode_video(frames.flatten(0, 1))  # (B K, N_v, D)
        if a is not None:
            a = a.repeat_interleave(K, dim=0)  # (B K, N_a, D), clip-major like v
        return self.head_linear(self.head_input(a, v)).view(B, K, -1)


@dataclass
class LoadReport:
    """What ``load_pretrained`` did: the source file, the keys taken and the keys dropped on purpose."""

    path: Path
    loaded: list[str]  # classifier keys filled from the checkpoint
    dropped: list[str]  # checkpoint keys left out on purpose (decoder, projections)


def map_pretrained(
    state: dict[str, torch.Tensor], path: Path, keep_projections: bool = False
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Pre-training keys -> classifier keys, and the keys dropped on purpose.

    A key that is neither mapped nor deliberately dropped is an error naming it: it would mean
    the checkpoint is not a PCAV-MAE pre-training checkpoint of this version. With
    ``keep_projections`` (a prototype head) the projections are mapped too (``PROJECTION_KEY_MAP``).
    """
    key_map = {**PRETRAINED_KEY_MAP, **(PROJECTION_KEY_MAP if keep_projections else {})}
    mapped, dropped = {}, []
    for key, value in state.items():
        prefix = next((p for p in key_map if key.startswith(p)), None)
        if prefix is not None:
            mapped[key_map[prefix] + key[len(prefix) :]] = value
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
    mapped, dropped = map_pretrained(state, source, keep_projections=model.prototype_head is not None)
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


def checkpoint_head_sizes(path: Path) -> tuple[int, ...] | None:
    """Prototypes per granularity of the prototype head saved in ``path`` (``None``: a linear head)."""
    with open_safetensors(path) as fh:
        if "head.sizes" not in fh.keys():
            return None
        return tuple(int(n) for n in fh.get_tensor("head.sizes").tolist())


def checkpoint_classes(path: Path) -> int | None:
    """The number of classes the head saved in ``path`` predicts (``None`` when it has no head)."""
    with open_safetensors(path) as fh:
        key = next((k for k in ("head.1.weight", "head.linear.weight") if k in fh.keys()), None)
        return None if key is None else int(fh.get_slice(key).get_shape()[0])


def load_classifier_checkpoint(path: Path, cfg: ModelConfig, num_classes: int, ft: FinetuneConfig,
                               device: torch.device | None = None) -> Classifier:  # fmt: skip
    """A fine-tuned ``Classifier`` from its ``model.safetensors`` and its run's ``finetune`` section.

    The prototype head's sizes come from the file itself (``head.sizes``), its trainability and
    temperature from the recipe. A file whose head is not the recipe's ``finetune.head``, or that
    predicts another number of classes, is a ``UserError`` naming it.
    """
    from pcavmae_cli.engine.train import checkpoint as ckpt  # train imports model: import late

    sizes = checkpoint_head_sizes(path)
    wanted = ft.head or "linear"
    if (sizes is not None) != (wanted == "prototype"):
        found = "a prototype head" if sizes is not None else "a linear head"
        raise UserError(f"{path} holds {found} but the run's key 'finetune.head' is {wanted!r}")
    if sizes is not None and ft.prototype_head is None:
        raise UserError(f"{path} holds a prototype head but the run's recipe has no 'finetune.prototype_head'")
    rows = checkpoint_classes(path)
    if rows is not None and rows != num_classes:
        raise UserError(f"{path} predicts {rows} classes but the label CSV lists {num_classes}")
    spec = None
    if sizes is not None:
        spec = PrototypeHeadSpec(sizes, ft.prototype_head.trainable_prototypes, ft.prototype_head.temperature)
    model = Classifier(cfg, num_classes, ft.mode, prototype_head=spec)
    ckpt.load_module(path, model, torch.device("cpu"))
    return model if device is None else model.to(device)
