"""``pcav runs [FOLDER]``: the run folders under FOLDER, with their status and best metric."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from pcavmae_cli.cli.console import console


def runs(
    folder: Path = typer.Argument(Path("."), help="Where to look (run folders up to 4 levels down).", metavar="FOLDER"),
) -> None:
    """List the runs under FOLDER: kind, recipe, status (finished / stopped at step N), best metric, time.

    Example: pcav runs pcav-demo/runs
    """
    from pcavmae_cli.engine.runs_table import list_runs

    rows = list_runs(folder)
    if not rows:
        console.print(f"no run folders under {escape(str(folder))}", highlight=False)
        return
    table = Table(title=f"runs under {escape(str(folder))}", header_style="bold", title_justify="left")
    table.add_column("run", no_wrap=True)
    table.add_column("kind")
    table.add_column("recipe", no_wrap=True, overflow="ellipsis", max_width=32)
    table.add_column("status")
    table.add_column("best")
    table.add_column("hours", justify="right")
    for r in rows:
        where = r.path.relative_to(folder) if r.path != folder else Path(r.path.name)
        table.add_row(escape(str(where)), r.kind, escape(r.description), r.status, r.best, f"{r.hours:.2f}")
    console.print(table)
