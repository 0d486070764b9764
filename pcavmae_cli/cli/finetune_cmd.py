"""``pcav finetune --recipe R [key=value ...]``: classification fine-tuning from a pre-trained checkpoint."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli import launch, options
from pcavmae_cli.cli.console import console
from pcavmae_cli.cli.training import run_as_rank
from pcavmae_cli.cli.metrics_view import format_metric
from pcavmae_cli.engine import config


def summary_table(result) -> Table:
    """Every epoch: training loss and the validation metrics; then the averaged weights."""
    metric = result.metric
    shown = ["mAP", "mAUC", "d_prime"] if metric == "mAP" else ["top1", "top5"]
    table = Table(title="pcav finetune", show_header=True, header_style="bold")
    for name in ("epoch", "loss", "lr", *(f"val {m}" for m in shown)):
        table.add_column(name, justify="right")
    for row in result.epochs:
        table.add_row(
            str(row["epoch"]), "-" if row["loss"] is None else f"{row['loss']:.4f}", f"{row['lr']:.2e}",
            *(format_metric(m, row.get(f"val_{m}")) for m in shown),
        )  # fmt: skip
    if result.averaged is not None:
        first, last = result.averaged["averaged_epochs"]
        table.add_row(f"avg {first}-{last}", "-", "-", *(format_metric(m, result.averaged.get(f"val_{m}")) for m in shown))
    return table


def finetune(
    recipe: str = typer.Option("finetune_demo", "--recipe", "-r", help=options.RECIPE_HELP, metavar="NAME|PATH"),
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="Pre-training run folder or checkpoint folder (sets finetune.init_from).",
        metavar="PATH", show_default=False,
    ),
    overrides: Optional[list[str]] = options.Overrides,
    nproc: Optional[int] = typer.Option(None, "--nproc", help=launch.NPROC_HELP, metavar="N", show_default=False),
) -> None:
    """Fine-tune a pre-trained model for classification: encoders + joint layer + a new head.

    The recipe's finetune section sets the mode (a, v, av, sum), head learning-rate multiplier,
    schedule, mixup, SpecAugment and balanced sampling; data.label_mode picks BCE + mAP
    (multi_hot) or cross-entropy + top-1 (single). Each epoch is validated on
    data.eval_manifest. The run folder gets config.yaml, metrics.jsonl and checkpoints/last,
    best (and averaged); Ctrl-C saves, train.resume=true continues.

    The pre-training run comes from --init-from PATH, finetune.init_from=PATH or init_from=PATH.

    Several GPUs: --nproc N starts torchrun (data.loader.batch_size stays the global batch).

    Example: pcav finetune --recipe finetune_demo --init-from pcav-demo/runs/pretrain train.run_dir=runs/ft
    """
    # ``init_from=PATH`` (the spelling) is short for ``finetune.init_from=PATH``.
    given = [f"finetune.{o}" if o.startswith("init_from=") else o for o in overrides or []]
    if nproc is not None:
        cfg = config.load_recipe(recipe, given)  # a recipe error: one line here, not one per process
        given_init = [] if init_from is None else ["--init-from", init_from]
        command = ["finetune", "--recipe", recipe, *given_init, *(overrides or [])]
        raise typer.Exit(launch.run_under_torchrun(nproc, command, cfg.train and cfg.train.run_dir))
    from pcavmae_cli.engine.train.finetune import finetune as run  # imports torch: not for --help

    extra = [] if init_from is None else [f"finetune.init_from={init_from}"]
    cfg = config.load_recipe(recipe, [*given, *extra])
    result = run_as_rank(run, cfg)
    if result is None:  # not rank 0
        return
    if result.init is not None:
        dropped = sorted({k.split(".")[0] if not k.startswith("backbone.") else ".".join(k.split(".")[:2])
                          for k in result.init.dropped})  # fmt: skip
        console.print(
            f"initialised from {result.init.path}: {len(result.init.loaded)} tensors loaded strictly, "
            f"dropped on purpose: {', '.join(dropped)}; new head",
            highlight=False, soft_wrap=True,
        )
    if result.epochs:
        console.print(summary_table(result))
    console.print(
        f"run folder: [bold]{result.run_dir}[/]  ({result.steps} steps, {result.seconds / 60:.1f} min this run, "
        f"{result.device}, {result.precision})",
        highlight=False, soft_wrap=True,
    )
    names = [f"{p} ({n})" for n, p in (("last", result.last), ("best", result.best), ("averaged", result.average)) if p]
    console.print(f"checkpoints: {', '.join(names)}; metrics: {result.log}", highlight=False, soft_wrap=True)
