"""How long engine work reports its progress, without the engine knowing about Rich.

Every long-running engine function (pre-training, fine-tuning, evaluation, embedding, the demo)
takes a ``ProgressReporter``; the CLI passes one that draws Rich progress bars. Called from Python
(a script, a notebook) without a reporter, the engine draws tqdm bars (``tqdm.auto``: a widget in
Jupyter, text elsewhere), the convention of Python ML libraries; ``TQDM_DISABLE=1`` turns them off,
``SilentReporter`` shows nothing. One definition here so that every command's bars behave alike.
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


class TqdmReporter:
    """tqdm bars (``tqdm.auto``): the default of library calls, so that ``pretrain(cfg)`` in a
    notebook shows its progress like any other Python ML library. tqdm's own ``TQDM_*``
    environment variables apply (``TQDM_DISABLE=1``, ``TQDM_MININTERVAL=5``).
    """

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        from tqdm.auto import tqdm  # here: the CLI never needs it

        with tqdm(total=total, desc=description, unit="it", dynamic_ncols=True) as bar:

            def advance(n: int = 1, note: str = "") -> None:
                if note:
                    bar.set_postfix_str(str(note), refresh=False)
                bar.update(n)

            yield advance


def default_reporter(reporter: ProgressReporter | None) -> ProgressReporter:
    """``reporter``, or tqdm bars when the caller passed none (library use)."""
    return reporter if reporter is not None else TqdmReporter()
