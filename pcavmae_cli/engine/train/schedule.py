"""The learning-rate schedules: linear warm-up, then cosine decay to ``optim.min_lr`` (or, for
fine-tuning, CAV-MAE's per-epoch step decay, ``StepSchedule``).

One schedule spans the whole run, every stage included: the stages split the epochs
(sec. 3.2: "400 epochs for the PJE and 200 epochs for the joint decoder") but the paper names a
single cosine schedule with warm-up, so stage 2 continues the decay where stage 1 left it rather
than restarting it. The rate changes every optimiser step (not every epoch), as in MAE.

With ``n = step + 1`` the number of optimiser steps taken once step ``step`` (0-based) is done,
``W`` the warm-up steps and ``T`` the total:

- ``n <= W``: ``lr * n / W`` (the first step already moves; the W-th reaches the peak);
- ``n > W``: ``min_lr + (lr - min_lr) * (1 + cos(pi * (n - W) / (T - W))) / 2``, which is the
  peak just after warm-up and exactly ``min_lr`` at the last step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pcavmae_cli.engine.schema import OptimConfig


def lr_at(step: int, *, total: int, warmup: int, peak: float, min_lr: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) out of ``total``, ``warmup`` of warm-up."""
    n = step + 1
    if n <= warmup:
        return peak * n / warmup
    progress = min(1.0, (n - warmup) / max(1, total - warmup))
    return min_lr + (peak - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Schedule:
    """The run's schedule in optimiser steps.

    Args:
        steps_per_epoch: optimiser steps in one epoch (after accumulation and the step cap).
        epochs: all epochs of all stages.
        optim: the recipe's ``optim`` section (``lr``, ``min_lr``, ``warmup_epochs``).
    """

    steps_per_epoch: int
    epochs: int
    optim: OptimConfig

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def warmup_steps(self) -> int:
        """``optim.warmup_epochs`` (fractional allowed) in steps, at most the whole run."""
        return min(self.total_steps, round(self.optim.warmup_epochs * self.steps_per_epoch))

    def lr(self, step: int) -> float:
        return lr_at(
            step, total=self.total_steps, warmup=self.warmup_steps, peak=self.optim.lr, min_lr=self.optim.min_lr
        )


@dataclass
class StepSchedule(Schedule):
    """Fine-tuning's step decay (CAV-MAE's ``MultiStepLR`` stepped once per epoch), after a linear warm-up.

    Epoch e (0-based) runs at ``lr x decay^k``, k = 0 before epoch ``start_epoch`` and
    ``1 + (e - start_epoch) // every_epochs`` from it on: with start 5, every 1, decay 0.5 (AS-20K)
    epochs 1..5 (1-based) run at lr, epoch 6 at lr / 2, epoch 7 at lr / 4. During the warm-up
    (``optim.warmup_epochs``, in optimiser steps as ``Schedule``, whose step counts it shares)
    that rate is scaled by n / W.
    """

    start_epoch: int
    every_epochs: int
    decay: float

    def lr(self, step: int) -> float:
        epoch = step // max(1, self.steps_per_epoch)
        decays = 0 if epoch < self.start_epoch else 1 + (epoch - self.start_epoch) // self.every_epochs
        rate = self.optim.lr * self.decay**decays
        n = step + 1
        return rate * n / self.warmup_steps if n <= self.warmup_steps else rate
