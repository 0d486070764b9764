"""Stopping a run cleanly: Ctrl-C and SIGTERM ask the loop to stop at the next safe point.

The first SIGINT (Ctrl-C) or SIGTERM only sets a flag; the loop checks it before each batch
(and each E-step batch) and raises ``KeyboardInterrupt`` there, which the loop answers by
writing ``checkpoints/last`` from the last optimiser-step boundary and raising ``Interrupted``.
A second Ctrl-C raises ``ForcedStop`` at once and nothing is written (the previous ``last``
stays). Handlers are installed only in the main thread (Python allows no other).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType


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
