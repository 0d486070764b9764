"""The registry of shipped recipes: one list that ``pcav recipes list|show|copy`` and every
``--recipe NAME`` read.

Shipped recipes are the YAML files of the top-level ``recipes/`` folder, installed as the
package ``pcavmae_cli.recipes``. ``--recipe`` also takes a path to any YAML file.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import yaml

from pcavmae_cli.engine.errors import UserError


def recipes_dir() -> Path:
    """The folder of shipped recipes."""
    return Path(str(importlib.resources.files("pcavmae_cli.recipes")))


def names() -> list[str]:
    """Shipped recipe names, sorted."""
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def is_name(recipe: str) -> bool:
    """True when ``recipe`` is written as a bare name rather than as a path."""
    return "/" not in recipe and "\\" not in recipe and not recipe.endswith((".yaml", ".yml"))


def resolve(recipe: str) -> Path:
    """Path of a shipped recipe name, or of a YAML path; a clear error if neither exists."""
    if is_name(recipe):
        path = recipes_dir() / f"{recipe}.yaml"
        if not path.is_file():
            raise UserError(f"no recipe named '{recipe}'; shipped recipes: {', '.join(names())}")
        return path
    path = Path(recipe).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"recipe file not found: {recipe}")
    return path


def description(name: str) -> str:
    """The recipe's one-line ``description`` (read from its own file, not its parent's)."""
    data = yaml.safe_load(resolve(name).read_text()) or {}
    return str(data.get("description", "")).strip().splitlines()[0] if data.get("description") else ""
