"""Fetching AudioSet / VGGSound segments from YouTube, cut to their windows, at corpus scale.

Both corpora are published as lists of YouTube IDs with a time window, not as media, so a
copy has to be rebuilt from YouTube, where a part of the videos has since gone private or
been removed, and which rate-limits a client that asks for two million of them. This module
runs the list; each clip is made by ``clip_fetch.py`` (the window only, or the whole video as
a fallback), every attempt goes through one shared pace and circuit breaker (``pacing.py``),
and failures are named and sorted by ``download_errors.py``. It is built around these facts:

* failures are normal: each is recorded with a short reason and the run goes on; a rate
  limit is retried with backoff and, if it persists, recorded as ``rate_limited``, which every
  rerun retries (only a video that is gone is "permanent");
* runs are long and get interrupted: a finished clip is never fetched twice and a killed
  run loses at most the clips that were in flight; Ctrl-C stops handing out clips, aborts the
  fetches in flight and records what is done (``engine/interrupt.py``);
* when every clip fails alike from the start, the setup is at fault, not the videos: the run
  says once which option or package fixes it (``download_errors.SetupWatch``);
* the IDs come from a file, i.e. from outside: an ID that could act as a path (``../x``,
  ``a/b``) is refused before it reaches yt-dlp or the filesystem.

Layout of the output folder ``DIR``::

    DIR/videos/{clip_id}.mp4   one clip per segment, [start, end] only, H.264 + AAC
                               (clip_id = ``{ytid}_{start:g}``, as ``Segment.clip_id``)
    DIR/downloaded.jsonl       one line per clip made: id, ytid, window, labels, duration,
                               fetch (window | whole), bytes fetched
    DIR/failures.jsonl         one ``manifest.Failure`` per clip that is not there, with reason
    DIR/.tmp/                  per-clip work folders and the cookies' private copy (removed after)
    DIR/.pcav.lock             held while a download writes into DIR (``engine/folder_lock.py``)

With ``preprocess_to`` (``--preprocess DATA``) each clip is also preprocessed into ``DATA``
(``preprocess.process_clip``: frames, WAV, ``DATA/clips/{id}/clip.json``) right after it is cut,
and its video deleted (unless ``keep_videos``): a corpus is built on little disk. Such a clip is
done when its ``clip.json`` is there; ``DATA/manifest.jsonl`` is rewritten from those markers,
in the CSV's order, when the run ends, so a killed run's rerun neither loses nor repeats a clip.

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
import shutil
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pcavmae_cli.engine.data import segments as seglib
from pcavmae_cli.engine.data.clip_fetch import (
    ClipError,
    Fetched,
    FetchOptions,
    cut,
    fetch_whole,
    fetch_window,
    resolve,
    window_unsupported,
)
from pcavmae_cli.engine.data.download_errors import PERMANENT_REASONS, SetupWatch, classify_error, is_throttled
from pcavmae_cli.engine.data.manifest import Failure, atomic_write_text, write_lines
from pcavmae_cli.engine.data.pacing import Clock, Pacing, RateGate, backoff_delay
from pcavmae_cli.engine.data.segments import Corpus, Segment
from pcavmae_cli.engine.data.throughput import Throughput
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.folder_lock import folder_lock
from pcavmae_cli.engine.interrupt import StopRequests, Stopped, run_pool

__all__ = ["PERMANENT_REASONS", "classify_error", "download", "download_segments", "load_segments", "check_args"]

YOUTUBE_URL = "https://www.youtube.com/watch?v={ytid}"
FetchMode = Literal["window", "whole"]
FETCH_MODES = ("window", "whole")

VIDEOS = "videos"
DOWNLOADED = "downloaded.jsonl"
FAILURES = "failures.jsonl"
TMP = ".tmp"

Progress = Callable[..., None]  # progress(n: int = 1, note: str = "")
Notice = Callable[[str], None]  # a sentence for the user, once (setup hints)


@dataclass
class Downloaded:
    """A clip made; one line of downloaded.jsonl."""

    id: str
    ytid: str
    start: float
    end: float
    labels: list[str]
    video: str | None  # relative to DIR; None once deleted after preprocessing
    duration: float  # of the cut file; shorter than end - start when ``short``
    short: bool = False
    split: str | None = None
    fetch: str | None = None  # "window" or "whole"
    bytes: int | None = None  # fetched from the site for this clip
    fallback: str | None = None  # why the window could not be fetched alone
    preprocessed: str | None = None  # the clip's folder under --preprocess DATA

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
    notices: list[str] = field(default_factory=list)  # setup hints given during the run
    throughput: Throughput = field(default_factory=Throughput)
    breaker_trips: int = 0  # times every worker paused because the site throttled
    throttled_attempts: int = 0  # attempts answered 429 / 5xx / time-out (retried or not)
    manifest: Path | None = None  # DATA/manifest.jsonl with --preprocess

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


@dataclass
class Preprocessing:
    """``--preprocess DATA``: where the clips go and the recipe settings they are made with."""

    out: Path
    settings: object  # preprocess.ClipSettings (imported late: it pulls ffmpeg-python)
    keep_videos: bool = False
    label_names: list[str] | None = None  # VGGSound: every label of the CSV, for the label CSV


def download(
    csv_path: str | Path,
    corpus: Corpus,
    out_dir: str | Path,
    *,
    limit: int | None = None,
    **options,
) -> DownloadReport:
    """Download the clips of a segments CSV into ``out_dir`` (layout in the module doc).

    Args:
        corpus: the CSV's format; a CSV that looks like the other corpus is an error.
        limit: only the first ``limit`` segments of the CSV.
        options: those of ``download_segments``.
    """
    check_args(out_dir, options.get("url_template", YOUTUBE_URL), options.get("jobs", 4))
    rows = load_segments(csv_path, corpus, limit)
    return download_segments(rows, out_dir, **options)


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


def check_args(out_dir: str | Path, url_template: str, jobs: int, fetch: str = "window") -> None:
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
    if fetch not in FETCH_MODES:
        raise UserError(f"--fetch {fetch!r}: expected window or whole")


@dataclass
class _Run:
    """What every worker of one run shares."""

    root: Path
    url_template: str
    fetch: FetchMode
    options: FetchOptions
    gate: RateGate
    clock: Clock
    stop: StopRequests
    preprocessing: Preprocessing | None


def download_segments(
    rows: Sequence[Segment],
    out_dir: str | Path,
    *,
    url_template: str = YOUTUBE_URL,
    jobs: int = 4,
    fmt: str | None = None,
    retry_failed: bool = False,
    progress: Progress | None = None,
    fetch: FetchMode = "window",
    cookies: str | Path | None = None,
    cookies_from_browser: str | None = None,
    proxy: str | None = None,
    pacing: Pacing | None = None,
    clock: Clock | None = None,
    preprocess_to: Preprocessing | None = None,
    on_notice: Notice | None = None,
) -> DownloadReport:
    """Download ``rows`` into ``out_dir`` with ``jobs`` threads; never raises for one clip.

    Args:
        url_template: where a video lives, with ``{ytid}``; tests point it at a local server.
        fmt: a yt-dlp format selector replacing the default (<= 360p, mp4 preferred).
        retry_failed: also retry clips an earlier run recorded with a permanent reason.
        progress: called as ``progress(n, note)`` when ``n`` more clips are settled; the note
            holds clips/min, bytes/clip and the failure mix (``throughput.py``).
        fetch: ``window`` (only the segment's bytes, whole video where that fails) or ``whole``.
        cookies, cookies_from_browser, proxy: how to reach the site (``site_access.py``).
        pacing: the pace, retries and circuit breaker (``pacing.py``); default ``Pacing()``.
        clock: time and sleeps of the pacing; tests pass a fast one.
        preprocess_to: preprocess each clip into a training folder as it is cut (module doc).
        on_notice: called with a setup hint when the first clips all fail alike.

    Ctrl-C or SIGTERM: the clips done so far are logged, the fetches in flight are aborted (their
    failures are not recorded), the rest is left for a rerun, and ``Stopped`` is raised.
    """
    from pcavmae_cli.engine.data import site_access

    check_args(out_dir, url_template, jobs, fetch)
    site_access.check_proxy(proxy)
    site_access.check_cookies(cookies, cookies_from_browser)
    pacing = pacing or Pacing()
    pacing.check()
    out_dir = Path(out_dir)
    if preprocess_to is not None and Path(preprocess_to.out).resolve() == out_dir.resolve():
        raise UserError(f"--preprocess {preprocess_to.out} must be another folder than --out {out_dir}")
    (out_dir / VIDEOS).mkdir(parents=True, exist_ok=True)
    root = out_dir.resolve()
    advance = progress or (lambda n=1, note="": None)
    report = DownloadReport(out_dir=out_dir)
    clock = clock or Clock()
    report.throughput = Throughput(clock.now)
    watch = SetupWatch()

    def notice(message: str) -> None:
        report.notices.append(message)
        if on_notice is not None:
            on_notice(message)

    with folder_lock(out_dir), _data_lock(preprocess_to):
        shutil.rmtree(out_dir / TMP, ignore_errors=True)  # work folders of a killed run
        cookiefile = site_access.private_cookies(cookies, cookies_from_browser, out_dir / TMP / "cookies.txt")
        runtimes = site_access.js_runtimes()
        if site_access.is_youtube(url_template) and not runtimes:
            notice(site_access.NO_JS_RUNTIME)
        options = FetchOptions(fmt=fmt, cookiefile=cookiefile, proxy=proxy, js_runtimes=runtimes or None)
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
            if seglib.is_safe_id(seg.ytid) and _is_done(root, cid, preprocess_to):
                report.already_done += 1
                failed.pop(cid, None)
                # A run killed between placing a clip and logging it leaves no line: add one.
                done_log.setdefault(cid, _segment_entry(seg, root, preprocess_to))
            elif cid in failed and not retry_failed and failed[cid].reason in PERMANENT_REASONS:
                report.skipped_failed += 1
            else:
                todo.append(seg)
        if report.already_done or report.skipped_failed:
            advance(report.already_done + report.skipped_failed, "done before")

        def record(outcome: Downloaded | Failure) -> None:
            if isinstance(outcome, Downloaded):
                report.downloaded.append(outcome)
                report.throughput.add_clip(outcome.bytes or 0, outcome.fetch or "cut before")
                done_log[outcome.id] = json.loads(outcome.to_json())
                failed.pop(outcome.id, None)
                log.append(DOWNLOADED, outcome.to_json())
            else:
                report.failures.append(outcome)
                report.throughput.add_failure(outcome.reason)
                failed[outcome.id] = outcome
                log.append(FAILURES, outcome.to_json())

        def settle(seg: Segment, outcome: Downloaded | Failure) -> None:
            record(outcome)
            hint = watch.message(None if isinstance(outcome, Downloaded) else outcome.reason)
            if hint is not None:
                notice(hint)
            advance(1, report.throughput.note())

        gate = RateGate(pacing, clock)
        try:
            with StopRequests() as stop:
                run = _Run(root, url_template, fetch, options, gate, clock, stop, preprocess_to)
                late = run_pool(lambda seg: _one_clip(seg, run), todo, jobs, settle, stop)
            for _, outcome in late:  # in flight at the stop: a failure may be the stop's doing
                if isinstance(outcome, Downloaded):
                    record(outcome)
        finally:
            report.breaker_trips, report.throttled_attempts = gate.trips, gate.throttled
            _write_logs(root, done_log, failed, preprocess_to)
            if preprocess_to is not None:
                report.manifest = _write_data_manifest(preprocess_to, rows)
            shutil.rmtree(out_dir / TMP, ignore_errors=True)
    if stop.reason is not None:
        settled = report.already_done + report.skipped_failed + len(report.downloaded) + len(report.failures)
        raise Stopped(settled, len(seen), "clips", stop.reason)
    return report


def _data_lock(preprocessing: Preprocessing | None):
    import contextlib

    if preprocessing is None:
        return contextlib.nullcontext()
    Path(preprocessing.out).mkdir(parents=True, exist_ok=True)
    return folder_lock(Path(preprocessing.out))


def _is_done(root: Path, cid: str, preprocessing: Preprocessing | None) -> bool:
    """A clip needs nothing more: its video is there, or with --preprocess, its finished clip."""
    if preprocessing is None:
        return (root / VIDEOS / f"{cid}.mp4").is_file()
    from pcavmae_cli.engine.data.preprocess import finished_record

    return finished_record(Path(preprocessing.out), cid, preprocessing.settings) is not None


def _one_clip(seg: Segment, run: _Run) -> Downloaded | Failure:
    """Fetch, cut (and preprocess) one segment; every problem becomes a ``Failure``, nothing is raised."""
    cid = seg.clip_id
    if not seglib.is_safe_id(seg.ytid):
        return Failure(input=seg.ytid, reason="invalid_id", detail="an ID may only hold A-Z a-z 0-9 _ -", id=cid)
    url = run.url_template.format(ytid=seg.ytid)
    if not (math.isfinite(seg.start) and math.isfinite(seg.end) and 0 <= seg.start < seg.end):
        return Failure(input=url, reason="invalid_segment", detail=f"window [{seg.start}, {seg.end}]", id=cid)
    videos = (run.root / VIDEOS).resolve()  # resolved: DIR/videos may be a link to another disk
    final = (videos / f"{cid}.mp4").resolve()
    if final.parent != videos:  # is_safe_id makes this impossible; keep it that way
        raise AssertionError(f"clip path {final} is not in {videos}")
    if final.is_file() and run.preprocessing is not None:  # cut by an earlier run, not preprocessed yet
        try:
            info = _probe_duration(final)
        except ClipError as exc:
            return Failure(input=url, reason=exc.reason, detail=exc.detail, id=cid)
        clip = Downloaded(
            id=cid, ytid=seg.ytid, start=seg.start, end=seg.end, labels=list(seg.labels),
            video=f"{VIDEOS}/{cid}.mp4", duration=round(info, 3), short=info < (seg.end - seg.start) - 0.25,
            split=seg.split,
        )
        return _preprocess(clip, final, url, run)
    (run.root / TMP).mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{cid}-", dir=run.root / TMP))
    try:
        made = _fetch_with_retries(seg, url, work, run)
        os.replace(work / "cut.mp4", final)
    except ClipError as exc:
        return Failure(input=url, reason=exc.reason, detail=exc.detail, id=cid)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if run.gate.pacing.sleep:
            run.clock.sleep(run.gate.pacing.sleep, run.stop)
    clip = Downloaded(
        id=cid, ytid=seg.ytid, start=seg.start, end=seg.end, labels=list(seg.labels),
        video=f"{VIDEOS}/{cid}.mp4", duration=round(made.duration, 3), short=made.short, split=seg.split,
        fetch=made.fetch, bytes=made.bytes, fallback=made.fallback,
    )
    if run.preprocessing is not None:
        return _preprocess(clip, final, url, run)
    return clip


def _probe_duration(path: Path) -> float:
    from pcavmae_cli.engine import media

    try:
        return media.probe(path).duration or 0.0
    except media.ProbeError as exc:
        raise ClipError("cut_failed", f"{path.name} unreadable: {exc}") from None


def _preprocess(clip: Downloaded, video: Path, url: str, run: _Run) -> Downloaded | Failure:
    """Preprocess a cut clip into DATA; its video is deleted once the clip is there (unless kept).

    A clip that cannot be preprocessed keeps its video, so that a rerun need not fetch it again.
    """
    from pcavmae_cli.engine.data.preprocess import ClipInput, process_clip

    prep = run.preprocessing
    status, result = process_clip(ClipInput(clip.id, video, tuple(clip.labels)), Path(prep.out), prep.settings)
    if status == "failed":
        return Failure(input=url, reason=result.reason, detail=f"preprocessing: {result.detail}", id=clip.id)
    clip.preprocessed = str(Path(prep.out) / result.video)
    if not prep.keep_videos:
        video.unlink(missing_ok=True)
        clip.video = None
    return clip


def _fetch_with_retries(seg: Segment, url: str, work: Path, run: _Run) -> Fetched:
    """``_attempt`` until it works, retrying throttled failures with backoff (``pacing.py``)."""
    pacing = run.gate.pacing
    attempt = 0
    while True:
        if not run.gate.before_attempt(run.stop):
            raise ClipError("stopped", f"stopped by {run.stop.reason}")
        try:
            made = _attempt(seg, url, work, run)
        except ClipError as exc:
            throttled = is_throttled(exc.reason)
            run.gate.after_attempt(throttled)
            if not throttled or attempt >= pacing.retries:
                raise
            if not run.clock.sleep(backoff_delay(attempt, pacing, exc.retry_after), run.stop):
                raise
            attempt += 1
            _clear(work)
            continue
        run.gate.after_attempt(False)
        return made


def _clear(work: Path) -> None:
    """Empty a clip's work folder of a failed attempt's partial files."""
    for leftover in work.iterdir():
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


def _attempt(seg: Segment, url: str, work: Path, run: _Run) -> Fetched:
    """One try at a clip: its window when the site allows it, else the whole video and a cut."""
    dest = work / "cut.mp4"
    fallback = None
    if run.fetch == "window":
        info = resolve(url, run.options, work)
        duration = info.get("duration")
        if duration and duration <= seg.start:
            raise ClipError("too_short", f"the video is {duration:.2f} s long; the segment starts at {seg.start:g} s")
        fallback = window_unsupported(info, run.options)
        if fallback is None:
            try:
                return fetch_window(info, dest, seg.start, seg.end, run.options, lambda: run.stop.reason)
            except ClipError as exc:
                if not exc.window_only:
                    raise
                fallback = f"window fetch failed: {exc.detail}"
                dest.unlink(missing_ok=True)
    source, fetched = fetch_whole(url, work, run.options, lambda: run.stop.reason)
    duration, short = cut(source, dest, seg.start, seg.end)
    return Fetched(duration, short, fetched, "whole", fallback)


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


def _segment_entry(seg: Segment, root: Path, preprocessing: Preprocessing | None) -> dict:
    """A downloaded.jsonl line for a clip found done but not logged (no duration known)."""
    entry = {"id": seg.clip_id, "ytid": seg.ytid, "start": seg.start, "end": seg.end, "labels": list(seg.labels)}
    if (root / VIDEOS / f"{seg.clip_id}.mp4").is_file():
        entry["video"] = f"{VIDEOS}/{seg.clip_id}.mp4"
    if preprocessing is not None:
        entry["preprocessed"] = str(Path(preprocessing.out) / "clips" / seg.clip_id)
    if seg.split is not None:
        entry["split"] = seg.split
    return entry


def _write_logs(root: Path, done_log: dict[str, dict], failed: dict[str, Failure],
                preprocessing: Preprocessing | None) -> None:
    """Rewrite both logs compacted: one line per clip, and only clips that are still done."""

    def still_done(entry: dict) -> bool:
        if entry.get("video") and (root / str(entry["video"])).is_file():
            return True
        return preprocessing is not None and _is_done(root, str(entry["id"]), preprocessing)

    kept = [d for d in done_log.values() if still_done(d)]
    atomic_write_text(root / DOWNLOADED, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in kept))
    write_lines(root / FAILURES, failed.values())


def _write_data_manifest(preprocessing: Preprocessing, rows: Sequence[Segment]) -> Path:
    """DATA/manifest.jsonl from the finished clips' markers, in the CSV's order, each clip once."""
    from pcavmae_cli.engine.data import manifest
    from pcavmae_cli.engine.data.preprocess import LABEL_CSV, MANIFEST, finished_record

    out = Path(preprocessing.out)
    records, seen = [], set()
    for seg in rows:
        if seg.clip_id in seen or not seglib.is_safe_id(seg.ytid):
            continue
        seen.add(seg.clip_id)
        record = finished_record(out, seg.clip_id, preprocessing.settings)
        if record is not None:
            record.labels = list(seg.labels)
            records.append(record)
    manifest.write_lines(out / MANIFEST, records)
    if preprocessing.label_names is not None:
        names = preprocessing.label_names
        manifest.write_label_csv(out / LABEL_CSV, manifest.LabelSet(names, names))
    return out / MANIFEST


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
