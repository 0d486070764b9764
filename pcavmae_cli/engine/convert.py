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


@dataclass
class ConvertResult:
    kind: str  # "pretrain" or "finetune"
    out: Path  # the run folder
    checkpoint: Path  # its checkpoints/last
    conversion: Conversion
    recipe: str
    num_classes: int | None  # fine-tuning imports: rows of mlp_head


def _recipe(name: str, kind: str, out: Path, mode: str, overrides: Sequence[str], pos_embed: str | None) -> Recipe:
    raw = config.apply_overrides(config.load_raw(name), list(overrides))
    raw.setdefault("train", {})["run_dir"] = str(out)
    if pos_embed is not None:
        raw["model"]["pos_embed"] = pos_embed
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
    state = strip_module(read_checkpoint(source))
    kind = detect_kind(state, source)
    name = recipe or DEFAULT_RECIPES[kind]
    cfg = _recipe(name, kind, out, mode, overrides, None)
    m, p = cfg.model, cfg.model.patch_size
    grids = {"a": (m.mel_bins // p, m.audio_frames // p), "v": (m.image_size // p, m.image_size // p)}
    conv = convert_state(state, source, grids, m.decoder_dim if kind == "pretrain" else None)
    if conv.pos_embed != m.pos_embed:  # the checkpoint decides whether its positions trained
        cfg = _recipe(name, kind, out, mode, overrides, conv.pos_embed)

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
        "mapped": conv.mapped, "dropped": conv.dropped,
    }  # fmt: skip
    atomic_write_text(out / "conversion.json", json.dumps(report, indent=2) + "\n")
    return ConvertResult(kind, out, folder, conv, name, num_classes)
