"""Plain progress lines of a training run, and its whole-run ETA.

Why: a run days long is mostly watched through a file (``nohup``, a SLURM log), where progress
bars print nothing until they end. So each metrics line the loop writes (a step line every
``train.log_every`` optimiser steps, an epoch line) is also offered to the reporter as one
plain line (``ProgressReporter.log_line``, optional): the CLI prints it, flushed, when its
output is not a terminal. The ETA is for the whole run (every stage), from the pace of the
steps this process has done; rates keep two significant digits, so a slow run reads ``0.41/s``
rather than ``0/s``.
"""

from __future__ import annotations

import math
import time
from typing import Any

SHORT = {"loss_total": "loss", "loss_infonce": "nce", "loss_r": "r", "loss_pje": "pje", "loss_pcpe": "pcpe",
         "loss": "loss"}  # fmt: skip


def significant(x: float, digits: int = 2) -> str:
    """``x`` with at least ``digits`` significant digits, never in exponent form (whole numbers
    keep all their digits): 28.3 -> "28", 0.4137 -> "0.41", 1234.5 -> "1234"."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    decimals = max(0, digits - 1 - int(math.floor(math.log10(abs(x)))))
    return f"{round(x, decimals):.{decimals}f}"


def duration(seconds: float) -> str:
    """``42s``, ``7m05s``, ``3h12m``, ``2d04h``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


class RunClock:
    """Whole-run ETA from the steps this process has done (a resumed run starts its own clock)."""

    def __init__(self, total_steps: int, start_step: int, now: float | None = None):
        self.total_steps, self.start_step = total_steps, start_step
        self.started = time.perf_counter() if now is None else now

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds left for the whole run, or ``None`` before the first step of this process."""
        done = step - self.start_step
        if done <= 0:
            return None
        elapsed = (time.perf_counter() if now is None else now) - self.started
        return elapsed / done * max(self.total_steps - step, 0)

    def note(self, step: int) -> str:
        """`` ETA run 3h12m`` for a progress bar's note, empty before the first step."""
        eta = self.eta(step)
        return "" if eta is None else f" ETA run {duration(eta)}"


def log_line(record: dict[str, Any], total_epochs: int, total_steps: int, eta: float | None) -> str:
    """One metrics record as a line a person reads in a log file (its epoch, 1-based, as written)."""
    validation = [f"{k} {v:.4g}" for k, v in record.items() if k.startswith("val_") and isinstance(v, float)]
    if record["kind"] == "averaged":  # fine-tuning's averaged weights: validation figures only
        first, last = record["averaged_epochs"]
        return "  ".join([f"averaged weights of epochs {first}-{last}", *validation])
    step, epoch = f"step {record['step']}/{total_steps}", f"epoch {record['epoch']}/{total_epochs}"
    # a step line: the means since the last one; an epoch line: the epoch's means
    parts = [step, epoch] if record["kind"] == "step" else [f"{epoch} done", step]
    parts.append(f"stage {record['stage']}")
    parts += [f"{label} {record[key]:.4g}" for key, label in SHORT.items() if record.get(key) is not None]
    parts += validation
    parts.append(f"lr {record['lr']:.3g}")
    parts.append(f"{significant(record['samples_per_s'])} samples/s")
    if record.get("peak_memory_gb") is not None:  # epoch lines: the process's peak (memory.py)
        parts.append(f"mem {record['peak_memory_gb']:.1f} GB")
    parts.append(f"ETA run {duration(eta)}" if eta is not None else "ETA run -")
    return "  ".join(parts)


def tell(reporter: Any, record: dict[str, Any], total_epochs: int, total_steps: int, clock: RunClock,
         is_main: bool = True) -> None:  # fmt: skip
    """Offer ``record`` as a plain line to a reporter that takes them (``log_line``; rank 0 only)."""
    take = getattr(reporter, "log_line", None)
    if take is not None and is_main:
        take(log_line(record, total_epochs, total_steps, clock.eta(record["step"])))
