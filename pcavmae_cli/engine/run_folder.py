"""A run folder's recipe, wherever the folder now lives: the paths it names, rebased.

Why: a run is shared or moved (copied to a cluster, to a colleague, to another directory), and
its ``config.yaml`` names files outside it -- the manifests it trained on, the label CSV, the
pre-training run it was fine-tuned from. Written relative to the directory training was started
in, they break as soon as a command runs anywhere else. So:

- **At training start** (``portable_recipe``) every path key is made absolute, and the label
  CSV is copied into the run folder as ``labels.csv``: the label names travel with the weights,
  and the recipe records where the run folder and its inputs were (``train.run_dir``).
- **When a run is read** (``read_run_recipe``) each path key is resolved in turn: the path as
  written, if it exists; else the same path *relative to the run folder's old place*, applied to
  its new place (the project folder was moved or copied whole: ``/old/proj/runs/ft`` and
  ``/old/proj/corpus/labels.csv`` become ``/new/proj/...``); else, for the label CSV, the run's
  own ``labels.csv``. ``train.run_dir`` becomes where the folder is now. ``key=value`` overrides
  come last and win (``data.train_manifest=...`` where the data now lives elsewhere).

A path that resolves nowhere is left as written: the command that needs it fails with the key
named and the override to give, and commands that do not need it (``predict`` and ``embed``
need neither manifests nor the pre-training run) work.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pcavmae_cli.engine import config
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write
from pcavmae_cli.engine.schema import Recipe

PATH_KEYS = (("data", "train_manifest"), ("data", "eval_manifest"), ("data", "label_csv"), ("finetune", "init_from"))
LABELS_COPY = "labels.csv"  # the run's own copy of its label CSV


def run_dir_of(checkpoint: Path) -> Path:
    """The run folder of a checkpoint folder (``RUN/checkpoints/NAME``), or the folder itself."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint


def _absolute(path: str | None) -> str | None:
    return None if path is None else os.path.abspath(path)


def portable_recipe(cfg: Recipe) -> Recipe:
    """``cfg`` with every path key and ``train.run_dir`` absolute (module docstring)."""
    data = dataclasses.replace(cfg.data, **{key: _absolute(getattr(cfg.data, key)) for section, key in PATH_KEYS
                                            if section == "data"})  # fmt: skip
    out = dataclasses.replace(cfg, data=data)
    if cfg.train is not None:
        out = dataclasses.replace(out, train=dataclasses.replace(cfg.train, run_dir=_absolute(cfg.train.run_dir)))
    if cfg.finetune is not None:
        out = dataclasses.replace(out, finetune=dataclasses.replace(cfg.finetune, init_from=_absolute(cfg.finetune.init_from)))
    return out


def keep_labels(cfg: Recipe, run_dir: Path) -> Path | None:
    """Copy the recipe's label CSV into the run folder (``labels.csv``); ``None`` without one."""
    source = cfg.data.label_csv
    if source is None or not Path(source).is_file():
        return None
    target = run_dir / LABELS_COPY
    if Path(source).resolve() != target.resolve():
        atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
    return target


def _rebased(path: str, old_run: str | None, run_dir: Path) -> str | None:
    """Where ``path`` is now, or ``None`` when it is found nowhere."""
    if Path(path).exists():
        return path
    if old_run and os.path.isabs(old_run) and os.path.isabs(path):
        moved = os.path.normpath(run_dir.absolute() / os.path.relpath(path, old_run))
        if Path(moved).exists():
            return moved
    return None


def rebase(raw: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """A run's raw recipe with its paths resolved for the folder's current place (module docstring)."""
    train = raw.get("train") or {}
    old_run = train.get("run_dir")
    for section, key in PATH_KEYS:
        part = raw.get(section)
        if not isinstance(part, dict) or not isinstance(part.get(key), str):
            continue
        found = _rebased(part[key], old_run, run_dir)
        if found is None and (section, key) == ("data", "label_csv") and (run_dir / LABELS_COPY).is_file():
            found = str(run_dir / LABELS_COPY)
        if found is not None:
            part[key] = found
    if isinstance(raw.get("train"), dict):
        raw["train"]["run_dir"] = str(run_dir)
    return raw


def read_run_recipe(config_path: Path, overrides: Sequence[str] = (), *, run_dir: Path | None = None) -> Recipe:
    """The recipe a run (or checkpoint) folder stored, rebased to where the folder is, with
    ``overrides`` on top. A recipe written before the ``evaluate`` section takes ``base``'s."""
    try:
        raw = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise UserError(f"{config_path}: cannot read the run's recipe ({exc})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{config_path}: not a recipe (expected a mapping of sections)")
    raw = rebase(raw, run_dir if run_dir is not None else run_dir_of(config_path.parent))
    if raw.get("evaluate") is None:
        raw["evaluate"] = config.load_raw("base")["evaluate"]
    return config.build(Recipe, config.apply_overrides(raw, list(overrides)))
