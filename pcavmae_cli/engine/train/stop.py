"""Stopping a run cleanly: Ctrl-C and SIGTERM ask the loop to stop at the next safe point.

The first SIGINT (Ctrl-C) or SIGTERM only sets a flag; the loop checks it before each batch
(and each E-step batch) and raises ``KeyboardInterrupt`` there, which the loop answers by
writing ``checkpoints/last`` from the last optimiser-step boundary and raising ``Interrupted``.
Under DDP the ranks agree on the flags in the E-step and at the training loop's flush points
(``pending.py``), so a stop there waits for the next one: up to ``train.log_every`` steps.
A second Ctrl-C raises ``ForcedStop`` at once and nothing is written (the previous ``last``
stays). Handlers are installed only in the main thread (Python allows no other).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any


class Interrupted(KeyboardInterrupt):
    """The run stopped on request after writing ``checkpoint`` (``None``: nothing to write)."""

    def __init__(self, checkpoint: Path | None, step: int, epoch: int, reason: str):
        super().__init__(reason)
        self.checkpoint, self.step, self.epoch, self.reason = checkpoint, step, epoch, reason


class ForcedStop(KeyboardInterrupt):
    """A second Ctrl-C: stop now, write nothing."""


class StopRequests:
    """Context manager turning SIGINT/SIGTERM into a flag that ``check`` raises on."""

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self) -> None:
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise ForcedStop("second Ctrl-C")
        self.reason = self.SIGNALS.get(signum, f"signal {signum}")

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` if a stop was asked for."""
        if self.reason is not None:
            raise KeyboardInterrupt(self.reason)


def run_stoppable(
    run_epoch: Callable[[StopRequests], None],
    finished: Callable[[], bool],
    save_last: Callable[[], Path | None],
    boundary: Callable[[], dict[str, Any]],
    cleanup: Callable[[], None],
) -> None:
    """Run epochs until ``finished()``, the same way for pre-training and fine-tuning.

    A stop request (or a ``RuntimeError`` it caused, e.g. loader workers killed by the same
    SIGTERM) writes ``checkpoints/last`` through ``save_last`` and raises ``Interrupted`` with the
    step and epoch of ``boundary()["train"]``; a second Ctrl-C (``ForcedStop``) writes nothing.
    ``cleanup`` (closing the loaders) runs in every case, before the signal handlers are restored.
    """
    with StopRequests() as stop:
        try:
            try:
                while not finished():
                    run_epoch(stop)
            except RuntimeError:
                if stop.reason is None:
                    raise
                raise KeyboardInterrupt(stop.reason) from None
        except ForcedStop:
            raise
        except KeyboardInterrupt as exc:
            path = save_last()
            train = boundary()["train"]
            raise Interrupted(path, train["step"], train["epoch"], str(exc) or "KeyboardInterrupt") from None
        finally:
            cleanup()


def call_on_step(on_step: Callable[[Any], None] | None, info: Any, *, defer: bool) -> KeyboardInterrupt | None:
    """``on_step(info)`` if given. With ``defer`` (a flush point comes next in the loop), a
    ``KeyboardInterrupt`` it raises is returned instead, for the loop to raise after the flush:
    the step line is written first and, under DDP, the flush tells every rank to stop too.
    Elsewhere it propagates at once (nothing read is due at that boundary)."""
    if on_step is None:
        return None
    try:
        on_step(info)
    except KeyboardInterrupt as exc:
        if not defer:
            raise
        return exc
    return None
