"""``pcav convert cavmae``: a CAV-MAE ``.pth`` -> a pcav run folder the other commands accept.

The folder looks like one ``pcav pretrain`` or ``pcav finetune`` writes (``config.yaml``,
``checkpoints/last/``), so ``pcav finetune --init-from``, ``pcav evaluate`` and ``pcav embed``
take it as they are. A pre-training import (``CAVMAE``) is a ``PCAVMAE`` whose momentum encoder is
a copy of its backbone (CAV-MAE has none); a fine-tuning import (``CAVMAEFT``) is a
``Classifier`` whose head is CAV-MAE's ``mlp_head``. ``conversion.json`` lists every source key
with the pcav key it became or the reason it was dropped.

The model comes from a recipe (``cavmae_base`` or ``finetune_cavmae`` unless told otherwise),
with ``key=value`` overrides; the checkpoint's tensors must fill it exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.model import PCAVMAE, Classifier, MomentumEncoder
from pcavmae_cli.engine.model.cavmae_import import (
    FINETUNE_SENTINEL,
    Conversion,
    convert_state,
    detect_kind,
    fill_strictly,
    read_checkpoint,
    strip_module,
)
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train import checkpoint as ckpt

DEFAULT_RECIPES = {"pretrain": "cavmae_base", "finetune": "finetune_cavmae"}
# How CAV-MAE's dataloader normalises the fbank its checkpoints were trained on: (x - mean) / std,
# no factor 2, with these statistics for AudioSet and VGGSound alike (its egs/*/run_*.sh). The
# run folder records them whatever the recipe says, so evaluate/embed feed the model its own
# input scale; key=value overrides still win (a CAV-MAE model trained on other statistics).
CAVMAE_FBANK = {"mean": -5.081, "std": 4.4849, "std_scale": 1.0}


@dataclass
class ConvertResult:
    kind: str  # "pretrain" or "finetune"
    out: Path  # the run folder
    checkpoint: Path  # its checkpoints/last
    conversion: Conversion
    recipe: str
    num_classes: int | None  # fine-tuning imports: rows of mlp_head


def _recipe(
    name: str, kind: str, out: Path, mode: str, overrides: Sequence[str], positions: dict[str, str] | None = None,
) -> Recipe:
    """The run's recipe: ``name`` with CAV-MAE's input normalisation, the overrides, and
    ``positions`` (``model.pos_embed`` / ``model.decoder_pos_embed``) as the checkpoint has them."""
    raw = config.load_raw(name)
    raw.setdefault("data", {}).setdefault("audio", {}).setdefault("fbank", {}).update(CAVMAE_FBANK)
    raw = config.apply_overrides(raw, list(overrides))
    raw.setdefault("train", {})["run_dir"] = str(out)
    if positions:
        raw["model"].update(positions)
    if kind == "finetune":
        if raw.get("finetune") is None:
            raise UserError(f"recipe '{name}' has no 'finetune' section; a CAVMAEFT checkpoint needs a fine-tuning recipe")
        raw["finetune"].update(mode=mode, init_from=None)
    cfg = config.build(Recipe, raw)
    if cfg.model is None:
        raise UserError(f"recipe '{name}' has no 'model' section")
    return cfg


def convert_cavmae(
    source: str | Path, out: str | Path, *, recipe: str | None = None, mode: str = "av", overrides: Sequence[str] = (),
) -> ConvertResult:
    """Import CAV-MAE checkpoint ``source`` into a new run folder ``out`` (never overwritten)."""
    source, out = Path(source), Path(out)
    if ckpt.checkpoints_root(out).exists():
        raise UserError(f"{out} already holds checkpoints; choose a new output folder")
    raw_state = read_checkpoint(source)
    state = strip_module(raw_state)
    kind = detect_kind(state, source)
    name = recipe or DEFAULT_RECIPES[kind]
    cfg = _recipe(name, kind, out, mode, overrides)
    m, p = cfg.model, cfg.model.patch_size
    grids = {"a": (m.mel_bins // p, m.audio_frames // p), "v": (m.image_size // p, m.image_size // p)}
    conv = convert_state(raw_state, source, grids, m.decoder_dim if kind == "pretrain" else None)
    # The checkpoint decides whether its positions trained.
    positions = {"pos_embed": conv.pos_embed, "decoder_pos_embed": conv.decoder_pos_embed}
    if positions != {"pos_embed": m.pos_embed, "decoder_pos_embed": m.decoder_pos_embed}:
        cfg = _recipe(name, kind, out, mode, overrides, positions)

    num_classes = None
    if kind == "finetune":
        num_classes = int(state[FINETUNE_SENTINEL].shape[0])
        model = Classifier(cfg.model, num_classes, cfg.finetune.mode)
    else:
        model = PCAVMAE(cfg.model)
    model.load_state_dict(fill_strictly(model.state_dict(), conv, source), strict=True)
    weights: dict[str, torch.nn.Module] = {"model": model}
    if kind == "pretrain":
        weights["momentum"] = MomentumEncoder(model)  # CAV-MAE has no EMA encoder: start it as the model
    config_text = config.dump_yaml(cfg)
    state_record = {"converted_from": str(source), "kind": kind}
    folder = ckpt.save_files(out, "last", weights=weights, state=state_record, config_text=config_text)
    atomic_write_text(out / "config.yaml", config_text)
    report = {
        "source": str(source), "kind": kind, "recipe": name, "pos_embed": conv.pos_embed,
        "decoder_pos_embed": conv.decoder_pos_embed, "mapped": conv.mapped, "dropped": conv.dropped,
    }  # fmt: skip
    atomic_write_text(out / "conversion.json", json.dumps(report, indent=2) + "\n")
    return ConvertResult(kind, out, folder, conv, name, num_classes)
