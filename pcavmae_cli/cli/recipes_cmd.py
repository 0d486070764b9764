"""``pcav recipes list|show|copy``: browse, print and copy the shipped recipes."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli.console import console
from pcavmae_cli.cli.options import OVERRIDES_HELP
from pcavmae_cli.engine import config, recipes
from pcavmae_cli.engine.errors import UserError

app = typer.Typer(
    help="List, print and copy the shipped YAML recipes.",
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
    """Print a recipe fully resolved (parents merged, overrides applied, validated).

    Example: pcav recipes show demo data.loader.batch_size=4
    """
    if raw:
        typer.echo(recipes.resolve(recipe).read_text(), nl=False)
        return
    resolved = config.load_recipe(recipe, overrides or [])
    typer.echo(config.dump_yaml(resolved), nl=False)


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
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(header + config.dump_yaml(resolved))
    shutil.move(tmp, target)
    console.print(f"wrote [bold]{target}[/]")
