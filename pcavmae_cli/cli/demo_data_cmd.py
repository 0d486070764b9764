"""``pcav demo-data OUT``: write the small built-in audio-visual corpus."""

from __future__ import annotations

from pathlib import Path

import typer

from pcavmae_cli.cli.console import console, progress_bar
from pcavmae_cli.engine.data import demo_corpus


def demo_data(
    out: Path = typer.Argument(..., help="Folder to write the corpus to (created if needed).", show_default=False),
    classes: int = typer.Option(6, "--classes", help="Number of classes (each a sound + a moving shape)."),
    clips_per_class: int = typer.Option(10, "--clips-per-class", help="Clips per class in all (train + eval)."),
    eval_per_class: int = typer.Option(2, "--eval-per-class", help="Of those, clips per class held out for eval."),
    seed: int = typer.Option(0, "--seed", help="Random seed: the same seed writes the same files."),
    seconds: float = typer.Option(10.0, "--seconds", help="Length of each clip in seconds."),
    jobs: int = typer.Option(0, "--jobs", "-j", help="Clips encoded at once; 0 = one per CPU core."),
) -> None:
    """Write a small labelled audio-visual corpus of real MP4 clips whose sound and picture match.

    Each class is a sound (tone, harmonic, chirp, tremolo, noise bursts, clicks) with a moving,
    pulsing shape; clips are H.264 + AAC MP4 files with AudioSet-style label and segment CSVs.
    The same --seed writes the same files; a re-run keeps finished clips.

    Example: pcav demo-data ./corpus --classes 6 --clips-per-class 10 --seed 0
    """
    n_clips = classes * clips_per_class
    with progress_bar("demo clips", n_clips) as advance:
        report = demo_corpus.make_demo_corpus(
            out,
            classes=classes,
            clips_per_class=clips_per_class,
            eval_per_class=eval_per_class,
            seed=seed,
            seconds=seconds,
            jobs=jobs,
            progress=advance,
        )
    console.print(
        f"{report.n_written} clips written, {report.n_skipped} already there "
        f"({report.n_classes} classes, seed {seed})"
    )
    console.print(f"videos:  [bold]{report.videos}[/]")
    console.print(f"labels:  [bold]{report.label_csv}[/]")
    for split, path in report.segment_csvs.items():
        console.print(f"{split + ':':8} [bold]{path}[/]")
    first = report.segment_csvs.get("train")
    if first is not None:
        console.print(f"next:    pcav preprocess {first} {report.out / 'data' / 'train'}", highlight=False)
