"""Weights & Biases mirror of a training run's metrics lines (``train.wandb``), an optional extra.

``metrics.jsonl`` stays the record; like ``tensorboard_log`` this sends each line's scalars
(the same ``KIND/KEY`` names, so W&B groups them by ``step/`` and ``epoch/``) at the line's
optimiser step, and the figures drawn during pre-training as images. The W&B run lives in
``RUN/wandb/``; its id is kept in ``RUN/wandb/run_id`` so that a resumed pcav run continues the
same W&B run. Off by default; ``pip install 'pcavmae-cli[wandb]'``. Without an account or a
network, ``WANDB_MODE=offline`` writes the run to disk for a later ``wandb sync``. The project is
``$WANDB_PROJECT`` (default ``pcav``); the run's name is the run folder's.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

from pcavmae_cli.engine.data.manifest import atomic_write_text
from pcavmae_cli.engine.train.tensorboard_log import scalars

FOLDER = "wandb"


def run_id(run_dir: Path) -> str:
    """The W&B run id of this run folder: made once, kept in ``RUN/wandb/run_id``."""
    path = run_dir / FOLDER / "run_id"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    made = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, made + "\n")
    return made


class WandbLog:
    """Sends each metrics line's scalars; a no-op when disabled, off the main rank, or without
    the wandb package (``warn`` is then called once with the reason)."""

    def __init__(self, run_dir: Path, enabled: bool, config: dict[str, Any] | None = None, warn=None):
        self.run = None
        if not enabled:
            return
        try:
            import wandb
        except ImportError:
            if warn is not None:
                warn("train.wandb is on but the wandb package is missing (pip install 'pcavmae-cli[wandb]'); "
                     "metrics.jsonl has everything")  # fmt: skip
            return
        self.wandb = wandb
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "pcav"), name=run_dir.name, id=run_id(run_dir),
            resume="allow", dir=str(run_dir), config=config or {},
        )  # fmt: skip

    def write(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(scalars(record), step=int(record.get("step", 0)))

    def image(self, tag: str, png: Path, step: int) -> None:
        if self.run is not None:
            self.run.log({tag: self.wandb.Image(str(png))}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
