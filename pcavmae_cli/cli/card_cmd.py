"""``pcav card RUN...``: (re)write each run folder's model card, README.md."""

from __future__ import annotations

from pathlib import Path

import typer

from pcavmae_cli.cli.console import console


def card(
    runs: list[Path] = typer.Argument(..., help="Run folders.", metavar="RUN...", show_default=False),
) -> None:
    """Write RUN/README.md: what the run is (recipe, data, epochs, metrics, labels) and how to use it.

    Training writes it after every checkpoint; run this after pcav evaluate put results under
    RUN/eval/, or for a run trained before cards existed. It reads only the folder's own files.

    Example: pcav card pcav-demo/runs/finetune
    """
    from pcavmae_cli.engine.model_card import write_model_card

    for run in runs:
        console.print(f"wrote {write_model_card(run)}", highlight=False)
