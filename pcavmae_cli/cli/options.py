"""Options shared by every recipe-driven command, so they read the same everywhere."""

from __future__ import annotations

import typer

RECIPE_HELP = "Shipped recipe name (see `pcav recipes list`) or path to a YAML recipe."
OVERRIDES_HELP = "Recipe overrides as key.sub=value, e.g. data.loader.batch_size=16."

Recipe = typer.Option("demo", "--recipe", "-r", help=RECIPE_HELP, metavar="NAME|PATH")
Overrides = typer.Argument(None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]...", show_default=False)
