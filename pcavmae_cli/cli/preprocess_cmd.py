"""``pcav preprocess SRC OUT``: frames + mono WAV per clip, a manifest and the failures."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli.console import console, exit_130_when_stopped, progress_bar
from pcavmae_cli.cli.pack_cmd import run_pack
from pcavmae_cli.cli.options import OVERRIDES_HELP, RECIPE_HELP
from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import preprocess as engine
from pcavmae_cli.engine.errors import UserError


SRC_HELP = "Folder of videos, segments CSV (AudioSet or VGGSound) or CAV-MAE JSON data file."
VIDEOS_HELP = "Folder of a CSV's videos (default: the CSV's folder/videos if it exists, else the CSV's folder)."
JOBS_HELP = "ffmpeg processes at once; 0 = one per CPU core (default: the recipe's data.preprocess.jobs)."
DECODE_HELP = (
    "A clip with decode errors or a decoded length that disagrees with its streams: fail (listed in "
    "failures.jsonl) or flag (kept, the problem in its manifest record's decode_issue). "
    "Default: the recipe's data.preprocess.on_decode_error."
)
PACK_HELP = "Also write the packed layout (fp16 log-Mel + JPEG shards, faster to load) to OUT/pack."


def preprocess(
    src: Path = typer.Argument(..., help=SRC_HELP, show_default=False),
    out: Path = typer.Argument(..., help="Output folder: clips/, manifest.jsonl, failures.jsonl.", show_default=False),
    overrides: Optional[list[str]] = typer.Argument(
        None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]...", show_default=False
    ),
    videos: Optional[Path] = typer.Option(None, "--videos", help=VIDEOS_HELP),
    split: Optional[str] = typer.Option(None, "--split", help="VGGSound CSV: keep only this split (train, test)."),
    recipe: str = typer.Option("base", "--recipe", "-r", help=RECIPE_HELP, metavar="NAME|PATH"),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", help=JOBS_HELP),
    pack: bool = typer.Option(False, "--pack", help=PACK_HELP),
    on_decode_error: Optional[str] = typer.Option(None, "--on-decode-error", help=DECODE_HELP, metavar="fail|flag"),
) -> None:
    """Turn videos into per-clip JPEG frames + mono WAV, a manifest and a list of failures.

    One ffmpeg pass per clip writes data.video.n_frames frames at data.video.fps (shorter side
    data.video.short_side) and data.audio.sample_rate mono audio, padded or cut to
    data.clip_seconds. Bad clips are skipped and listed in failures.jsonl with a reason.
    Re-running resumes: finished clips are kept, failures retried; Ctrl-C stops within seconds
    and records the clips finished (exit status 130). --pack also writes the
    packed layout to OUT/pack (see `pcav pack`): train on OUT/pack/index.json.

    Example: pcav preprocess corpus/train_segments.csv data/train data.video.n_frames=10 --pack
    """
    policy = [] if on_decode_error is None else [f"data.preprocess.on_decode_error={on_decode_error}"]
    data = config.load_recipe(recipe, [*(overrides or []), *policy]).data
    inputs = engine.list_inputs(src, videos, split, exclude=(out,))
    with exit_130_when_stopped(), progress_bar("preprocess", len(inputs)) as advance:
        report = engine.preprocess(inputs, out, data, jobs=jobs, progress=advance)

    table = Table(show_header=True, header_style="bold", title="preprocess")
    table.add_column("clips")
    table.add_column("count", justify="right")
    table.add_row("inputs", str(report.n_inputs))
    table.add_row("processed now", str(report.n_done))
    table.add_row("done before (skipped)", str(report.n_skipped))
    table.add_row("padded (shorter than a clip)", str(report.n_padded))
    for reason, n in sorted(report.failures.items()):
        table.add_row(f"[red]failed: {reason}[/]", str(n))
    console.print(table)
    console.print(f"manifest: [bold]{report.manifest}[/] ({report.n_ok} clips)")
    console.print(f"failures: [bold]{report.failures_path}[/] ({report.n_failed} inputs)")
    if report.label_csv is not None:
        console.print(f"labels:   [bold]{report.label_csv}[/]")
    if report.n_ok == 0:
        raise UserError(f"no clip of {src} could be preprocessed; the reasons are in {report.failures_path}")
    if pack:
        run_pack(report.manifest, Path(out) / "pack", data, jobs)
