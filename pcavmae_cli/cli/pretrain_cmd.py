"""``pcav pretrain --recipe R [key=value ...]``: PCAV-MAE pre-training (or the cavmae baseline)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli import launch, options
from pcavmae_cli.cli.console import console
from pcavmae_cli.cli.training import run_as_rank
from pcavmae_cli.engine import config
from pcavmae_cli.engine.train.metrics import best_validated


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


PARTS = ("total", "infonce", "r", "pje", "pcpe")


def summary_rows(epochs: list[dict]) -> list[dict]:
    """The first epoch, the last epoch of every stage, and the best validated one, in order (a
    stage that ran only an epoch or two, as the prototype stages of a short run, is never left out)."""
    if not epochs:
        return []
    last_of_stage = {row["stage"]: i for i, row in enumerate(epochs)}
    validated = best_validated(epochs)
    keep = sorted({0, *last_of_stage.values(), *([validated[2]] if validated else [])})
    return [epochs[i] for i in keep]


def summary_table(result) -> Table:
    """The ``summary_rows``, one column per loss part that ran, and the validation metric that
    picked ``checkpoints/best`` (its epoch marked) where the run was validated."""
    rows = summary_rows(result.epochs)
    parts = [p for p in PARTS if any(row.get(f"loss_{p}") is not None for row in rows)]
    validated = best_validated(result.epochs)
    metric = validated[0] if validated else None
    best_epoch = result.epochs[validated[2]]["epoch"] if validated else None
    table = Table(title="pcav pretrain", show_header=True, header_style="bold")
    columns = ("epoch", "stage", *parts, *([f"val {metric}"] if metric else []), "samples/s")
    for name in columns:
        table.add_column(name, justify="left" if name == "stage" else "right")
    for row in rows:
        epoch = f"{row['epoch']}{' (best)' if row['epoch'] == best_epoch else ''}"
        val = [_fmt(row.get(f"val_{metric}"))] if metric else []
        table.add_row(epoch, row["stage"], *(_fmt(row.get(f"loss_{p}")) for p in parts), *val,
                      f"{row['samples_per_s']:.1f}")  # fmt: skip
    return table


def pretrain(
    recipe: str = options.Recipe,
    overrides: Optional[list[str]] = options.Overrides,
    nproc: Optional[int] = typer.Option(None, "--nproc", help=launch.NPROC_HELP, metavar="N", show_default=False),
) -> None:
    """Pre-train PCAV-MAE with a recipe: stages, prototype E-step, checkpoints in train.run_dir.

    The run folder gets config.yaml, metrics.jsonl, checkpoints/last and best, prototypes/.
    Ctrl-C (or SIGTERM) stops after writing checkpoints/last; train.resume=true continues it.
    One run per folder: a second pcav writing into train.run_dir is refused, naming the first.
    Several GPUs: --nproc N (one machine), or torchrun ... -m pcavmae_cli pretrain (several).

    Example: pcav pretrain --recipe demo data.train_manifest=pcav-demo/data/train/manifest.jsonl train.run_dir=runs/demo
    """
    if nproc is not None:
        cfg = config.load_recipe(recipe, overrides or [])  # a recipe error: one line here, not one per process
        command = ["pretrain", "--recipe", recipe, *(overrides or [])]
        raise typer.Exit(launch.run_under_torchrun(nproc, command, cfg.train and cfg.train.run_dir))
    from pcavmae_cli.engine.train.pretrain import pretrain as run  # imports torch: not for --help

    cfg = config.load_recipe(recipe, overrides or [])
    result = run_as_rank(run, cfg)
    if result is None:  # not rank 0
        return
    if result.epochs:
        console.print(summary_table(result))
    minutes = result.seconds / 60
    console.print(
        f"run folder: [bold]{result.run_dir}[/]  ({result.steps} steps, {minutes:.1f} min this run, "
        f"{result.device}, {result.precision})",
        highlight=False,
    )
    console.print(f"checkpoints: {result.last} (last), {result.best} (best); metrics: {result.log}", highlight=False)
