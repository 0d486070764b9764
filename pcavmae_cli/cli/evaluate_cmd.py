"""``pcav evaluate --checkpoint C --data M``: classification, retrieval, linear probe, kNN."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import RichReporter, console
from pcavmae_cli.cli.metrics_view import metrics_table, per_class_table

TASK_HELP = (
    "classification (a fine-tuning checkpoint), or on a pre-training checkpoint's frozen features: "
    "retrieval, linear-probe, knn."
)


def evaluate(
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="Run folder or checkpoint folder.", metavar="PATH"),
    data: Path = typer.Option(..., "--data", "-d", help="Manifest of the clips to evaluate.", metavar="MANIFEST"),
    task: str = typer.Option("classification", "--task", "-t", help=TASK_HELP, metavar="TASK"),
    train_data: Optional[Path] = typer.Option(
        None, "--train-data", help="Probes: manifest of the training clips (default: the recipe's data.train_manifest).",
        metavar="MANIFEST", show_default=False,
    ),
    frames: Optional[str] = typer.Option(
        None, "--frames", help="all: average over the clip's frames; middle: the middle frame only "
        "(default: data.loader.eval_frames for classification, evaluate.frames otherwise).",
        metavar="all|middle", show_default=False,
    ),
    random_init: bool = typer.Option(
        False, "--random-init", help="Retrieval/probes: a freshly initialised model of the checkpoint's size (a baseline)."
    ),
    labels: Optional[Path] = typer.Option(
        None, "--labels", help="Label CSV (default: the recipe's data.label_csv).", metavar="CSV", show_default=False
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Output folder (default: RUN/eval/TASK-SPLIT).", metavar="DIR", show_default=False
    ),
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """Evaluate a checkpoint on a manifest; write metrics.json (and per_class.csv) and print them.

    Classification averages the class probabilities over the clip's 10 frames (sigmoid for
    multi-label, softmax for single-label) and reports mAP, mean AUC, d' or top-1, top-5, with
    a per-class table sorted best first. Retrieval reports audio->video and video->audio R@1/5/10
    and median rank. Settings come from the checkpoint's config.yaml; KEY=VALUE overrides it
    (e.g. evaluate.knn_k=10 data.loader.batch_size=8).

    Example: pcav evaluate --checkpoint pcav-demo/runs/finetune --data pcav-demo/data/eval/manifest.jsonl
    """
    from pcavmae_cli.engine.errors import UserError
    from pcavmae_cli.engine.evaluate.runner import TASKS
    from pcavmae_cli.engine.evaluate.runner import evaluate as run  # imports torch: not for --help

    if task not in TASKS:
        raise UserError(f"--task: unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if frames not in (None, "all", "middle"):
        raise UserError(f"--frames: expected 'all' or 'middle', got '{frames}'")
    result = run(
        task, checkpoint, data, train_data=train_data, frames=frames, random_init=random_init,
        labels_csv=labels, overrides=overrides or [], out=out, reporter=RichReporter(),
    )  # fmt: skip
    record = result.record
    table = metrics_table(f"pcav evaluate: {task}", result.metrics)
    table.caption = f"{record['n_clips']} clips, frames: {record['frames']}"
    undefined = [k for k, v in result.metrics.items() if v is None and k.split("_")[-1][1:].isdigit()]
    if undefined:  # R@k with k >= the clips: every clip is within k
        table.caption += f"; - : {', '.join(undefined)} undefined on {record['n_clips']} clips (k >= clips)"
    console.print(table)
    if result.classes:
        console.print(per_class_table(result.classes, result.label_mode))
    what = "random init" if result.record["random_init"] else result.checkpoint.folder
    console.print(f"model: {what}; wrote {', '.join(str(f) for f in result.files)}", highlight=False, soft_wrap=True)
