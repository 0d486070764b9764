"""Fetching AudioSet / VGGSound segments with yt-dlp and cutting them to their windows.

Both corpora are published as lists of YouTube IDs with a time window, not as media, so a
copy has to be rebuilt from YouTube, where a part of the videos has since gone private or
been removed. This module is therefore built around three facts:

* failures are normal: each is recorded with a short reason and the run goes on;
* runs are long and get interrupted: a finished clip is never fetched twice and a killed
  run loses at most the clips that were in flight; Ctrl-C stops handing out clips, aborts the
  fetches in flight and records what is done (``engine/interrupt.py``);
* the IDs come from a file, i.e. from outside: an ID that could act as a path (``../x``,
  ``a/b``) is refused before it reaches yt-dlp or the filesystem.

Layout of the output folder ``DIR``::

    DIR/videos/{clip_id}.mp4   one clip per segment, [start, end] only, H.264 + AAC
                               (clip_id = ``{ytid}_{start:g}``, as ``Segment.clip_id``)
    DIR/downloaded.jsonl       one line per clip in videos/: id, ytid, window, labels, duration
    DIR/failures.jsonl         one ``manifest.Failure`` per clip that is not there, with reason
    DIR/.tmp/                  per-clip work folders of a running download (removed after)
    DIR/.pcav.lock             held while a download writes into DIR (``engine/folder_lock.py``)

A clip is "done" when its file exists: it only ever appears there by ``os.replace`` of a
finished, probed file, so no half-written file can be taken for done. Both JSONL files are
appended one line per outcome while the run goes (a killed run keeps them; a torn last line
is ignored on reading, and the last line for an ID wins) and rewritten atomically, compacted,
when the run ends.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import segments as seglib
from pcavmae_cli.engine.data.manifest import Failure, atomic_write_text, write_lines
from pcavmae_cli.engine.data.segments import Corpus, Segment
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.folder_lock import folder_lock
from pcavmae_cli.engine.interrupt import StopRequests, Stopped, run_pool

YOUTUBE_URL = "https://www.youtube.com/watch?v={ytid}"

# A 10 s clip is resized to 224 px and 1 fps downstream, so anything above 360p is wasted
# bandwidth. "bv*+ba/b" takes one file with sound and picture, merging a separate audio track
# only when the video has none; the sort prefers the largest resolution <= 360p and mp4/m4a,
# which also picks the single format of a plain direct link.
DEFAULT_FORMAT = "bv*+ba/b"
DEFAULT_FORMAT_SORT = ("res:360", "ext:mp4:m4a")

# Reasons that another try will not change; the others (network errors, rate limits, cut
# failures) are retried by every rerun. With ``retry_failed`` everything is retried.
PERMANENT_REASONS = frozenset(
    {"invalid_id", "invalid_segment", "http_404", "http_410", "private", "unavailable",
     "age_restricted", "geo_blocked", "too_short"}
)

VIDEOS = "videos"
DOWNLOADED = "downloaded.jsonl"
FAILURES = "failures.jsonl"
TMP = ".tmp"

Progress = Callable[..., None]  # progress(n: int = 1, note: str = "")


class ClipError(Exception):
    """One clip could not be made; ``reason`` is the short code written to failures.jsonl."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Downloaded:
    """A clip now in ``videos/``; one line of downloaded.jsonl."""

    id: str
    ytid: str
    start: float
    end: float
    labels: list[str]
    video: str  # relative to DIR
    duration: float  # of the cut file; shorter than end - start when ``short``
    short: bool = False
    split: str | None = None

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if v is not None}
        if not self.short:
            del data["short"]
        return json.dumps(data, ensure_ascii=False)


@dataclass
class DownloadReport:
    """What a run did, for the CLI's summary; the same facts are in DIR's JSONL files."""

    out_dir: Path
    downloaded: list[Downloaded] = field(default_factory=list)  # by this run
    already_done: int = 0
    skipped_failed: int = 0  # permanent failures of earlier runs, not retried
    failures: list[Failure] = field(default_factory=list)  # of this run

    @property
    def videos_dir(self) -> Path:
        return self.out_dir / VIDEOS

    @property
    def downloaded_path(self) -> Path:
        return self.out_dir / DOWNLOADED

    @property
    def failures_path(self) -> Path:
        return self.out_dir / FAILURES

    @property
    def short(self) -> list[Downloaded]:
        return [d for d in self.downloaded if d.short]

    def failed_by_reason(self) -> Counter[str]:
        return Counter(f.reason for f in self.failures)


