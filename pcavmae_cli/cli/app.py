"""The ``pcav`` command: one Typer app, each command group in its own module.

``main`` turns a ``UserError`` from anywhere in the engine into one red line and exit
status 1, and so an ``OSError`` the user's storage caused (a full disk or quota, a read-only
or forbidden folder: ``files.storage_error_line``), naming the file; any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import sys

import typer

from pcavmae_cli import __version__
from pcavmae_cli.cli import (
    bench_cmd,
    card_cmd,
    convert_cmd,
    demo_cmd,
    demo_data_cmd,
    download_cmd,
    embed_cmd,
    evaluate_cmd,
    explain_cmd,
    export_cmd,
    finetune_cmd,
    pack_cmd,
    predict_cmd,
    preprocess_cmd,
    pretrain_cmd,
    recipes_cmd,
    runs_cmd,
    search_cmd,
    stats_cmd,
    visualize_cmd,
)
from pcavmae_cli.cli.console import console, error_line
from pcavmae_cli.cli.help_text import reflow_commands
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import storage_error_line

app = typer.Typer(
    name="pcav",
    help=(
        "PCAV-MAE from data to explanations: download and preprocess audio-visual clips, "
        "pre-train, fine-tune, evaluate, visualise and explain, driven by YAML recipes.\n\n"
        "Start with `pcav demo` (the whole pipeline on a small built-in corpus) and "
        "`pcav recipes list`."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        console.print(f"pcav {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Root options."""


app.command("demo")(demo_cmd.demo)
app.command("demo-data")(demo_data_cmd.demo_data)
app.add_typer(recipes_cmd.app, name="recipes")
app.command("download")(download_cmd.download)
app.command("preprocess")(preprocess_cmd.preprocess)
app.command("stats")(stats_cmd.stats)
app.command("pack")(pack_cmd.pack)
app.command("pretrain")(pretrain_cmd.pretrain)
app.command("finetune")(finetune_cmd.finetune)
app.command("evaluate")(evaluate_cmd.evaluate)
app.add_typer(visualize_cmd.app, name="visualize")
app.command("explain")(explain_cmd.explain)
app.command("embed")(embed_cmd.embed)
app.command("predict")(predict_cmd.predict)
app.command("card")(card_cmd.card)
app.command("search")(search_cmd.search)
app.command("export")(export_cmd.export)
app.command("runs")(runs_cmd.runs)
app.add_typer(convert_cmd.app, name="convert")
app.command("bench")(bench_cmd.bench)
reflow_commands(app)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except UserError as exc:
        error_line(str(exc))
        sys.exit(1)
    except OSError as exc:
        line = storage_error_line(exc)
        if line is None:
            raise
        error_line(line)
        sys.exit(1)
