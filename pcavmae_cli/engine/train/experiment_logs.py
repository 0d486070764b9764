"""Where a training run's metrics lines go besides ``metrics.jsonl``: TensorBoard (on by default,
``train.tensorboard``) and Weights & Biases (``train.wandb``). One object for the trainers, so
that each line, and each figure drawn during training, reaches every tracker the recipe asks for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcavmae_cli.engine.schema import TrainConfig
from pcavmae_cli.engine.train.tensorboard_log import TensorBoardLog
from pcavmae_cli.engine.train.wandb_log import WandbLog


class ExperimentLogs:
    """The trackers of one run (only on the main rank; each a no-op where off or not installed).

    Args:
        purge_step: a resumed run's first step: TensorBoard drops its events from there on.
        config: the recipe as a dict, for W&B's run config.
    """

    def __init__(self, run_dir: Path, train: TrainConfig, is_main: bool, *, purge_step: int | None = None,
                 config: dict[str, Any] | None = None, warn=None):  # fmt: skip
        self.sinks = [
            TensorBoardLog(run_dir, train.tensorboard and is_main, purge_step=purge_step, warn=warn),
            WandbLog(run_dir, train.wandb and is_main, config=config, warn=warn),
        ]

    def write(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def image(self, tag: str, png: Path, step: int) -> None:
        for sink in self.sinks:
            sink.image(tag, png, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
