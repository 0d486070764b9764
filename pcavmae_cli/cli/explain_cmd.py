"""``pcav explain CLIP --checkpoint C``: nearest prototypes, their members, and the prediction's make-up."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pcavmae_cli.cli import options
from pcavmae_cli.cli.console import console


def _neighbour_table(level: int, row, assigned: int | None) -> Table:
    own = f" (in training the clip belongs to P{assigned})" if assigned is not None else ""
    table = Table(title=f"granularity {level}: nearest prototypes{own}", header_style="bold", title_justify="left")
    for name in ("proto", "cos", "a/v cos", "p", "clips", "label make-up", "exemplars"):
        table.add_column(name, justify="right" if name in ("cos", "a/v cos", "p", "clips") else "left")
    for nb in row:
        table.add_row(
            f"P{nb.prototype}", f"{nb.similarity:.2f}", f"{nb.audio_similarity:.2f}/{nb.video_similarity:.2f}",
            f"{nb.posterior:.2f}", str(nb.clips), escape(", ".join(f"{n} {s:.0%}" for n, s in nb.makeup[:2]) or "-"),
            escape(" ".join(e.clip_id for e in nb.exemplars) or "-"),
        )  # fmt: skip
    return table


def _modality_table(lines) -> Table:
    """The audio share of each decision (engine/viz/modality_share.py)."""
    table = Table(title="audio or video? (audio share = |audio| / (|audio| + |video|))", header_style="bold",
                  title_justify="left")  # fmt: skip
    for name in ("decision", "audio share", "verdict", "audio", "video"):
        table.add_column(name, justify="right" if name in ("audio share", "audio", "video") else "left")
    for what, m in lines:
        share = "-" if m.share is None else f"{m.share:.2f}"
        table.add_row(escape(what), share, m.verdict, f"{m.audio:+.3f}", f"{m.video:+.3f}")
    return table


def _faithfulness_rows(f) -> list[tuple[str, str]]:
    """Rows of the faithfulness measures (engine/viz/faithfulness.py) under a decomposition table."""
    d = f.deletion
    named = " ".join(f"P{k}" for k in d.deleted)
    rows = [("prototype share |C| / (|C| + |residual|)", "-" if f.share is None else f"{f.share:.2f}"),
            (f"drop, top {d.n} removed ({named}): logit / prob", f"{d.top_logit_drop:+.3f} / {d.top_probability_drop:+.3f}")]
    if d.draws:
        rows.append((f"drop, {d.n} random others removed (mean of {d.draws})",
                     f"{d.random_logit_drop:+.3f} / {d.random_probability_drop:+.3f}"))
    return rows


def explain(
    clip: str = typer.Argument(..., help="A clip id of a manifest, or a video file (preprocessed on the fly)."),
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c",
                                    help="A pre-training or fine-tuning run folder, or a checkpoint folder."),  # fmt: skip
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="Manifest to find CLIP in (default: the run's)."),
    prototypes: Optional[Path] = typer.Option(None, "--prototypes", help="Pre-training run whose prototypes explain "
                                              "(default: the checkpoint's, or the run it was fine-tuned from)."),  # fmt: skip
    top: int = typer.Option(3, "--top", help="Nearest prototypes shown per granularity."),
    exemplars: int = typer.Option(3, "--exemplars", help="Member clips shown per prototype."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Folder for explain.png/.html/.json "
                                       "(default RUN/plots/explain/CLIP)."),  # fmt: skip
    device: str = typer.Option("auto", "--device", help="auto (the GPU if there is one), cpu or cuda."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label CSV (index,mid,display_name) "
                                          "(default: the run's, or its own copy labels.csv).", metavar="CSV",
                                          show_default=False),  # fmt: skip
    overrides: Optional[list[str]] = options.Overrides,
) -> None:
    """Explain one clip: its nearest prototypes, their members and labels, and what drives the prediction.

    At each granularity: the nearest prototypes (similarity, exemplar member clips, label
    make-up); for a fine-tuned model also the predicted classes and how much each prototype
    contributes to the top logit; and whether the decision is audio- or video-driven (the audio
    share). Prints tables and writes a PNG (frames and log-Mels), JSON, and an HTML page that plays
    the clip and its exemplars (their WAVs copied into media/ next to it).

    A run folder works wherever it was moved; where its training manifest now lives elsewhere,
    say so with an override (it applies to the run and to the run whose prototypes explain).

    Example: pcav explain demo0042_0 --checkpoint pcav-demo/runs/finetune
    Example: pcav explain my.mp4 -c /shared/runs/finetune data.train_manifest=/data/train/manifest.jsonl
    """
    from pcavmae_cli.engine.viz.explain import Explainer
    from pcavmae_cli.engine.viz.explain_report import (
        decision_sentence, decomposition_bars, default_folder, modality_lines, render,
    )  # fmt: skip

    explainer = Explainer(checkpoint, prototypes_run=prototypes, data=data, device=device, top=top, exemplars=exemplars,
                          labels=labels, overrides=overrides or [])  # fmt: skip
    ex = explainer.explain(clip)
    folder = Path(out) if out is not None else default_folder(explainer.run.plots, ex.clip_id)  # before any output
    labels = ", ".join(ex.labels) or "unlabelled"
    console.print(f"[bold]{escape(ex.clip_id)}[/] ({escape(labels)}) from {escape(ex.source)}; "
                  f"prototypes of epoch {ex.epoch} of {escape(ex.run_dir)}", highlight=False)  # fmt: skip
    for level, row in enumerate(ex.neighbours):
        console.print(_neighbour_table(level, row, ex.assigned[level]))
    if ex.prediction is not None:
        p = ex.prediction
        console.print("prediction: " + escape(", ".join(f"{n} {v:.3f}" for n, v in p.classes)), highlight=False)
        for level, d in enumerate(p.decompositions):
            table = Table(title=f"logit of '{escape(p.top_class)}' over granularity {level}: {d.logit:.3f}",
                          header_style="bold", title_justify="left")  # fmt: skip
            table.add_column("part")
            table.add_column("value", justify="right")
            for name, value in decomposition_bars(d):
                table.add_row(name, f"{value:+.3f}")
            if level < len(p.faithfulness):
                for name, value in _faithfulness_rows(p.faithfulness[level]):
                    table.add_row(name, value)
            console.print(table)
    else:
        console.print("[dim]a pre-training checkpoint: no prediction (give a fine-tuned one for the logit's make-up)[/]")
    console.print(_modality_table(modality_lines(ex)))
    console.print(escape(decision_sentence(ex)), highlight=False)
    for path in render(ex, explainer.train_middle, folder, list(explainer.names.values())):
        console.print(f"wrote [bold]{path}[/]", highlight=False)
