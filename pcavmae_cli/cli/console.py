"""Rich console helpers shared by the commands: one console, progress bars, error lines."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console()
err_console = Console(stderr=True)


def error_line(message: str) -> None:
    """Print a user error as one line on stderr."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def exit_130_when_stopped() -> Iterator[None]:
    """The engine's ``Stopped`` (Ctrl-C / SIGTERM, what was finished is recorded) as its one line
    on stderr -- ``interrupted: N of M ... done; rerun the same command to continue`` -- and exit
    status 130, the shell's code for Ctrl-C. Open it outside the progress bar, so the bar ends first."""
    import typer

    from pcavmae_cli.engine.interrupt import Stopped

    try:
        yield
    except Stopped as stop:
        err_console.print(f"[yellow]{stop}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _print_flushed(line: str) -> None:
    console.print(line, highlight=False, soft_wrap=True, markup=False)
    console.file.flush()


@contextlib.contextmanager
def _plain_progress(description: str, total: int) -> Iterator[Callable[..., None]]:
    """No bar: one line as the work starts (a log shows what is running), nothing per item."""
    _print_flushed(f"{description}: {total} to do")
    yield lambda n=1, note="": None


@contextlib.contextmanager
def progress_lines(description: str, total: int, every_s: float = 60.0) -> Iterator[Callable[..., None]]:
    """Progress for a log file (nohup, SLURM): a flushed line ``description: done/total  note`` at
    the first item, then at most every ``every_s`` seconds, and at the last. A bar in a file shows
    nothing until it ends, and a days-long download needs its rate read while it runs."""
    import time

    state = {"done": 0, "last": None}

    def advance(n: int = 1, note: str = "") -> None:
        state["done"] += n
        now = time.monotonic()
        if state["last"] is None or now - state["last"] >= every_s or state["done"] >= total:
            state["last"] = now
            _print_flushed(f"{description}: {state['done']}/{total}  {note}".rstrip())

    yield advance


@contextlib.contextmanager
def progress_bar(description: str, total: int, *, bar_width: int | None = 40) -> Iterator[Callable[..., None]]:
    """A Rich progress bar; yields ``advance(n=1, note='')`` for engine callbacks.

    ``bar_width=None`` lets the bar take only the room the other columns leave (long notes).
    """
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=bar_width),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}", style="dim"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(description, total=total, note="")

        def advance(n: int = 1, note: str = "") -> None:
            progress.update(task, advance=n, note=note)

        yield advance


class RichReporter:
    """The engine's ``ProgressReporter`` drawn with Rich: one bar per ``progress`` call, and its
    warnings as ``warning: ...`` lines (not Python warnings: a CLI user gets the line only).

    ``bar_width=None`` suits training, whose notes (loss parts, samples/s) need the room.
    ``plain`` (default: when the output is not a terminal -- nohup, a SLURM log, a pipe): no
    bars, which would print nothing until they end; instead a line when each piece of work
    starts and the training loop's step and epoch lines (``log_line``), each flushed at once.
    """

    def __init__(self, bar_width: int | None = 40, plain: bool | None = None) -> None:
        self.bar_width = bar_width
        self.plain = (not console.is_terminal) if plain is None else plain

    def progress(self, description: str, total: int):
        if self.plain:
            return _plain_progress(description, total)
        return progress_bar(description, total, bar_width=self.bar_width)

    def log_line(self, line: str) -> None:
        """A training step or epoch line (``engine/train/log_lines.py``): printed in plain mode
        only; on a terminal the bars show the same."""
        if self.plain:
            _print_flushed(line)

    def warning(self, message: str, category: type[Warning] = UserWarning) -> None:
        """One line on the console, as the other commands' warnings (``category`` is for Python callers)."""
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)
