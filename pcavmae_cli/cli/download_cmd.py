"""``pcav download audioset|vggsound``: rebuild a corpus from its official segment list.

Exit status: 0 when the run finished, even with failed clips (a part of any YouTube corpus is
gone, and failures.jsonl says which and why); 1 on a user error, or when not a single clip of
the list is available afterwards (a wrong URL template or no network looks like that); 130
after Ctrl-C, once the clips done are recorded.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pcavmae_cli.cli.console import console, exit_130_when_stopped, progress_bar
from pcavmae_cli.engine.data import download as engine
from pcavmae_cli.engine.errors import UserError


class CorpusName(str, Enum):
    audioset = "audioset"
    vggsound = "vggsound"


CORPUS_HELP = "Format of the segments CSV: audioset (YTID, start, end, labels) or vggsound (ytid,start,label,split)."
RETRY_HELP = (
    "Also retry clips an earlier run found private, removed or 404. "
    "Network errors and the like are always retried."
)


def download(
    corpus: CorpusName = typer.Argument(..., help=CORPUS_HELP, metavar="audioset|vggsound", show_default=False),
    csv: Path = typer.Option(
        ..., "--csv", metavar="SEGMENTS", help="Official segments CSV: balanced_train_segments.csv, vggsound.csv, ..."
    ),
    out: Path = typer.Option(
        ..., "--out", "-o", metavar="DIR", help="Output folder: videos/, downloaded.jsonl, failures.jsonl."
    ),
    jobs: int = typer.Option(4, "--jobs", "-j", min=1, help="Clips fetched in parallel."),
    url_template: str = typer.Option(
        engine.YOUTUBE_URL, "--url-template", help="Where a video lives; {ytid} is replaced by the CSV's ID."
    ),
    fmt: Optional[str] = typer.Option(
        None, "--format", "-f", metavar="F", show_default=False,
        help="yt-dlp format selector, replacing the default (best <= 360p, mp4 preferred).",
    ),
    retry_failed: bool = typer.Option(False, "--retry-failed/--no-retry-failed", help=RETRY_HELP),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, metavar="N", help="Only the first N segments."),
) -> None:
    """Fetch the YouTube videos of an AudioSet or VGGSound segments CSV and cut each to its window.

    yt-dlp fetches each video; the window is start..end (AudioSet) or start..start+10 s (VGGSound).
    Writes DIR/videos/{ytid}_{start}.mp4 (H.264 + AAC), DIR/downloaded.jsonl and DIR/failures.jsonl.
    Parallel (--jobs) and resumable: a rerun skips the clips already in DIR/videos, and Ctrl-C
    stops within seconds, recording the clips done (exit status 130). Videos that
    cannot be fetched (private, removed, 404, ...) are listed with the reason in failures.jsonl and
    do not stop the run: it exits 0 unless no clip at all is available.

    Example:
      pcav download audioset --csv balanced_train_segments.csv --out data/as --jobs 8
      pcav download vggsound --csv vggsound.csv --out data/vggsound --limit 100
    """
    engine.check_args(out, url_template, jobs)  # before the progress bar opens
    rows = engine.load_segments(csv, corpus.value, limit)
    with exit_130_when_stopped(), progress_bar(f"download {corpus.value}", len(rows)) as advance:
        report = engine.download_segments(
            rows, out, url_template=url_template, jobs=jobs, fmt=fmt, retry_failed=retry_failed, progress=advance
        )
    _summary(report)
    n_failed = len(report.failures)
    if n_failed:
        console.print(
            f"[yellow]warning:[/] {n_failed} clip{'s' if n_failed != 1 else ''} failed this run "
            f"(reasons in {report.failures_path}); unavailable videos are expected on YouTube."
        )
    if not report.downloaded and not report.already_done and (report.failures or report.skipped_failed):
        top = report.failed_by_reason().most_common(1)
        why = f"most often {top[0][0]}" if top else "all failed in earlier runs"
        raise UserError(f"no clip of {csv} could be downloaded ({why}); see {report.failures_path}")


def _summary(report: engine.DownloadReport) -> None:
    table = Table(title="download", show_header=True, header_style="bold")
    table.add_column("outcome")
    table.add_column("clips", justify="right")
    table.add_row("downloaded", str(len(report.downloaded)))
    table.add_row("already done", str(report.already_done))
    if report.skipped_failed:
        table.add_row("skipped (failed before, --retry-failed to retry)", str(report.skipped_failed))
    for reason, n in sorted(report.failed_by_reason().items()):
        table.add_row(f"failed: {reason}", str(n), style="yellow")
    console.print(table)
    if report.short:
        console.print(f"{len(report.short)} clip(s) end before their window does; kept what there is.")
    console.print(f"videos:     [bold]{report.videos_dir}[/]")
    console.print(f"downloaded: [bold]{report.downloaded_path}[/]")
    console.print(f"failures:   [bold]{report.failures_path}[/]")