def download(
    csv_path: str | Path,
    corpus: Corpus,
    out_dir: str | Path,
    *,
    url_template: str = YOUTUBE_URL,
    jobs: int = 4,
    fmt: str | None = None,
    retry_failed: bool = False,
    limit: int | None = None,
    progress: Progress | None = None,
) -> DownloadReport:
    """Download the clips of a segments CSV into ``out_dir`` (layout in the module doc).

    Args:
        corpus: the CSV's format; a CSV that looks like the other corpus is an error.
        url_template: where a video lives, with ``{ytid}``; tests point it at a local server.
        fmt: a yt-dlp format selector replacing the default (<= 360p, mp4 preferred).
        retry_failed: also retry clips an earlier run recorded with a permanent reason.
        limit: only the first ``limit`` segments of the CSV.
        progress: called as ``progress(n, note)`` when ``n`` more clips are settled.
    """
    check_args(out_dir, url_template, jobs)
    rows = load_segments(csv_path, corpus, limit)
    return download_segments(
        rows, out_dir, url_template=url_template, jobs=jobs, fmt=fmt, retry_failed=retry_failed, progress=progress
    )


def load_segments(csv_path: str | Path, corpus: Corpus, limit: int | None = None) -> list[Segment]:
    """The distinct segments of a CSV (first ``limit`` rows), checked to be of ``corpus``."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise UserError(f"segments CSV not found: {csv_path}")
    try:
        detected = seglib.detect_corpus(csv_path)
    except UserError:
        detected = corpus  # let read_segments name the malformed row
    if detected != corpus:
        raise UserError(f"{csv_path} is in {detected} format, not {corpus}: run `pcav download {detected}`")
    rows = seglib.read_segments(csv_path, corpus)
    if limit is not None:
        rows = rows[:limit]
    distinct: dict[str, Segment] = {}
    for seg in rows:
        distinct.setdefault(seg.clip_id, seg)
    return list(distinct.values())


def check_args(out_dir: str | Path, url_template: str, jobs: int) -> None:
    """The user's mistakes that can be told before any work: each is one ``UserError``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a folder")
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    if "{ytid}" not in url_template:
        raise UserError(f"--url-template {url_template!r} lacks '{{ytid}}', e.g. {YOUTUBE_URL}")
    try:
        url_template.format(ytid="x")
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"--url-template {url_template!r}: only '{{ytid}}' can be filled in ({exc!r})") from None


def download_segments(
    rows: Sequence[Segment],
    out_dir: str | Path,
    *,
    url_template: str = YOUTUBE_URL,
    jobs: int = 4,
    fmt: str | None = None,
    retry_failed: bool = False,
    progress: Progress | None = None,
) -> DownloadReport:
    """Download ``rows`` into ``out_dir`` with ``jobs`` threads; never raises for one clip.

    Ctrl-C or SIGTERM: the clips done so far are logged, the fetches in flight are aborted (their
    failures are not recorded), the rest is left for a rerun, and ``Stopped`` is raised.
    """
    check_args(out_dir, url_template, jobs)
    out_dir = Path(out_dir)
    (out_dir / VIDEOS).mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    advance = progress or (lambda n=1, note="": None)
    report = DownloadReport(out_dir=out_dir)

    with folder_lock(out_dir):
        shutil.rmtree(out_dir / TMP, ignore_errors=True)  # work folders of a killed run
        done_log = {d["id"]: d for d in _read_jsonl(out_dir / DOWNLOADED) if "id" in d}
        failed = {f.id: f for f in _read_failures(out_dir / FAILURES) if f.id}
        log = _Appender(out_dir)

        todo: list[Segment] = []
        seen: set[str] = set()
        for seg in rows:
            cid = seg.clip_id
            if cid in seen:
                continue
            seen.add(cid)
            if seglib.is_safe_id(seg.ytid) and (out_dir / VIDEOS / f"{cid}.mp4").is_file():
                report.already_done += 1
                failed.pop(cid, None)
                # A run killed between placing a clip and logging it leaves no line: add one.
                done_log.setdefault(cid, _segment_entry(seg))
            elif cid in failed and not retry_failed and failed[cid].reason in PERMANENT_REASONS:
                report.skipped_failed += 1
            else:
                todo.append(seg)
        if report.already_done or report.skipped_failed:
            advance(report.already_done + report.skipped_failed, "done before")

        def record(outcome: Downloaded | Failure) -> None:
            if isinstance(outcome, Downloaded):
                report.downloaded.append(outcome)
                done_log[outcome.id] = json.loads(outcome.to_json())
                failed.pop(outcome.id, None)
                log.append(DOWNLOADED, outcome.to_json())
            else:
                report.failures.append(outcome)
                failed[outcome.id] = outcome
                log.append(FAILURES, outcome.to_json())

        def settle(seg: Segment, outcome: Downloaded | Failure) -> None:
            record(outcome)
            advance(1, outcome.id if isinstance(outcome, Downloaded) else f"{outcome.id}: {outcome.reason}")

        try:
            with StopRequests() as stop:
                late = run_pool(lambda seg: _one_clip(seg, root, url_template, fmt, stop), todo, jobs, settle, stop)
            for _, outcome in late:  # in flight at the stop: a failure may be the stop's doing
                if isinstance(outcome, Downloaded):
                    record(outcome)
        finally:
            _write_logs(out_dir, done_log, failed)
            shutil.rmtree(out_dir / TMP, ignore_errors=True)
    if stop.reason is not None:
        settled = report.already_done + report.skipped_failed + len(report.downloaded) + len(report.failures)
        raise Stopped(settled, len(seen), "clips", stop.reason)
    return report


