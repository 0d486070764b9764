"""Checkpoints of a run: ``run_dir/checkpoints/last/`` and ``run_dir/checkpoints/best/``.

A checkpoint is a folder:

- ``model.safetensors``: the whole PCAV-MAE (encoders, joint layer, projections, decoder);
- ``momentum.safetensors``: the momentum encoder's backbone;
- ``state.pt``: the training state (optimiser, step, epoch, position in the epoch, RNG states,
  best metric), plain tensors and Python containers only, so it loads with
  ``torch.load(..., weights_only=True)``;
- ``config.yaml``: the resolved recipe the weights belong to.

Writes are atomic: everything goes to a temporary sibling folder first, which then replaces
the old one by renames (old -> ``.NAME.old``, new -> ``NAME``, then the old one is removed). A
crash or an error at any point leaves either the previous checkpoint or the new one complete;
``find_checkpoint`` also finds the previous one in the instant between the two renames.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import nn

from pcavmae_cli.engine.errors import UserError

FILES = ("model.safetensors", "momentum.safetensors", "state.pt", "config.yaml")


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def write_folder(folder: Path, model: nn.Module, momentum: nn.Module, state: dict[str, Any], config_text: str) -> None:
    """Write the four files of a checkpoint into the (new, empty) ``folder``."""
    folder.mkdir(parents=True)
    st.save_file(_tensors(model), str(folder / "model.safetensors"))
    st.save_file(_tensors(momentum), str(folder / "momentum.safetensors"))
    torch.save(state, folder / "state.pt")
    (folder / "config.yaml").write_text(config_text, encoding="utf-8")
    for name in FILES:
        _fsync(folder / name)


def save_checkpoint(
    run_dir: str | Path,
    name: str,
    *,
    model: nn.Module,
    momentum: nn.Module,
    state: dict[str, Any],
    config_text: str,
) -> Path:
    """Write checkpoint ``name`` (``last`` or ``best``) of ``run_dir`` atomically; returns its folder."""
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final, old, tmp = root / name, root / f".{name}.old", root / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_folder(tmp, model, momentum, state, config_text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str | Path, name: str = "last") -> Path | None:
    """The complete checkpoint folder ``name`` of ``run_dir``, or ``None`` if there is none."""
    root = checkpoints_root(run_dir)
    for folder in (root / name, root / f".{name}.old"):
        if all((folder / f).is_file() for f in FILES):
            return folder
    return None


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder (``weights_only`` load)."""
    try:
        return torch.load(folder / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise UserError(f"{folder / 'state.pt'}: cannot read the training state ({exc})") from None


def load_weights(folder: Path, model: nn.Module, momentum: nn.Module, device: torch.device) -> None:
    """Load both weight files into ``model`` and ``momentum``, strictly (every key, every shape)."""
    for file, module in (("model.safetensors", model), ("momentum.safetensors", momentum)):
        path = folder / file
        try:
            module.load_state_dict(st.load_file(str(path), device=str(device)), strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            detail = first[1].strip() if len(first) > 1 else first[0]
            raise UserError(f"{path} does not fit the recipe's model ({detail})") from None
