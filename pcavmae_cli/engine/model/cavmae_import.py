"""Import a CAV-MAE checkpoint (YuanGongND/cav-mae, ``CAVMAE`` or ``CAVMAEFT``) into pcav's models.

Like timm's ``checkpoint_filter_fn``: the layout is recognised by sentinel keys, the
``module.`` prefix DataParallel added is stripped, and every key is renamed by one explicit
rule of ``RULES``. Unlike a filter, it is strict:

- every source key is either renamed (``mapped``) or matches a ``DROPPED`` rule, which says why
  it carries no information for pcav (``dropped``); any other key is an error naming it;
- every key of the target model is filled, and every shape is the target's; a key nothing
  fills is named by the CAV-MAE key that should have filled it (``RULES`` read backwards);
- the position tables are compared with pcav's sin-cos tables (``sincos_2d``): a pair that
  equals them is dropped (``fixed``), a pair that trained (``tr_pos=True``: CAVMAEFT always,
  CAVMAE when asked) is kept exactly as parameters (``learned``). Encoder and decoder pairs are
  judged apart (``model.pos_embed`` and ``model.decoder_pos_embed``).

The architectures agree element for element (docs/method.md, "Importing CAV-MAE"): the audio
image is ``(B, 1, 128, 1024)`` frequency x time in both, patches row-major over that grid, and a
CAV-MAE ``Block`` with ``modality=None/'a'/'v'`` is pcav's joint block with stream
``av/a/v``. CAV-MAE's modality and decoder blocks carry unused ``norm*_a``/``norm*_v`` pairs
(one ``Block`` class everywhere); those are dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model.embed import sincos_2d
from pcavmae_cli.engine.tensor_io import load_tensors_only

Kind = Literal["pretrain", "finetune"]
Positions = Literal["fixed", "learned"]

SENTINEL = "blocks_u.0.norm1_a.weight"  # the joint block's per-stream norm: CAV-MAE and nothing else
FINETUNE_SENTINEL = "mlp_head.1.weight"  # CAVMAEFT's classification head
PRETRAIN_SENTINEL = "decoder_embed.weight"  # CAVMAE's decoder

_WB = r"(weight|bias)"
_LAYERS = r"(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

# (source pattern, target template, kinds it applies to). Targets name the keys of ``PCAVMAE``
# (pre-training); a fine-tuning import drops the ``backbone.`` prefix (``Classifier``).
RULES: tuple[tuple[str, str, tuple[Kind, ...]], ...] = (
    (rf"patch_embed_([av])\.proj\.{_WB}", r"backbone.encoder_\1.patch_embed.proj.\2", ("pretrain", "finetune")),
    (r"modality_([av])", r"backbone.encoder_\1.modality", ("pretrain", "finetune")),
    (rf"blocks_([av])\.(\d+)\.norm([12])\.{_WB}", r"backbone.encoder_\1.blocks.\2.norm\3.x.\4", ("pretrain", "finetune")),
    (rf"blocks_([av])\.(\d+)\.{_LAYERS}\.{_WB}", r"backbone.encoder_\1.blocks.\2.\3.\4", ("pretrain", "finetune")),
    (rf"blocks_u\.(\d+)\.norm([12])\.{_WB}", r"backbone.joint.blocks.\1.norm\2.av.\3", ("pretrain", "finetune")),
    (rf"blocks_u\.(\d+)\.norm([12])_([av])\.{_WB}", r"backbone.joint.blocks.\1.norm\2.\3.\4", ("pretrain", "finetune")),
    (rf"blocks_u\.(\d+)\.{_LAYERS}\.{_WB}", r"backbone.joint.blocks.\1.\2.\3", ("pretrain", "finetune")),
    (rf"norm\.{_WB}", r"backbone.joint.norm.av.\1", ("pretrain", "finetune")),
    (rf"norm_([av])\.{_WB}", r"backbone.joint.norm.\1.\2", ("pretrain", "finetune")),
    (rf"decoder_embed\.{_WB}", r"decoder.embed.\1", ("pretrain",)),
    (r"mask_token", r"decoder.mask_token", ("pretrain",)),
    (r"decoder_modality_([av])", r"decoder.modality_\1", ("pretrain",)),
    (rf"decoder_blocks\.(\d+)\.norm([12])\.{_WB}", r"decoder.blocks.\1.norm\2.x.\3", ("pretrain",)),
    (rf"decoder_blocks\.(\d+)\.{_LAYERS}\.{_WB}", r"decoder.blocks.\1.\2.\3", ("pretrain",)),
    (rf"decoder_norm\.{_WB}", r"decoder.norm.\1", ("pretrain",)),
    (rf"decoder_pred_([av])\.{_WB}", r"decoder.pred_\1.\2", ("pretrain",)),
    (rf"mlp_head\.([01])\.{_WB}", r"head.\1.\2", ("finetune",)),
)

# Source keys with no place in pcav, and why. Positions are handled by ``_positions``.
DROPPED: tuple[tuple[str, str], ...] = (
    (rf"blocks_[av]\.\d+\.norm[12]_[av]\.{_WB}", "per-stream norms of a modality block, never used by CAV-MAE"),
    (rf"decoder_blocks\.\d+\.norm[12]_[av]\.{_WB}", "per-stream norms of a decoder block, never used by CAV-MAE"),
)
POSITION_KEYS = {"pos_embed_a": "backbone.encoder_a.pos_embed", "pos_embed_v": "backbone.encoder_v.pos_embed"}
DECODER_POSITION_KEYS = {"decoder_pos_embed_a": "decoder.pos_embed_a", "decoder_pos_embed_v": "decoder.pos_embed_v"}
POSITION_ATOL = 1e-5  # float32 rounding of a float64 table, with margin


@dataclass
class Conversion:
    """A CAV-MAE state dict renamed for pcav, and the record of every source key."""

    kind: Kind
    state: dict[str, torch.Tensor]  # pcav keys (``PCAVMAE`` or ``Classifier``) -> tensors
    mapped: dict[str, str] = field(default_factory=dict)  # source key -> pcav key
    dropped: dict[str, str] = field(default_factory=dict)  # source key -> why
    pos_embed: Positions = "fixed"  # what the encoders' positions turned out to be
    decoder_pos_embed: Positions = "fixed"  # and the decoder's (pre-training checkpoints)
    prefix: str = ""  # "module." when DataParallel saved it: source keys in errors carry it


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a CAV-MAE ``.pth``, loaded with ``weights_only=True`` (no code runs).

    CAV-MAE saves ``model.state_dict()`` of a DataParallel model; a dict holding it under
    ``state_dict`` or ``model`` is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    obj = load_tensors_only(path)
    for wrapper in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    return obj


def strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's ``module.`` prefix (all keys have it, or none)."""
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def detect_kind(state: dict[str, torch.Tensor], source: str | Path) -> Kind:
    """``"pretrain"`` (CAVMAE, has the decoder) or ``"finetune"`` (CAVMAEFT, has ``mlp_head``)."""
    if SENTINEL not in state:
        raise UserError(f"{source}: not a CAV-MAE checkpoint (no '{SENTINEL}', the joint block's per-stream norm)")
    has_ft, has_pt = FINETUNE_SENTINEL in state, PRETRAIN_SENTINEL in state
    if has_ft == has_pt:
        raise UserError(f"{source}: holds {'both' if has_ft else 'neither'} '{FINETUNE_SENTINEL}' and '{PRETRAIN_SENTINEL}'")
    return "finetune" if has_ft else "pretrain"


