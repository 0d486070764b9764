"""TensorBoard event files of a training run (``RUN/tensorboard/``), next to ``metrics.jsonl``.

``metrics.jsonl`` stays the record; the event files mirror each of its lines as scalars, so a
run can be watched with ``tensorboard --logdir runs/`` as timm, Hugging Face and Lightning
users expect. A scalar's tag is ``KIND/KEY`` (``step/loss_total``, ``epoch/val_top1``,
``epoch/health_cos_a``); a list (prototypes per granularity) becomes ``KEY/g0``, ``KEY/g1``; the
x axis is the optimiser step. On by default (``train.tensorboard``); without the tensorboard
package (``pip install 'pcavmae-cli[tensorboard]'``) the run says so once and goes on. A resumed
run purges the events after its resume step, so the curves do not fold back.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

SKIP = {"kind", "step", "epoch", "stage", "time", "prototypes", "metric"}
FOLDER = "tensorboard"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The tags and values one metrics line gives (numbers and lists of numbers; ``None`` skipped)."""
    kind = record.get("kind", "line")
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in SKIP or isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{kind}/{key}"] = float(value)
        elif isinstance(value, list):
            for j, v in enumerate(value):
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    out[f"{kind}/{key}/g{j}"] = float(v)
    if "epoch" in record:
        out[f"{kind}/epoch"] = float(record["epoch"])  # 1-based, as everywhere
    return out


class TensorBoardLog:
    """Writes each metrics line's scalars; a no-op when disabled, off the main rank, or without
    the tensorboard package (``warn`` is then called once with the reason)."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None, warn=None):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            if warn is not None:
                warn("train.tensorboard is on but the tensorboard package is missing "
                     "(pip install 'pcavmae-cli[tensorboard]'); metrics.jsonl has everything")  # fmt: skip
            return
        self.writer = SummaryWriter(log_dir=str(run_dir / FOLDER), purge_step=purge_step)

    def write(self, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        step = int(record.get("step", 0))
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)
        if record.get("kind") == "epoch":
            self.writer.flush()  # an epoch line is a natural point for a watcher to see it

    def image(self, tag: str, png: Path, step: int) -> None:
        """A figure (a PNG file) as image ``tag`` at ``step``."""
        if self.writer is None:
            return
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            self.writer.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
