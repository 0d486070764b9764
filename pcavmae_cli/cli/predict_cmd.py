"""``pcav predict --checkpoint RUN (VIDEO... | --videos DIR | --data MANIFEST) --out FILE``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pcavmae_cli.cli.console import RichReporter, console, exit_130_when_stopped

SHOWN = 20  # videos in the on-screen table; the file has them all


def predict(
    videos: Optional[list[Path]] = typer.Argument(None, help="Video (or any media) files.", metavar="VIDEO",
                                                  show_default=False),  # fmt: skip
    checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="A fine-tuned run folder or checkpoint folder "
                                    "(pcav's, or a CAV-MAE fine-tuned model from pcav convert).", metavar="PATH"),  # fmt: skip
    folder: Optional[Path] = typer.Option(None, "--videos", help="Every file directly in this folder.", metavar="DIR",
                                          show_default=False),  # fmt: skip
    data: Optional[Path] = typer.Option(None, "--data", "-d", help="A manifest of preprocessed clips instead.",
                                        metavar="MANIFEST", show_default=False),  # fmt: skip
    out: Path = typer.Option(..., "--out", "-o", help="FILE.csv (a row per video and rank) or FILE.jsonl "
                             "(a video per line, with every window).", metavar="FILE"),  # fmt: skip
    top: int = typer.Option(5, "--top", "-k", help="Classes kept per video (and per window)."),
    frames: str = typer.Option("all", "--frames", help="all: average the scores of every frame (as pcav evaluate); "
                               "middle: the middle frame only, several times faster.", metavar="all|middle"),  # fmt: skip
    hop: Optional[float] = typer.Option(None, "--hop", help="Seconds between window starts for long videos "
                                        "(default: the window length, data.clip_seconds).", show_default=False),  # fmt: skip
    aggregate: str = typer.Option("mean", "--aggregate", help="A video's score per class over its windows: "
                                  "mean, or max (an event anywhere counts).", metavar="mean|max"),  # fmt: skip
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label CSV index,mid,display_name (default: the "
                                          "run's; needed for an imported CAV-MAE model).", metavar="CSV",
                                          show_default=False),  # fmt: skip
    chunk: int = typer.Option(64, "--chunk", help="Videos per resumable chunk: a rerun skips finished chunks."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help="ffmpeg processes (default: data.preprocess.jobs; "
                                       "0 = one per core).", show_default=False),  # fmt: skip
    timelines: bool = typer.Option(True, "--timelines/--no-timelines", help="Write FILE.timelines/VIDEO.png (classes "
                                   "over time) for videos longer than a window."),  # fmt: skip
    device: str = typer.Option("auto", "--device", help="auto (the GPU if there is one), cpu or cuda."),
) -> None:
    """Label your own videos with a fine-tuned model: the top classes of each, with scores.

    Videos of any length: each is cut into windows of data.clip_seconds (10 s) every --hop
    seconds, each window is scored as pcav evaluate scores a clip, and the video's score is the
    mean (or max) over its windows. Work goes in chunks that a rerun skips, so an interrupted
    run over a large folder resumes; every video that could not be read is listed with its
    reason in FILE.failures.jsonl. The run folder may be anywhere: it carries its label names.

    Example: pcav predict -c pcav-demo/runs/finetune --videos my_videos/ --out labels.csv
    Example: pcav predict -c runs/as2m_ft street.mp4 --aggregate max --hop 5 --out street.jsonl
    """
    from pcavmae_cli.engine.inference import load  # imports torch: not for --help
    from pcavmae_cli.engine.predict_videos import predict as run

    model = load(checkpoint, device=device, labels=labels)
    with exit_130_when_stopped():
        result = run(model, out, videos=videos or [], folder=folder, data=data, top_k=top, frames=frames,  # type: ignore[arg-type]
                     hop=hop, aggregate=aggregate, chunk=chunk, jobs=jobs, timelines=timelines,  # type: ignore[arg-type]
                     reporter=RichReporter())  # fmt: skip
    table = Table(title=f"top classes ({result.aggregate} over windows)", header_style="bold", title_justify="left")
    for name in ("video", "windows", "top classes"):
        table.add_column(name, justify="right" if name == "windows" else "left")
    scored = [v for v in result.videos if v.failure is None]
    for v in scored[:SHOWN]:
        tops = ", ".join(f"{t.name} {t.score:.2f}" for t in result.top[v.video][:3])
        lost = f" ({v.lost} lost)" if v.lost else ""
        table.add_row(escape(v.video), f"{len(v.spans)}{lost}", escape(tops))
    if scored:
        console.print(table)
    if len(scored) > SHOWN:
        console.print(f"... and {len(scored) - SHOWN} more in {out}", highlight=False)
    resumed = f"; {result.chunks_skipped} chunk(s) reused from an interrupted run" if result.chunks_skipped else ""
    console.print(f"{len(scored)} of {len(result.videos)} videos labelled{resumed}", highlight=False)
    if result.n_failed:
        console.print(f"{result.n_failed} could not be read: see {result.failures}", highlight=False)
    console.print(f"wrote {', '.join(str(f) for f in result.files[:3])}"
                  + (f" and {len(result.files) - 3} timeline(s)" if len(result.files) > 3 else ""),
                  highlight=False, soft_wrap=True)  # fmt: skip
