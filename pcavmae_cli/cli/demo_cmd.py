"""``pcav demo [OUT]``: the whole pipeline on the built-in demo corpus."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import RichReporter, console, err_console
from pcavmae_cli.cli.metrics_view import format_metric


class DemoReporter(RichReporter):
    """Shows each demo stage as a progress bar (wide notes: pre-training's loss parts), then a line
    when it is done."""

    def __init__(self) -> None:
        super().__init__(bar_width=None)

    def stage_done(self, result) -> None:
        console.print(f"[green]done[/] {result.name} in {result.seconds:.1f} s: {result.summary}", highlight=False)


def demo(
    out: Path = typer.Argument(Path("pcav-demo"), help="Folder for everything the demo writes."),
    recipe: str = typer.Option("demo", "--recipe", "-r", help=options.RECIPE_HELP, metavar="NAME|PATH"),
    overrides: Optional[list[str]] = options.Overrides,
    finetune_overrides: Optional[list[str]] = typer.Option(
        None, "--finetune-override", "-f", metavar="KEY=VALUE", show_default=False,
        help="Override of the fine-tuning recipe (finetune_demo), e.g. finetune.epochs=5; repeatable. "
        "Plain overrides go to the pre-training recipe (and model.*/data.* ones to both).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the demo corpus."),
    classes: int = typer.Option(6, "--classes", help="Classes in the demo corpus."),
    clips_per_class: int = typer.Option(10, "--clips-per-class", help="Clips per class (train + eval)."),
    eval_per_class: int = typer.Option(2, "--eval-per-class", help="Held-out clips per class."),
) -> None:
    """Run the whole pipeline on a small built-in corpus, ending with metrics and figures.

    Stages: demo data -> preprocess -> fbank stats -> pretrain -> fine-tune -> evaluate on
    held-out clips -> figures; it prints a metrics table and the paths of the figures.

    Everything is written under OUT: the resolved recipes (OUT/recipe.yaml,
    OUT/finetune_recipe.yaml), the runs (OUT/runs/pretrain, OUT/runs/finetune) and their eval/
    folders; the figures under OUT/runs/pretrain/plots. Running it again reuses what is there
    (and resumes stopped runs).

    Example: pcav demo ./pcav-demo
    """
    from pcavmae_cli.engine.demo import run_demo
    from pcavmae_cli.engine.interrupt import Stopped
    from pcavmae_cli.engine.train.stop import Interrupted

    try:
        result = run_demo(
            out, recipe=recipe, overrides=overrides or [], finetune_overrides=finetune_overrides or [],
            seed=seed, classes=classes,
            clips_per_class=clips_per_class, eval_per_class=eval_per_class, reporter=DemoReporter(),
        )
    except Interrupted as stop:  # during training: checkpoints/last is written
        err_console.print(
            f"[yellow]stopped[/] ({stop.reason}) at step {stop.step}; run the same command again to continue",
            highlight=False,
        )
        raise typer.Exit(130) from None
    except Stopped as stop:  # during preprocessing: the finished clips are kept
        err_console.print(f"[yellow]{stop}[/]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    table = Table(title="pcav demo", show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for stage in result.stages:
        table.add_row(stage.name, f"{stage.seconds:.1f}", stage.summary)
    for name in result.not_yet:
        table.add_row(name, "-", "[yellow]not in this version yet[/]")
    console.print(table)
    if result.metrics:
        scores = Table(title="demo metrics (held-out clips)", show_header=True, header_style="bold")
        for name in ("model", "metric", "value"):
            scores.add_column(name, justify="right" if name == "value" else "left")
        for row in result.metrics:
            scores.add_row(row.what, row.metric, format_metric(row.metric, row.value))
        console.print(scores)
    if result.figures:
        console.print("figures:")
        for path in result.figures:
            console.print(f"  {path}", highlight=False, soft_wrap=True)
    console.print(
        f"everything is under [bold]{result.out}[/]; resolved recipes: [bold]{result.recipe_path}[/], "
        f"[bold]{result.finetune_recipe_path}[/]"
    )
