"""How long engine work reports its progress, without the engine knowing about Rich.

Every long-running engine function (pre-training, fine-tuning, evaluation, embedding, the demo)
takes a ``ProgressReporter``; the CLI passes one that draws Rich progress bars. Called from Python
(a script, a notebook) without a reporter, the engine draws tqdm bars (``tqdm.auto``: a widget in
Jupyter, text elsewhere), the convention of Python ML libraries; ``TQDM_DISABLE=1`` turns them off,
``SilentReporter`` shows nothing. One definition here so that every command's bars behave alike.

A reporter also shows the run's warnings (``warning``): the CLI as one line on its console, the
library reporters as a Python warning of the given category, the channel Python callers expect
(their filters decide whether and how often it shows). Exactly one of the two, never both.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import ContextManager, Protocol


class ProgressReporter(Protocol):
    """``progress(description, total)`` yields ``advance(n=1, note="")`` for one bar;
    ``warning(message, category)`` shows one warning about the work (a one-line ``message``)."""

    def progress(self, description: str, total: int) -> ContextManager[Callable[..., None]]: ...

    def warning(self, message: str, category: type[Warning] = UserWarning) -> None: ...


class PythonWarnings:
    """``warning`` as a Python warning: what library callers get (``warnings.catch_warnings``,
    ``-W`` and ``filterwarnings`` apply). Attributed to the engine line that reported it."""

    def warning(self, message: str, category: type[Warning] = UserWarning) -> None:
        warnings.warn(message, category, stacklevel=2)


class SilentReporter(PythonWarnings):
    """A reporter that draws nothing (tests, library use); its warnings are Python warnings."""

    @contextlib.contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        yield lambda n=1, note="": None


class TqdmReporter(PythonWarnings):
    """tqdm bars (``tqdm.auto``): the default of library calls, so that ``pretrain(cfg)`` in a
    notebook shows its progress like any other Python ML library. tqdm's own ``TQDM_*``
    environment variables apply (``TQDM_DISABLE=1``, ``TQDM_MININTERVAL=5``). Warnings are
    Python warnings.
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


class _WithPythonWarnings:
    """A caller's reporter that has ``progress`` only (written before ``warning`` existed): its
    bars, and Python warnings."""

    def __init__(self, reporter: object) -> None:
        self.reporter = reporter

    def progress(self, description: str, total: int) -> ContextManager[Callable[..., None]]:
        return self.reporter.progress(description, total)

    def warning(self, message: str, category: type[Warning] = UserWarning) -> None:
        warnings.warn(message, category, stacklevel=2)


def default_reporter(reporter: ProgressReporter | None) -> ProgressReporter:
    """``reporter``, or tqdm bars when the caller passed none (library use); a reporter without
    ``warning`` gets Python warnings, so the engine can always call it."""
    if reporter is None:
        return TqdmReporter()
    return reporter if hasattr(reporter, "warning") else _WithPythonWarnings(reporter)