def _one_clip(
    seg: Segment, root: Path, url_template: str, fmt: str | None, stop: StopRequests | None = None
) -> Downloaded | Failure:
    """Fetch and cut one segment; every problem becomes a ``Failure``, nothing is raised.

    A stop request (``stop.reason``) aborts the fetch at its next block of data.
    """
    cid = seg.clip_id
    if not seglib.is_safe_id(seg.ytid):
        return Failure(input=seg.ytid, reason="invalid_id", detail="an ID may only hold A-Z a-z 0-9 _ -", id=cid)
    url = url_template.format(ytid=seg.ytid)
    if not (math.isfinite(seg.start) and math.isfinite(seg.end) and 0 <= seg.start < seg.end):
        return Failure(input=url, reason="invalid_segment", detail=f"window [{seg.start}, {seg.end}]", id=cid)
    videos = (root / VIDEOS).resolve()  # resolved: DIR/videos may be a link to another disk
    final = (videos / f"{cid}.mp4").resolve()
    if final.parent != videos:  # is_safe_id makes this impossible; keep it that way
        raise AssertionError(f"clip path {final} is not in {videos}")
    (root / TMP).mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{cid}-", dir=root / TMP))
    try:
        source = _fetch(url, work, fmt, stop)
        duration, short = _cut(source, work / "cut.mp4", seg.start, seg.end)
        os.replace(work / "cut.mp4", final)
    except ClipError as exc:
        return Failure(input=url, reason=exc.reason, detail=exc.detail, id=cid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return Downloaded(
        id=cid, ytid=seg.ytid, start=seg.start, end=seg.end, labels=list(seg.labels),
        video=f"{VIDEOS}/{cid}.mp4", duration=round(duration, 3), short=short, split=seg.split,
    )


class _QuietLogger:
    """yt-dlp talks through this: nothing reaches the terminal, where the progress bar is.

    Errors are not lost: yt-dlp also raises them as ``DownloadError``, which becomes the
    failure's detail.
    """

    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


def _fetch(url: str, work: Path, fmt: str | None, stop: StopRequests | None = None) -> Path:
    """Download ``url`` into ``work`` with yt-dlp; returns the media file.

    yt-dlp calls its progress hooks at every block it writes: the hook aborts the download once
    a stop is asked for, so Ctrl-C does not wait for a whole video to arrive.
    """
    import yt_dlp  # here, not at the top: the CLI starts faster without it

    def abort_on_stop(_status: dict) -> None:
        if stop is not None and stop.reason is not None:
            raise ClipError("stopped", f"stopped by {stop.reason}")

    opts = {
        "format": fmt or DEFAULT_FORMAT,
        "outtmpl": {"default": "source.%(ext)s"},
        "paths": {"home": str(work), "temp": str(work)},
        "ffmpeg_location": media.ffmpeg_exe(),
        "merge_output_format": "mp4",
        "noplaylist": True,
        "quiet": True,
        "no_warnings": True,
        "noprogress": True,
        "logger": _QuietLogger(),
        "cachedir": False,
        "updatetime": False,
        "retries": 3,
        "fragment_retries": 3,
        "socket_timeout": 30,
        "progress_hooks": [abort_on_stop],
    }
    if fmt is None:
        opts["format_sort"] = list(DEFAULT_FORMAT_SORT)
    try:
        with yt_dlp.YoutubeDL(opts) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as exc:
        cause = exc.exc_info[1] if exc.exc_info else None
        raise ClipError(classify_error(str(exc), getattr(cause, "status", None)), _clean(str(exc))) from None
    except Exception as exc:  # noqa: BLE001 - one odd page must not end a run of thousands
        raise ClipError("download_failed", f"{type(exc).__name__}: {exc}") from None
    paths = [Path(d["filepath"]) for d in (info or {}).get("requested_downloads", []) if d.get("filepath")]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise ClipError("download_failed", "yt-dlp reported no downloaded file")
    return paths[0]


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_HTTP = re.compile(r"HTTP Error (\d{3})")
# Lower-case fragments of yt-dlp / YouTube messages, first match wins.
_MESSAGES = (
    ("private video", "private"),
    ("confirm your age", "age_restricted"),
    ("age-restricted", "age_restricted"),
    ("not a bot", "blocked"),
    ("not available in your country", "geo_blocked"),
    ("video unavailable", "unavailable"),
    ("video is unavailable", "unavailable"),
    ("has been removed", "unavailable"),
    ("no longer available", "unavailable"),
    ("account associated with this video has been terminated", "unavailable"),
    ("copyright", "unavailable"),
    ("requested format is not available", "no_format"),
)


def classify_error(message: str, status: int | None = None) -> str:
    """Short reason code for a yt-dlp error: ``http_404``, ``private``, ``unavailable``, ...

    ``download_failed`` when nothing more specific is known; it is treated as transient.
    """
    text = message.lower()
    for fragment, reason in _MESSAGES:
        if fragment in text:
            return reason
    if status is None:
        m = _HTTP.search(message)
        status = int(m.group(1)) if m else None
    return f"http_{status}" if status else "download_failed"


def _clean(message: str) -> str:
    return _ANSI.sub("", message).removeprefix("ERROR: ").strip()


def _cut(source: Path, dest: Path, start: float, end: float) -> tuple[float, bool]:
    """Re-encode [start, end] of ``source`` to ``dest``; returns (duration, shorter than asked).

    Re-encoding (H.264 + AAC), with ``-ss`` before ``-i``, makes the cut exact to the frame
    instead of snapping to the previous keyframe as a stream copy would.
    """
    try:
        info = media.probe(source)
    except media.ProbeError as exc:
        raise ClipError("cut_failed", f"downloaded file unreadable: {exc}") from None
    if info.duration is not None and info.duration <= start:
        raise ClipError("too_short", f"the video is {info.duration:.2f} s long; the segment starts at {start:g} s")
    cmd = [
        media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y",
        "-ss", f"{start:.3f}", "-i", str(source), "-t", f"{end - start:.3f}",
        "-map", "0:v:0?", "-map", "0:a:0?",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
        "-c:a", "aac", "-b:a", "128k",
        "-movflags", "+faststart", "-f", "mp4", str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"ffmpeg exited with {proc.returncode}"]
        raise ClipError("cut_failed", lines[-1])
    try:
        cut = media.probe(dest)
    except media.ProbeError as exc:
        raise ClipError("cut_failed", f"ffmpeg wrote an unreadable clip: {exc}") from None
    if not cut.duration or cut.duration < 0.1:
        raise ClipError("cut_failed", f"the cut clip lasts {cut.duration or 0:.2f} s")
    return cut.duration, cut.duration < (end - start) - 0.25


class _Appender:
    """Appends one JSON line per outcome, flushed at once, so a killed run keeps its record."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.lock = threading.Lock()
        for name in (DOWNLOADED, FAILURES):
            (out_dir / name).touch()

    def append(self, name: str, line: str) -> None:
        with self.lock, open(self.out_dir / name, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _segment_entry(seg: Segment) -> dict:
    """A downloaded.jsonl line for a clip found in place but not logged (no duration known)."""
    entry = {"id": seg.clip_id, "ytid": seg.ytid, "start": seg.start, "end": seg.end,
             "labels": list(seg.labels), "video": f"{VIDEOS}/{seg.clip_id}.mp4"}
    if seg.split is not None:
        entry["split"] = seg.split
    return entry


def _write_logs(out_dir: Path, done_log: dict[str, dict], failed: dict[str, Failure]) -> None:
    """Rewrite both logs compacted: one line per clip, and only clips whose file is there."""
    kept = [d for d in done_log.values() if (out_dir / str(d.get("video", ""))).is_file()]
    atomic_write_text(out_dir / DOWNLOADED, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in kept))
    write_lines(out_dir / FAILURES, failed.values())


def _read_jsonl(path: Path) -> Iterator[dict]:
    """Objects of a JSONL log, skipping lines that do not parse (the torn end of a killed run)."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                yield obj


def _read_failures(path: Path) -> Iterator[Failure]:
    for obj in _read_jsonl(path):
        if isinstance(obj.get("reason"), str):
            yield Failure(input=str(obj.get("input", "")), reason=obj["reason"],
                          detail=str(obj.get("detail", "")), id=obj.get("id"))
