"""``pcav recipes list|show|check|copy``: browse, print, validate and copy the shipped recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli.console import console
from pcavmae_cli.cli.options import OVERRIDES_HELP
from pcavmae_cli.engine import config, recipes
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import atomic_write_text

app = typer.Typer(
    help="List, print, check and copy the shipped YAML recipes.",
    no_args_is_help=True,
)


@app.command("list")
def list_recipes() -> None:
    """One line per shipped recipe.

    Example: pcav recipes list
    """
    table = Table(show_header=True, header_style="bold")
    table.add_column("recipe")
    table.add_column("what it is for")
    for name in recipes.names():
        table.add_row(name, recipes.description(name))
    console.print(table)


@app.command("show")
def show(
    recipe: str = typer.Argument(..., help="Recipe name or YAML path.", metavar="NAME|PATH"),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]..."),
    raw: bool = typer.Option(False, "--raw", help="Print the file as written, without resolving."),
) -> None:
    """Print a recipe fully resolved (parents merged, overrides applied, validated as pretrain
    and finetune validate it at start-up).

    Example: pcav recipes show demo data.loader.batch_size=4
    """
    if raw:
        typer.echo(config.read_text(recipes.resolve(recipe)), nl=False)
        return
    resolved = _validated(recipe, overrides or [])
    typer.echo(config.dump_yaml(resolved), nl=False)


def _validated(recipe: str, overrides: list[str]):
    """The recipe with every start-up check of the commands it is for passed (``check_any``)."""
    from pcavmae_cli.engine.train.checks import check_any  # imports torch: not for --help

    resolved = config.load_recipe(recipe, overrides)
    check_any(resolved)
    return resolved


@app.command("check")
def check(
    recipe: str = typer.Argument(..., help="Recipe name or YAML path.", metavar="NAME|PATH"),
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]..."),
) -> None:
    """Validate a recipe without training: every start-up check of pretrain/finetune, and the
    manifests and label CSV it names. Prints one "ok" line, or the error (exit status 1).

    Example: pcav recipes check demo optim.lr=1e-3
    """
    from pcavmae_cli.engine.train.checks import check_any, check_inputs

    resolved = config.load_recipe(recipe, overrides or [])
    uses = check_any(resolved)
    check_inputs(resolved)
    what = " and ".join(uses) if uses else "data settings"
    console.print(f"ok: {recipe} is a valid recipe ({what})", highlight=False)


@app.command("copy")
def copy(
    recipe: str = typer.Argument(..., help="Shipped recipe name.", metavar="NAME"),
    dest: Path = typer.Argument(..., help="Where to write the copy (a file or a folder)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Copy a shipped recipe to edit it, fully resolved so that it stands alone.

    Example: pcav recipes copy demo my_recipe.yaml && pcav recipes show my_recipe.yaml
    """
    target = dest / f"{recipe}.yaml" if dest.is_dir() else dest
    if target.exists() and not force:
        raise UserError(f"{target} exists; pass --force to overwrite it")
    resolved = config.load_recipe(recipe)
    header = f"# Copied from the shipped recipe '{recipe}' (resolved, stands alone).\n"
    atomic_write_text(target, header + config.dump_yaml(resolved))
    console.print(f"wrote [bold]{target}[/]")