def _rename(key: str, kind: Kind) -> str | None:
    for pattern, target, kinds in RULES:
        if kind in kinds and re.fullmatch(pattern, key):
            out = re.sub(pattern, target, key)
            return out if kind == "pretrain" else out.removeprefix("backbone.")
        # a rule of the other kind (a decoder key in a fine-tuning checkpoint) falls through to an error
    return None


def _why_dropped(key: str) -> str | None:
    return next((why for pattern, why in DROPPED if re.fullmatch(pattern, key)), None)


def _table(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """True when a stored position table equals pcav's sin-cos table."""
    return value.shape == expected.shape and bool(torch.allclose(value.float(), expected, atol=POSITION_ATOL, rtol=0))


def _positions(
    state: dict[str, torch.Tensor], keys: dict[str, str], dim: int, grids: dict[str, tuple[int, int]],
    conv: Conversion, source: str | Path, where: str,
) -> Positions:
    """Judge one pair of position tables (``keys``: source -> pcav key) against ``dim``-wide sin-cos.

    Both equal to sin-cos: dropped, ``"fixed"``. Otherwise they trained (or belong to another
    width, which ``fill_strictly`` then reports by shape) and are kept as they are, ``"learned"``.
    A pre-training checkpoint trains both tables of a pair or neither (CAV-MAE's ``tr_pos``).
    """
    present = [k for k in keys if k in state]
    learned = [k for k in present if not _table(state[k], sincos_2d(dim, *grids[k[-1]])[None])]
    if not learned:
        for key in present:
            conv.dropped[key] = f"fixed sin-cos table, equal to pcav's {where} positions"
        return "fixed"
    if len(learned) != len(present) and conv.kind == "pretrain":  # a missing one: fill_strictly names it
        raise UserError(
            f"{source}: only '{conv.prefix}{learned[0]}' differs from the sin-cos table; expected both or neither"
        )
    for key in present:
        target = keys[key] if conv.kind == "pretrain" else keys[key].removeprefix("backbone.")
        conv.mapped[key], conv.state[target] = target, state[key]
    return "learned"


def convert_state(
    state: dict[str, torch.Tensor], source: str | Path, grids: dict[str, tuple[int, int]], decoder_dim: int | None,
) -> Conversion:
    """Rename a CAV-MAE state dict for pcav.

    Args:
        state: the checkpoint's tensors (``module.`` prefix or not).
        source: names the checkpoint in errors.
        grids: the target model's patch grids ``{"a": (F/p, T/p), "v": (S/p, S/p)}``, for the
            position tables.
        decoder_dim: the target decoder's width (``None`` for a fine-tuning import).
    """
    prefix = "module." if state and all(k.startswith("module.") for k in state) else ""
    state = strip_module(state)
    kind = detect_kind(state, source)
    conv = Conversion(kind, {}, prefix=prefix)
    for key, value in state.items():
        if key in POSITION_KEYS:
            continue
        if key in DECODER_POSITION_KEYS:
            if decoder_dim is None or kind != "pretrain":
                raise UserError(f"{source}: unexpected key '{prefix}{key}' in a CAV-MAE fine-tuning checkpoint")
            continue
        target = _rename(key, kind)
        if target is not None:
            conv.mapped[key], conv.state[target] = target, value
            continue
        why = _why_dropped(key)
        if why is None:
            raise UserError(
                f"{source}: unexpected key '{prefix}{key}' in a CAV-MAE {kind} checkpoint (no rule maps or drops it)"
            )
        conv.dropped[key] = why
    embed_dim = next((state[k].shape[-1] for k in POSITION_KEYS if k in state), 0)
    conv.pos_embed = _positions(state, POSITION_KEYS, embed_dim, grids, conv, source, "encoder")
    if kind == "pretrain" and decoder_dim is not None:
        conv.decoder_pos_embed = _positions(state, DECODER_POSITION_KEYS, decoder_dim, grids, conv, source, "decoder")
    return conv


def _template_regex(template: str) -> str:
    r"""A ``RULES`` target template (``decoder.blocks.\1.\2.\3``) as a regex whose group ``g<n>``
    captures what ``\n`` stood for."""
    out, seen = [], set()
    for i, piece in enumerate(re.split(r"\\(\d)", template)):
        if i % 2 == 0:
            out.append(re.escape(piece))
        else:
            out.append(f"(?P=g{piece})" if piece in seen else f"(?P<g{piece}>.+?)")
            seen.add(piece)
    return "".join(out)


def source_key(target: str, kind: Kind) -> str | None:
    """The CAV-MAE key (without ``module.``) that fills pcav key ``target``: ``RULES`` read
    backwards, each candidate checked by renaming it forwards. ``None`` when no rule makes it."""
    positions = {v: k for k, v in {**POSITION_KEYS, **DECODER_POSITION_KEYS}.items()}
    for full in (target, f"backbone.{target}"):
        if full in positions:
            return positions[full]
        for pattern, template, kinds in RULES:
            match = re.fullmatch(_template_regex(template), full) if kind in kinds else None
            if match is None:
                continue
            values, groups = match.groupdict(), iter(range(1, 100))
            candidate = re.sub(r"\([^()]*\)", lambda _: values.get(f"g{next(groups)}") or "?", pattern)
            candidate = candidate.replace("\\.", ".")
            if _rename(candidate, kind) == target:  # a group the template drops leaves "?": no match
                return candidate
    return None


def fill_strictly(expected: dict[str, torch.Tensor], conv: Conversion, source: str | Path) -> dict[str, torch.Tensor]:
    """``conv.state`` checked against a target model's ``state_dict()``: same keys, same shapes.

    Returns the state as the target's dtypes, ready for ``load_state_dict(strict=True)``.
    """
    missing = sorted(set(expected) - set(conv.state))
    if missing:
        src = source_key(missing[0], conv.kind)
        what = f"no key '{conv.prefix}{src}' for" if src is not None else "no source key fills"
        raise UserError(
            f"{source}: {what} '{missing[0]}' of the recipe's model ({len(missing)} missing); the recipe's model is "
            "not the checkpoint's"
        )
    extra = sorted(set(conv.state) - set(expected))
    if extra:
        src = next(k for k, v in conv.mapped.items() if v == extra[0])
        raise UserError(
            f"{source}: key '{conv.prefix}{src}' -> '{extra[0]}' has no place in the recipe's model "
            f"({len(extra)} such keys)"
        )
    out = {}
    for key, want in expected.items():
        got = conv.state[key]
        if got.shape != want.shape:
            src = next(k for k, v in conv.mapped.items() if v == key)
            raise UserError(
                f"{source}: key '{conv.prefix}{src}' has shape {tuple(got.shape)} but '{key}' of the recipe's "
                f"model has {tuple(want.shape)}"
            )
        out[key] = got.to(want.dtype).contiguous()
    return out
