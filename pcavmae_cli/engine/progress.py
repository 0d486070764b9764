"""How long engine work reports its progress, without the engine knowing about Rich.

Every long-running engine function (pre-training, fine-tuning, evaluation, embedding, the demo)
takes a ``ProgressReporter``; the CLI passes one that draws Rich progress bars, tests and library
callers get ``SilentReporter``. One definition here so that every command's bars behave alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import ContextManager, Protocol


class ProgressReporter(Protocol):
    """``progress(description, total)`` yields ``advance(n=1, note="")`` for one bar."""

    def progress(self, description: str, total: int) -> ContextManager[Callable[..., None]]: ...


class SilentReporter:
    """A reporter that shows nothing (tests, library use)."""

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        yield lambda n=1, note="": None
