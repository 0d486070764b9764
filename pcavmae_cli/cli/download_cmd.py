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
from rich.markup import escape
from rich.table import Table

from pcavmae_cli.cli.console import console, exit_130_when_stopped, progress_bar, progress_lines
from pcavmae_cli.engine.data import download as engine
from pcavmae_cli.engine.data import site_access
from pcavmae_cli.engine.data.pacing import pacing_for
from pcavmae_cli.engine.data.throughput import human_bytes
from pcavmae_cli.engine.errors import UserError


class CorpusName(str, Enum):
    audioset = "audioset"
    vggsound = "vggsound"


CORPUS_HELP = "Format of the segments CSV: audioset (YTID, start, end, labels) or vggsound (ytid,start,label,split)."
RETRY_HELP = (
    "Also retry clips an earlier run found private, removed or 404. "
    "Network errors, rate limits and the like are always retried."
)
FETCH_HELP = (
    "window: fetch only the segment's bytes (HTTP ranges), whole video where the site cannot serve them; "
    "whole: always the whole video, then cut."
)
COOKIES_HELP = "Netscape cookies.txt of a logged-in browser session (YouTube: 'Sign in to confirm you're not a bot')."
BROWSER_HELP = "Read the cookies from a browser: firefox, chrome, ... [+KEYRING][:PROFILE][::CONTAINER], as yt-dlp."
MAX_RATE_HELP = "At most N clips started per minute over all jobs (retries included). Default: no limit."
SLEEP_HELP = "Pause of each job after each clip, seconds."
RETRIES_HELP = "Retries of a clip the site rate-limits (429) or fails (5xx), with exponential backoff and jitter."
PREPROCESS_HELP = (
    "Preprocess each clip into this training folder (frames, WAV, manifest.jsonl) as soon as it is cut, "
    "and delete its video: the corpus on little disk."
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
    fetch: str = typer.Option("window", "--fetch", metavar="window|whole", help=FETCH_HELP),
    cookies: Optional[Path] = typer.Option(None, "--cookies", metavar="FILE", help=COOKIES_HELP, show_default=False),
    cookies_from_browser: Optional[str] = typer.Option(
        None, "--cookies-from-browser", metavar="BROWSER", help=BROWSER_HELP, show_default=False
    ),
    proxy: Optional[str] = typer.Option(
        None, "--proxy", metavar="URL", help="http://HOST:PORT or socks5://HOST:PORT for every request.", show_default=False
    ),
    max_rate: Optional[float] = typer.Option(None, "--max-rate", metavar="N", help=MAX_RATE_HELP, show_default=False),
    sleep: float = typer.Option(0.0, "--sleep", metavar="S", help=SLEEP_HELP),
    retries: int = typer.Option(4, "--retries", metavar="N", help=RETRIES_HELP),
    preprocess: Optional[Path] = typer.Option(
        None, "--preprocess", metavar="DATA", help=PREPROCESS_HELP, show_default=False
    ),
    recipe: str = typer.Option(
        "base", "--recipe", "-r", metavar="NAME|PATH", help="With --preprocess: the recipe whose data settings apply."
    ),
    keep_videos: bool = typer.Option(False, "--keep-videos", help="With --preprocess: keep the cut videos too."),
) -> None:
    """Fetch the YouTube segments of an AudioSet or VGGSound CSV, each cut exactly to its window.

    The window is start..end (AudioSet) or start..start+10 s (VGGSound). yt-dlp finds each video's
    media and ffmpeg reads only the window's bytes (--fetch window; the whole video where the site
    cannot serve ranges). Writes DIR/videos/{ytid}_{start}.mp4 (H.264 + AAC), DIR/downloaded.jsonl
    and DIR/failures.jsonl. Parallel (--jobs) and resumable: a rerun skips the clips already done,
    and Ctrl-C stops within seconds, recording the clips done (exit status 130). Videos that cannot
    be fetched (private, removed, 404, ...) are listed with the reason in failures.jsonl and do not
    stop the run: it exits 0 unless no clip at all is available.

    Every attempt goes through one pace (--max-rate, --sleep); a 429 or 5xx is retried with
    backoff, and when many are, every job pauses; a clip still rate-limited is recorded as
    rate_limited and retried by the next run. The progress line shows clips/min, bytes per clip
    and the failure mix. YouTube needs `pip install "pcavmae-cli\\[download]"` and often cookies.

    Example:
      pcav download audioset --csv balanced_train_segments.csv --out data/as --jobs 8
      pcav download audioset --csv unbalanced_train_segments.csv --out as/ --max-rate 60 --cookies-from-browser firefox
      pcav download audioset --csv eval_segments.csv --out as/ --preprocess data/audioset/eval
      pcav download vggsound --csv vggsound.csv --out data/vggsound --limit 100
    """
    engine.check_args(out, url_template, jobs, fetch)  # before the progress bar opens
    site_access.check_proxy(proxy)
    site_access.check_cookies(cookies, cookies_from_browser)
    pacing = pacing_for(max_rate, sleep, retries)
    rows = engine.load_segments(csv, corpus.value, limit)
    preprocessing = _preprocessing(preprocess, recipe, keep_videos, csv, corpus.value) if preprocess else None
    if keep_videos and preprocess is None:
        raise UserError("--keep-videos applies with --preprocess DATA only (without it the videos are kept)")

    def notice(message: str) -> None:
        console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    title = f"download {corpus.value}"
    progress = progress_bar(title, len(rows), bar_width=None) if console.is_terminal else progress_lines(title, len(rows))
    with exit_130_when_stopped(), progress as advance:
        report = engine.download_segments(
            rows, out, url_template=url_template, jobs=jobs, fmt=fmt, retry_failed=retry_failed, progress=advance,
            fetch=fetch, cookies=cookies, cookies_from_browser=cookies_from_browser, proxy=proxy, pacing=pacing,
            preprocess_to=preprocessing, on_notice=notice,
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


def _preprocessing(data: Path, recipe: str, keep_videos: bool, csv: Path, corpus: str) -> engine.Preprocessing:
    """The --preprocess settings: the recipe's data section, and VGGSound's labels of the whole CSV."""
    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.data.preprocess import ClipSettings

    settings = ClipSettings.from_config(config.load_recipe(recipe, []).data)
    labels = None
    if corpus == "vggsound":
        labels = sorted({seg.labels[0] for seg in engine.load_segments(csv, corpus)})
    return engine.Preprocessing(data, settings, keep_videos=keep_videos, label_names=labels)


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
    tp = report.throughput
    if tp.clips:
        fetched = ", ".join(f"{how} {n}" for how, n in sorted(tp.by_fetch.items()))
        console.print(
            f"{tp.clips_per_minute():.1f} clips/min, {human_bytes(tp.bytes_per_clip())} fetched per clip "
            f"({human_bytes(tp.bytes)} in all; {fetched})"
        )
    if report.throttled_attempts:
        console.print(
            f"the site throttled {report.throttled_attempts} attempt(s) (429/5xx/time-out); "
            f"all jobs paused {report.breaker_trips} time(s)"
        )
    if report.short:
        console.print(f"{len(report.short)} clip(s) end before their window does; kept what there is.")
    console.print(f"videos:     [bold]{report.videos_dir}[/]")
    console.print(f"downloaded: [bold]{report.downloaded_path}[/]")
    console.print(f"failures:   [bold]{report.failures_path}[/]")
    if report.manifest is not None:
        console.print(f"manifest:   [bold]{report.manifest}[/]")
