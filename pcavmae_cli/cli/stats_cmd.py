"""``pcav stats MANIFEST``: the fbank mean/std of a corpus, ready to paste into a recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import console, progress_bar
from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.manifest import atomic_write_text, read_manifest


def stats(
    manifest: Path = typer.Argument(..., help="A manifest.jsonl written by `pcav preprocess`."),
    recipe: str = typer.Option("base", "--recipe", "-r", help=options.RECIPE_HELP, metavar="NAME|PATH"),
    overrides: Optional[list[str]] = options.Overrides,
    max_clips: Optional[int] = typer.Option(None, "--max-clips", help="Use an evenly spaced subset of this many clips."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the numbers to this JSON file."),
) -> None:
    """Compute the corpus mean and std of the log-Mel features (fbank settings from the recipe).

    Put the result in your recipe as data.audio.fbank.mean / data.audio.fbank.std.

    Example: pcav stats data/train/manifest.jsonl --max-clips 2000
    """
    from pcavmae_cli.engine.data.stats import fbank_stats  # imports torch: not needed for --help

    cfg = config.load_recipe(recipe, overrides or []).data
    n_clips = len(read_manifest(manifest))
    total = n_clips if max_clips is None else min(max_clips, n_clips)
    with progress_bar("fbank stats", total) as advance:
        result = fbank_stats(manifest, cfg, max_clips=max_clips, progress=advance)
    console.print(f"clips: {result.n_clips}   mean: [bold]{result.mean:.4f}[/]   std: [bold]{result.std:.4f}[/]")
    console.print(f"recipe overrides: data.audio.fbank.mean={result.mean:.4f} data.audio.fbank.std={result.std:.4f}")
    if json_out is not None:
        atomic_write_text(json_out, json.dumps(result.__dict__, indent=2) + "\n")
        console.print(f"wrote {json_out}")
