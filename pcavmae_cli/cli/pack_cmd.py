"""``pcav pack MANIFEST OUT``: the packed layout of an already preprocessed corpus.

``pcav preprocess --pack`` calls ``run_pack`` after writing its manifest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli.console import console, exit_130_when_stopped, progress_bar
from pcavmae_cli.cli.options import OVERRIDES_HELP, RECIPE_HELP
from pcavmae_cli.engine import config
from pcavmae_cli.engine.schema import DataConfig

JOBS_HELP = "Shards written at once; 0 = one per CPU core (default: the recipe's data.preprocess.jobs)."


def run_pack(manifest: Path, out: Path, data: DataConfig, jobs: int | None) -> None:
    """Pack ``manifest`` into ``out`` with a progress bar, and say where the index is."""
    from pcavmae_cli.engine.data import manifest as manifests
    from pcavmae_cli.engine.data import pack

    n = len(manifests.read_manifest(manifest))
    with exit_130_when_stopped(), progress_bar("pack", n) as advance:
        report = pack.pack_manifest(manifest, out, data, jobs=jobs, progress=advance)
    console.print(f"pack: [bold]{report.index}[/] ({report.n_clips} clips in {report.n_shards} shards: "
                  f"{report.n_written} written, {report.n_kept} unchanged)")  # fmt: skip
    if report.failures:
        console.print(f"[red]not packed: {len(report.failures)} clips[/], listed in {report.index.parent / pack.FAILURES}")
    console.print(f"train on it with: data.train_manifest={report.index}")


def pack(
    manifest: Path = typer.Argument(..., help="manifest.jsonl of a preprocessed corpus.", show_default=False),
    out: Path = typer.Argument(..., help="Output folder of the pack (index.json, shards).", show_default=False),
    overrides: Optional[list[str]] = typer.Argument(
        None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]...", show_default=False
    ),
    recipe: str = typer.Option("base", "--recipe", "-r", help=RECIPE_HELP, metavar="NAME|PATH"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help=JOBS_HELP),
) -> None:
    """Write the packed layout of a manifest: shards of fp16 log-Mel and JPEG frames + an index.

    A loader reads a pack with much less CPU per sample than the per-clip files (no WAV read,
    no fbank). The log-Mel is stored before normalisation, so the recipe's mean/std still
    apply; the recipe's other fbank settings must match when training on it. Re-running keeps
    the shards whose clips did not change, also after Ctrl-C.

    Example: pcav pack data/train/manifest.jsonl data/train/pack data.pack.clips_per_shard=512
    """
    run_pack(manifest, out, config.load_recipe(recipe, overrides or []).data, jobs)
