"""Checkpoints of a run: ``run_dir/checkpoints/last/`` and ``run_dir/checkpoints/best/``.

A pre-training checkpoint is a folder (``FILES``):

- ``model.safetensors``: the whole PCAV-MAE (encoders, joint layer, projections, decoder);
- ``momentum.safetensors``: the momentum encoder's backbone;
- ``state.pt``: the training state (optimiser, step, epoch, position in the epoch, RNG states,
  best metric), plain tensors and Python containers only, so it loads with
  ``torch.load(..., weights_only=True)``;
- ``config.yaml``: the resolved recipe the weights belong to.

A fine-tuning checkpoint (``FINETUNE_FILES``) has no momentum encoder: ``model.safetensors`` is
the classifier (encoders, joint layer, head); it may add ``average.safetensors``, the running
sum of the weights being averaged (``finetune.average_from_epoch``). ``save_files`` writes any
such set of weight files; ``save_checkpoint`` is its pre-training form.

Writes are atomic: everything goes to a temporary sibling folder first, which then replaces
the old one by renames (old -> ``.NAME.old``, new -> ``NAME``, then the old one is removed). A
crash or an error at any point leaves either the previous checkpoint or the new one complete;
``find_checkpoint`` also finds the previous one in the instant between the two renames. The
temporary folder is ``.NAME.tmp-PID.N@HOST`` (``engine/files.py``): one left by a writer that was
killed (kill -9, a power cut) is a whole model copy, so every checkpoint write and every
start-up of a run (``resume_point``) deletes those whose process is gone.

Files get the umask's mode like every other output (safetensors alone would make them 0600), and
a full disk surfaces as the ``OSError`` it is, naming the file (``engine/tensor_io.py``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pcavmae_cli.engine import files as output_files
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.tensor_io import load_tensors_only, read_safetensors, write_safetensors, write_torch

FILES = ("model.safetensors", "momentum.safetensors", "state.pt", "config.yaml")
FINETUNE_FILES = ("model.safetensors", "state.pt", "config.yaml")

Weights = nn.Module | dict[str, torch.Tensor]


def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # a network file system reports a full disk here: name the file
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    finally:
        os.close(fd)


def _tensors(weights: Weights) -> dict[str, torch.Tensor]:
    items = weights.state_dict().items() if isinstance(weights, nn.Module) else weights.items()
    return {k: v.detach().to("cpu").contiguous() for k, v in items}


def write_files(folder: Path, weights: dict[str, Weights], state: dict[str, Any], config_text: str) -> None:
    """Write ``STEM.safetensors`` for each entry of ``weights``, ``state.pt`` and ``config.yaml``
    into the (new, empty) ``folder``."""
    folder.mkdir(parents=True)
    names = []
    for stem, tensors in weights.items():
        write_safetensors(_tensors(tensors), folder / f"{stem}.safetensors")
        names.append(f"{stem}.safetensors")
    write_torch(state, folder / "state.pt")
    (folder / "config.yaml").write_text(config_text, encoding="utf-8")
    for name in (*names, "state.pt", "config.yaml"):
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
    """Write pre-training checkpoint ``name`` (``last`` or ``best``) of ``run_dir`` atomically."""
    return save_files(run_dir, name, weights={"model": model, "momentum": momentum}, state=state, config_text=config_text)


def save_files(
    run_dir: str | Path,
    name: str,
    *,
    weights: dict[str, Weights],
    state: dict[str, Any],
    config_text: str,
) -> Path:
    """Write checkpoint ``name`` of ``run_dir`` (weight files ``weights``) atomically; returns its folder."""
    root = checkpoints_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    output_files.remove_stale_temps(root)
    final, old, tmp = root / name, root / f".{name}.old", output_files.temp_path(root / name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_files(tmp, weights, state, config_text)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def find_checkpoint(run_dir: str | Path, name: str = "last", files: tuple[str, ...] = FILES) -> Path | None:
    """The complete checkpoint folder ``name`` of ``run_dir`` (holding ``files``), or ``None``."""
    root = checkpoints_root(run_dir)
    for folder in (root / name, root / f".{name}.old"):
        if all((folder / f).is_file() for f in files):
            return folder
    return None


def resume_point(run_dir: str | Path, resume: bool, files: tuple[str, ...] = FILES) -> Path | None:
    """``checkpoints/last`` to resume from (``train.resume``), or ``None`` for a new run.

    A new run never overwrites an existing one, and a resume needs something to resume.
    Temporaries of checkpoint writes killed mid-way are deleted here (module docstring).
    """
    output_files.remove_stale_temps(checkpoints_root(run_dir))
    existing = find_checkpoint(run_dir, "last", files)
    if resume:
        if existing is None:
            raise UserError(f"key 'train.resume' is true but {run_dir} holds no checkpoints/last to resume")
        return existing
    if existing is not None:
        raise UserError(
            f"{run_dir} already holds a run ({existing}); set train.resume=true to continue it "
            "or choose another train.run_dir"
        )
    return None


def load_state(folder: Path) -> dict[str, Any]:
    """The training state of a checkpoint folder: plain tensors only, no code runs (``tensor_io.load_tensors_only``)."""
    return load_tensors_only(folder / "state.pt")


def load_weights(folder: Path, model: nn.Module, momentum: nn.Module, device: torch.device) -> None:
    """Load both weight files into ``model`` and ``momentum``, strictly (every key, every shape)."""
    for file, module in (("model.safetensors", model), ("momentum.safetensors", momentum)):
        load_module(folder / file, module, device)


def load_module(path: Path, module: nn.Module, device: torch.device) -> None:
    """Load one safetensors file into ``module``, strictly; a mismatch is a ``UserError`` naming it."""
    try:
        module.load_state_dict(read_safetensors(path, device), strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise UserError(f"{path} does not fit the recipe's model ({detail})") from None
