"""Logged losses kept on the device until a flush point, so the training step never waits for the GPU.

Reading a loss back (``.item()``, ``.tolist()``, ``float(t)``) makes the host wait until the GPU
has run everything queued before it. Done for every micro-batch, that keeps the loop from running
ahead of the GPU: the next batch's kernels are launched only once the last one's have finished.
So the loops keep each micro-batch's logged parts as one detached device tensor in a
``PendingLosses`` and read them all in one transfer at a *flush point*: every ``train.log_every``
optimiser steps, at the end of an epoch, and before a checkpoint is written. The floats read are
the ones a per-batch read gave, and the loops add them to their ``Meter``s in the same order, so
the logged means and ``metrics.jsonl`` are unchanged; what changes is *when* the host knows them
(the progress note and ``StepInfo.losses`` show the means as of the last flush).

A non-finite loss is found at the flush too: ``Flushed.first_non_finite`` names the first bad
micro-batch and the optimiser step it counted towards, so the error names the step it happened
at. The weights after such a step are garbage; since every checkpoint write is preceded by a
flush, none is written after an undetected NaN.

Under DDP (``distributed.py``) the flush is one float64 all-reduce of every pending micro-batch's
clip-weighted values (``v * n_r``, divided by the global batch's clips after the sum: the global
batch's means, as the per-micro-batch reduction gave them) with each rank's stop request appended.
Every rank flushes at the same points with the same number of pending micro-batches, so all see
the same sums, raise on the same NaN, and agree to stop at the same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pcavmae_cli.engine.train.distributed import sum_across
from pcavmae_cli.engine.train.metrics import Meter


def first_non_finite(values: dict[str, float]) -> tuple[str, float] | None:
    """The first loss part (``total`` last: the part that made it so is the better name) that is
    NaN or infinite, with its value."""
    for name in sorted(values, key=lambda n: n == "total"):
        if not math.isfinite(values[name]):
            return name, values[name]
    return None


@dataclass(frozen=True)
class PendingBatch:
    """One micro-batch's logged parts, still on the device."""

    step: int  # the optimiser step it counts towards (1-based: steps done before it + 1)
    names: tuple[str, ...]
    values: Tensor  # (len(names),) detached, on the device
    clips: int  # this rank's clips
    samples: int  # the global micro-batch's clips (``clips`` in one process)


@dataclass(frozen=True)
class FlushedBatch:
    step: int
    values: dict[str, float]  # the global-batch means of the parts
    samples: int


@dataclass(frozen=True)
class Flushed:
    """What a flush read: the micro-batches in order, and whether any rank asked to stop."""

    batches: list[FlushedBatch]
    stop: bool = False

    def first_non_finite(self) -> tuple[int, str, float] | None:
        """``(step, part, value)`` of the first micro-batch with a NaN or infinite part."""
        for batch in self.batches:
            bad = first_non_finite(batch.values)
            if bad is not None:
                return batch.step, *bad
        return None


class PendingLosses:
    """The logged parts of the micro-batches since the last flush (module docstring)."""

    def __init__(self) -> None:
        self.batches: list[PendingBatch] = []

    def __len__(self) -> int:
        return len(self.batches)

    def add(self, step: int, logged: dict[str, Tensor], clips: int, samples: int | None = None) -> None:
        """Keep ``logged`` (0-dim tensors) of a micro-batch of ``clips`` clips on this rank and
        ``samples`` in the global micro-batch (default ``clips``). Launches a stack, reads nothing."""
        names = tuple(logged)
        values = torch.stack([logged[n].detach() for n in names])
        self.batches.append(PendingBatch(step, names, values, clips, clips if samples is None else samples))

    def flush(self, reduce_on: torch.device | None = None, stop: bool = False) -> Flushed:
        """Read every pending micro-batch in one transfer, and forget them.

        Args:
            reduce_on: under DDP, the device of the all-reduce (``distributed.comm_device``): the
                values become global-batch means and ``Flushed.stop`` is whether any rank asked
                to stop. ``None``: this rank's values as they are and nothing sent (one process,
                or a rank that must not enter a collective because the others may be elsewhere).
            stop: this rank's stop request (sent only with ``reduce_on``).
        """
        pending, self.batches = self.batches, []
        if not pending:
            return Flushed([])
        if reduce_on is None:
            flat, asked = torch.cat([p.values for p in pending]).tolist(), False
        else:
            weighted = [p.values.to(reduce_on, torch.float64) * p.clips for p in pending]
            flag = torch.full((1,), float(stop), dtype=torch.float64, device=reduce_on)
            flat = sum_across(torch.cat([*weighted, flag])).tolist()
            asked = flat.pop() > 0
        batches, at = [], 0
        for p in pending:
            row = flat[at : at + len(p.names)]
            at += len(row)
            if reduce_on is not None:
                row = [v / p.samples for v in row]
            batches.append(FlushedBatch(p.step, dict(zip(p.names, row)), p.samples))
        return Flushed(batches, asked)

    def read_into(
        self,
        meters: Sequence[Meter],
        diverged: Callable[[int, str, float], Exception],
        *,
        reduce_on: torch.device | None = None,
        stop: bool = False,
        up_to: int | None = None,
    ) -> Flushed:
        """``flush``, then what both training loops do with it: raise ``diverged(step, part,
        value)`` at the first non-finite micro-batch, else add every micro-batch (of steps up to
        ``up_to``, if given: a checkpoint's boundary) to ``meters`` in batch order."""
        flushed = self.flush(reduce_on, stop)
        bad = flushed.first_non_finite()
        if bad is not None:
            raise diverged(*bad)
        for batch in flushed.batches:
            if up_to is None or batch.step <= up_to:
                for meter in meters:
                    meter.add(batch.values, batch.samples)
        return flushed


def finite_weights(model: torch.nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite (one read of the device; not for the hot loop)."""
    return bool(torch.stack([p.detach().isfinite().all() for p in model.parameters()]).all())
