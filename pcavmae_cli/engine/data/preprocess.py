"""Preprocessing: videos -> per-clip JPEG frames + mono WAV, a manifest and a failure list.

``SRC`` is a folder of videos (every non-hidden entry; see ``list_folder``), an AudioSet or
VGGSound segments CSV (videos looked up in a folder by clip id, then by YouTube id, under any
extension), or a CAV-MAE JSON data file (imported as it is, see ``cavmae_json``). Files are
judged by content, never by name: ``media.probe`` reads each one's packets, so any container
ffmpeg reads that holds a picture and a sound is a clip. Per clip, ONE ffmpeg call writes both
modalities:

- frames: the ``fps`` filter at ``video.fps``, scaled so the *shorter* side is
  ``video.short_side`` (aspect ratio kept), JPEG at ``video.jpeg_quality``, at most
  ``video.n_frames`` named ``frame_{k}.jpg``;
- audio: downmixed to mono as the average of the channels (CAV-MAE kept only the first
  channel, which loses a source panned to the right), resampled to ``audio.sample_rate``,
  16-bit PCM WAV, the first ``clip_seconds`` of the source.

Lengths come from the streams' packets (a file cut off inside the clip, or whose audio or
video packets stop far before the other's, is ``truncated``). ffmpeg writes only what it could
decode, so a damaged middle shows twice: as the decode errors ffmpeg logs, and as decoded audio
shorter than its packets (or frames missing at the end). Such a clip is ``decode_errors`` or
``length_mismatch``, or, with ``preprocess.on_decode_error: flag``, kept with the problem in
its record's ``decode_issue``. Padding comes after those checks, in Python. A clip shorter
than ``clip_seconds`` but at least ``preprocess.min_seconds`` long is kept: the audio is
padded with silence to exactly ``clip_seconds`` and the last frame repeated up to
``n_frames`` (``padded: true``, the real ``duration`` recorded). Every other input is a
``Failure`` with a reason code, never a crash and never a silent zero tensor: empty_file,
undecodable, truncated, no_video_stream, no_audio_stream, zero_duration, too_short,
decode_errors, length_mismatch, ffmpeg_failed, duplicate_id, unreadable, io_error; in a
folder also not_a_file, broken_symlink; from a CSV also missing_video, unsafe_id.

Layout under OUT::

    clips/{id}/frame_{k}.jpg, clips/{id}/audio.wav, clips/{id}/clip.json (completion marker)
    manifest.jsonl      ClipRecord lines, paths relative to OUT, in input order
    failures.jsonl      Failure lines
    class_labels_indices.csv   (VGGSound CSV input only: its sorted unique labels)

A clip is written into a temporary folder that is renamed into place once complete, so a
``clip.json`` means a finished clip; a re-run skips those (when the source file and the
settings are unchanged), retries failures and rewrites both JSONL files for the current input.
OUT is locked while a run writes into it (``engine/folder_lock.py``); Ctrl-C stops within
seconds, recording the clips settled so far (``engine/interrupt.py``, ``_run``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import ffmpeg

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import cavmae_json, decode_check, manifest, segments
from pcavmae_cli.engine.data.manifest import ClipRecord, Failure
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.files import STORAGE_ERRNOS, storage_error_in_text
from pcavmae_cli.engine.folder_lock import folder_lock
from pcavmae_cli.engine.interrupt import StopRequests, Stopped, run_pool
from pcavmae_cli.engine.schema import DataConfig

# In order of preference when a CSV's clip exists with several extensions (any other extension
# is taken after these: files are probed by content, not by name).
VIDEO_EXTENSIONS = (
    ".mp4", ".mkv", ".webm", ".mov", ".m4v", ".avi", ".flv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv", ".wmv",
)
MARKER = "clip.json"
AUDIO_FILE = "audio.wav"
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
LABEL_CSV = "class_labels_indices.csv"
TMP_PREFIX = ".tmp-"

Progress = Callable[..., None]


DecodePolicy = Literal["fail", "flag"]


@dataclass(frozen=True)
class ClipSettings:
    """The recipe settings one clip's preprocessing depends on (stored in its marker).

    ``on_decode_error`` is not stored: it decides what happens to a damaged clip, not what is
    written for it, so changing it redoes nothing (a flagged clip is redone to fail under
    ``fail``).
    """

    clip_seconds: float
    fps: float
    n_frames: int
    short_side: int
    jpeg_quality: int
    sample_rate: int
    min_seconds: float
    on_decode_error: DecodePolicy = "fail"

    @classmethod
    def from_config(cls, data: DataConfig) -> ClipSettings:
        settings = cls(
            clip_seconds=data.clip_seconds,
            fps=data.video.fps,
            n_frames=data.video.n_frames,
            short_side=data.video.short_side,
            jpeg_quality=data.video.jpeg_quality,
            sample_rate=data.audio.sample_rate,
            min_seconds=data.preprocess.min_seconds,
            on_decode_error=data.preprocess.on_decode_error,
        )
        settings.check()
        return settings

    def check(self) -> None:
        """Refuse values ffmpeg cannot use, naming the recipe key."""
        checks = [
            ("data.clip_seconds", self.clip_seconds > 0, "> 0"),
            ("data.video.fps", self.fps > 0, "> 0"),
            ("data.video.n_frames", self.n_frames >= 1, ">= 1"),
            ("data.video.short_side", self.short_side >= 2, ">= 2"),
            ("data.video.jpeg_quality", 1 <= self.jpeg_quality <= 31, "between 1 and 31"),
            ("data.audio.sample_rate", self.sample_rate >= 1000, ">= 1000"),
            ("data.preprocess.min_seconds", 0 <= self.min_seconds <= self.clip_seconds, "between 0 and clip_seconds"),
            ("data.preprocess.on_decode_error", self.on_decode_error in ("fail", "flag"), "fail or flag"),
        ]
        for key, ok, expected in checks:
            if not ok:
                raise UserError(f"key '{key}' must be {expected}")

    def marker_key(self) -> dict:
        """The settings a finished clip's marker records and a re-run compares."""
        key = asdict(self)
        del key["on_decode_error"]
        return key


@dataclass(frozen=True)
class ClipInput:
    """One listed clip: where its video is and what we know about it before decoding."""

    id: str
    path: Path
    labels: tuple[str, ...] = ()
    seek: float | None = None  # segment start, when the file may be the whole uncut video
    seek_end: float | None = None


@dataclass
class PreprocessReport:
    out: Path
    manifest: Path
    failures_path: Path
    label_csv: Path | None
    n_inputs: int
    n_done: int  # processed in this run
    n_skipped: int  # finished by an earlier run
    n_padded: int  # of the clips in the manifest
    failures: Counter = field(default_factory=Counter)  # reason -> count

    @property
    def n_ok(self) -> int:
        return self.n_done + self.n_skipped

    @property
    def n_failed(self) -> int:
        return sum(self.failures.values())


# --- listing inputs ------------------------------------------------------------------------


def clip_id_of_stem(stem: str) -> str:
    """A file stem as a clip id, usable as a folder name: ASCII letters, digits and ``_.-`` (others
    become ``_``), no leading dot (so never ``..``), at most 100 characters."""
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", stem).lstrip(".")[:100]
    return text or "_"


def _contains(entry: Path, inner: Path) -> bool:
    """True when ``inner`` is ``entry`` or lies inside it (both resolved)."""
    try:
        inner.resolve().relative_to(entry.resolve())
    except (ValueError, OSError, RuntimeError):
        return False
    return True


def list_folder(src: Path, exclude: tuple[Path, ...] = ()) -> list[ClipInput | Failure]:
    """Every non-hidden entry of ``src`` (sorted by name) as an input or a listed failure.

    Files are taken whatever their name says: ``process_clip`` probes the content, so an
    ``.ogg`` or ``.asf`` with picture and sound is a clip and a text file is ``undecodable``.
    A symbolic link is read through, but its clip id comes from the link's own name (links
    are how a corpus is assembled from files named otherwise); a link to nothing is
    ``broken_symlink``. Sub-folders are not descended into, and each one is a ``not_a_file``
    failure rather than skipped in silence: a corpus kept in per-class folders then shows at
    once that its clips were not read, instead of a manifest that quietly lacks them. The
    exceptions are the ``exclude`` paths (pcav's own outputs, or a folder holding one, when
    they are inside SRC) and hidden entries (a leading dot: editors' and pcav's temporaries).
    """
    items: list[ClipInput | Failure] = []
    for entry in sorted(src.iterdir()):
        if entry.name.startswith(".") or any(_contains(entry, out) for out in exclude):
            continue
        clip_id = clip_id_of_stem(Path(entry.name).stem)
        path = src.resolve() / entry.name  # the folder resolved, the entry's own name kept
        where = str(path)
        if entry.is_symlink() and not entry.exists():
            try:
                target = os.readlink(entry)
            except OSError:
                target = "?"
            items.append(Failure(where, "broken_symlink", f"symbolic link to {target}, which does not exist", clip_id))
        elif entry.is_dir():
            detail = "a folder: only the files directly in the input folder are read, not sub-folders"
            items.append(Failure(where, "not_a_file", detail, clip_id))
        elif not entry.is_file():
            items.append(Failure(where, "not_a_file", "not a regular file (a pipe, socket or device)", clip_id))
        else:  # a link is listed as itself, and read through
            items.append(ClipInput(clip_id, path))
    return items


def list_segments(
    csv_path: Path, videos: Path | None, split: str | None
) -> tuple[list[ClipInput | Failure], list[str] | None]:
    """Inputs of a segments CSV, and for VGGSound the sorted labels of the whole CSV.

    A row's video is ``{videos}/{clip_id}.<ext>`` (a cut clip), else ``{videos}/{ytid}.<ext>``;
    the latter, when it lasts at least to the segment's end, is taken as the whole video and
    the segment is cut out of it. Any extension is accepted (the content is probed later);
    when a clip exists with several, ``VIDEO_EXTENSIONS`` order decides, then the others.
    """
    corpus = segments.detect_corpus(csv_path)
    rows = segments.read_segments(csv_path, corpus)
    if split is not None:
        if corpus != "vggsound":
            raise UserError(f"{csv_path}: --split applies to VGGSound CSVs only; this is an AudioSet CSV")
        chosen = [s for s in rows if s.split == split]
        if not chosen:
            known = ", ".join(sorted({s.split or "" for s in rows}))
            raise UserError(f"{csv_path}: no rows of split '{split}' (splits here: {known})")
    else:
        chosen = rows
    if videos is None:
        videos = csv_path.parent / "videos" if (csv_path.parent / "videos").is_dir() else csv_path.parent
    if not videos.is_dir():
        raise UserError(f"videos folder not found: {videos}")
    found: dict[str, Path] = {}
    rank = {ext: i for i, ext in enumerate(VIDEO_EXTENSIONS)}  # any other extension comes after these
    files = [p for p in videos.iterdir() if not p.name.startswith(".") and p.is_file()]
    for path in sorted(files, key=lambda p: (p.stem, rank.get(p.suffix.lower(), len(rank)), p.suffix)):
        found.setdefault(path.stem, path.resolve())
    items: list[ClipInput | Failure] = []
    for seg in chosen:
        if not segments.is_safe_id(seg.ytid):
            items.append(Failure(seg.ytid, "unsafe_id", "the video id has characters other than A-Z a-z 0-9 _ -"))
            continue
        clip_id = seg.clip_id
        if clip_id in found:
            items.append(ClipInput(clip_id, found[clip_id], seg.labels))
        elif seg.ytid in found:  # maybe the whole video: seek to the segment when it is long enough
            items.append(ClipInput(clip_id, found[seg.ytid], seg.labels, seek=seg.start, seek_end=seg.end))
        else:
            detail = f"no {clip_id}.* or {seg.ytid}.* video in {videos}"
            items.append(Failure(clip_id, "missing_video", detail, clip_id))
    labels = sorted({s.labels[0] for s in rows}) if corpus == "vggsound" else None
    return items, labels


# --- one clip ------------------------------------------------------------------------------


def _stat_key(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _finished(final: Path, item: ClipInput, settings: ClipSettings) -> ClipRecord | None:
    """The record of a clip finished earlier from the same source and settings, else None."""

    def same_source(data: dict) -> bool:
        return data["source"] == _stat_key(item.path) and data["seek"] == item.seek

    return _marked_record(final, settings, same_source)


def finished_record(out: Path, clip_id: str, settings: ClipSettings) -> ClipRecord | None:
    """The record of clip ``clip_id`` finished in ``out`` with ``settings``, whatever became of its
    source since: ``pcav download --preprocess`` deletes each cut video once its clip is here."""
    return _marked_record(out / "clips" / clip_id, settings, lambda data: True)


def _marked_record(final: Path, settings: ClipSettings, accept: Callable[[dict], bool]) -> ClipRecord | None:
    """The record in ``final``'s marker when it was made with ``settings`` and ``accept``s it;
    None for a missing, unreadable or other marker."""
    try:
        data = json.loads((final / MARKER).read_text())
        if data["settings"] != settings.marker_key() or not accept(data):
            return None
        return ClipRecord(**data["record"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _last_line(stderr: bytes) -> str:
    lines = [ln.strip() for ln in stderr.decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else "ffmpeg failed without a message"


def _run_ffmpeg(src: Path, tmp: Path, start: float, settings: ClipSettings) -> list[str]:
    """The one ffmpeg pass: frames (fps, scale, JPEG) and mono WAV from the clip window.

    Returns the lines ffmpeg logged at level ``error``: where a decoder meets damaged data it
    conceals or drops it, logs it and still exits 0, so these lines are the only sign of a
    corrupt middle.
    """
    s = settings.short_side
    window = {"ss": start, "t": settings.clip_seconds} if start else {"t": settings.clip_seconds}
    inp = ffmpeg.input(str(src), threads=1, **window)
    frames = (
        inp["v:0"]
        .filter("fps", fps=settings.fps)
        .filter("scale", f"if(gt(iw,ih),-2,{s})", f"if(gt(iw,ih),{s},-2)")  # shorter side -> s
        .filter("setsar", 1)
    )
    out_frames = ffmpeg.output(
        frames, str(tmp / "frame_%d.jpg"), start_number=0, vframes=settings.n_frames, **{"q:v": settings.jpeg_quality}
    )
    out_audio = ffmpeg.output(inp["a:0"], str(tmp / AUDIO_FILE), ac=1, ar=settings.sample_rate, acodec="pcm_s16le")
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-filter_threads", "1"]
    _, err = ffmpeg.run(ffmpeg.merge_outputs(out_frames, out_audio), cmd=cmd, capture_stdout=True, capture_stderr=True)
    return [ln.strip() for ln in (err or b"").decode(errors="replace").splitlines() if ln.strip()]


def _count_frames(folder: Path, limit: int) -> int:
    n = 0
    while n < limit and (folder / manifest.DEFAULT_FRAME_PATTERN.format(k=n)).is_file():
        n += 1
    return n


def _pad_audio(path: Path, n_samples: int) -> int:
    """Pad with silence or cut the mono WAV to exactly ``n_samples``; returns the decoded count."""
    with wave.open(str(path), "rb") as fh:
        params = fh.getparams()
        data = fh.readframes(fh.getnframes())
    decoded = len(data) // (params.sampwidth * params.nchannels)
    if decoded != n_samples:
        width = params.sampwidth * params.nchannels
        data = data[: n_samples * width] + b"\0" * (max(0, n_samples - decoded) * width)
        with wave.open(str(path), "wb") as fh:
            fh.setparams(params)
            fh.writeframes(data)
    return decoded


def process_clip(item: ClipInput, out: Path, settings: ClipSettings) -> tuple[str, ClipRecord | Failure]:
    """Preprocess one clip into ``out/clips/{id}``: ``('done' | 'skipped', record)`` or ``('failed', failure)``."""
    final = out / "clips" / item.id

    def fail(reason: str, detail: str) -> tuple[str, Failure]:
        return "failed", Failure(str(item.path), reason, detail, item.id)

    done = _finished(final, item, settings)
    if done is not None and not (done.decode_issue and settings.on_decode_error == "fail"):
        done.labels = list(item.labels)  # the current listing's labels, should the CSV have changed
        return "skipped", done
    try:
        info = media.probe(item.path)
    except media.ProbeError as exc:
        return fail(exc.reason, exc.detail)
    except OSError as exc:
        return fail("unreadable", exc.strerror or str(exc))
    if not info.has_video:
        return fail("no_video_stream", "the file has no video stream")
    if not info.has_audio:
        return fail("no_audio_stream", "the file has no audio stream")
    if info.duration is not None and info.duration <= 0:
        return fail("zero_duration", "the file's packets last 0 s")
    start = 0.0
    if item.seek is not None and info.duration is not None and info.duration >= (item.seek_end or 0) - 0.5:
        start = item.seek  # a whole video: cut the segment out of it
    expected = None
    if info.duration is not None:
        expected = min(info.duration - start, settings.clip_seconds)
        if expected < settings.min_seconds:
            return fail("too_short", f"{max(expected, 0):.2f} s long, less than min_seconds={settings.min_seconds:g}")
    cut_short = decode_check.cut_short(info, start, settings) or decode_check.stream_stops_early(info, start, settings)
    if cut_short:
        return fail("truncated", cut_short)

    tmp = out / "clips" / f"{TMP_PREFIX}{item.id}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        try:
            errors = _run_ffmpeg(item.path, tmp, start, settings)
        except ffmpeg.Error as exc:
            stderr = (exc.stderr or b"").decode(errors="replace")
            full = storage_error_in_text(stderr, tmp)
            if full is not None:  # the output's disk, not this clip: stop the run (the CLI's one line)
                raise full from None
            return fail("ffmpeg_failed", _last_line(exc.stderr or b""))
        n_real = _count_frames(tmp, settings.n_frames)
        n_target = int(round(settings.clip_seconds * settings.sample_rate))
        try:
            decoded = _pad_audio(tmp / AUDIO_FILE, n_target)
        except (OSError, wave.Error, EOFError) as exc:
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
                raise
            return fail("ffmpeg_failed", f"no readable audio written: {exc}")
        audio_s = decoded / settings.sample_rate
        video_s = min(n_real / settings.fps, settings.clip_seconds)
        if n_real == 0 or decoded == 0:
            what = "video frame" if n_real == 0 else "audio sample"
            return fail("undecodable", f"no {what} could be decoded")
        damage = decode_check.decode_issues(info, start, settings, errors, decoded, n_real)
        if damage is not None and settings.on_decode_error == "fail":
            return fail(*damage)
        duration = expected if expected is not None else max(audio_s, video_s)
        if duration < settings.min_seconds:
            return fail("too_short", f"{duration:.2f} s decoded, less than min_seconds={settings.min_seconds:g}")
        last = tmp / manifest.DEFAULT_FRAME_PATTERN.format(k=n_real - 1)
        for k in range(n_real, settings.n_frames):  # repeat the last frame
            shutil.copyfile(last, tmp / manifest.DEFAULT_FRAME_PATTERN.format(k=k))
        record = ClipRecord(
            id=item.id,
            video=f"clips/{item.id}",
            audio=f"clips/{item.id}/{AUDIO_FILE}",
            labels=list(item.labels),
            duration=round(duration, 3),
            n_frames=settings.n_frames,
            padded=duration < settings.clip_seconds - 0.05,
            source=str(item.path),
            decode_issue=damage[1] if damage is not None else None,
        )
        marker = {
            "record": asdict(record), "settings": settings.marker_key(), "source": _stat_key(item.path),
            "seek": item.seek,
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        return "done", record
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:  # a full or read-only output stops the run
            raise
        return fail("io_error", f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the whole run -------------------------------------------------------------------------


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {out}: {exc.strerror}") from None


@dataclass
class Inputs:
    """What ``SRC`` lists, before any decoding: ``len()`` is the number of inputs."""

    src: Path
    kind: Literal["folder", "csv", "cavmae_json"]
    items: list[ClipInput | Failure] = field(default_factory=list)  # folder, csv
    entries: list = field(default_factory=list)  # cavmae_json: the raw 'data' items
    label_names: list[str] | None = None  # VGGSound CSV: labels of the whole CSV, sorted

    def __len__(self) -> int:
        return len(self.entries) if self.kind == "cavmae_json" else len(self.items)


def list_inputs(
    src: str | Path, videos: str | Path | None = None, split: str | None = None, *, exclude: tuple[Path, ...] = ()
) -> Inputs:
    """List the inputs of a folder, a segments CSV or a CAV-MAE JSON data file.

    Args:
        videos: where a CSV's videos are; default ``<csv folder>/videos`` if it exists, else
            the CSV's folder.
        split: VGGSound only: keep the rows of this split (train, test).
        exclude: outputs (the output folder): when inside a folder ``src``, not inputs.
    """
    src = Path(src)
    if not src.exists():
        raise UserError(f"input not found: {src}")
    if src.is_dir():
        if videos is not None or split is not None:
            raise UserError(f"--videos and --split apply to a segments CSV, and {src} is a folder")
        items = list_folder(src, tuple(Path(p) for p in exclude))
        if not items:
            raise UserError(f"no input files in {src}")
        return Inputs(src, "folder", items=items)
    if src.suffix.lower() == ".csv":
        items, labels = list_segments(src, Path(videos) if videos is not None else None, split)
        return Inputs(src, "csv", items=items, label_names=labels)
    if src.suffix.lower() == ".json":
        return Inputs(src, "cavmae_json", entries=cavmae_json.read_entries(src))
    raise UserError(f"{src}: expected a folder of videos, a segments .csv or a CAV-MAE .json data file")


def preprocess(
    src: str | Path | Inputs,
    out: str | Path,
    data: DataConfig | ClipSettings,
    *,
    videos: str | Path | None = None,
    split: str | None = None,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> PreprocessReport:
    """Preprocess every input of ``src`` (a path, listed with ``list_inputs``, or its listing).

    Args:
        data: the recipe's ``data`` section (or the ``ClipSettings`` taken from one).
        videos, split: see ``list_inputs``.
        jobs: ffmpeg processes at once; 0 means one per CPU core; default
            ``data.preprocess.jobs``.
        progress: called as ``progress(n=1, note=clip_id)`` after each input.
    """
    inputs = src if isinstance(src, Inputs) else list_inputs(src, videos, split, exclude=(Path(out),))
    out = Path(out)
    settings = data if isinstance(data, ClipSettings) else ClipSettings.from_config(data)
    if jobs is None:
        jobs = 0 if isinstance(data, ClipSettings) else data.preprocess.jobs
    if jobs < 0:
        raise UserError(f"--jobs must be >= 0, got {jobs}")
    _check_out(out)
    with folder_lock(out):  # a second preprocess into OUT would delete this one's temporary clips
        return _run(inputs, out, settings, jobs, progress)


def preprocess_file(
    path: Path, out: Path, data: DataConfig, *, start: float | None = None, end: float | None = None
) -> Path:
    """One media file (from ``start`` to ``end`` seconds, default its first clip) into ``out``;
    its one-clip manifest, or a ``UserError`` naming the file and why it could not be read.
    What ``pcav explain`` and the Python API (``inference.Model.read_video``) do with a video."""
    item = ClipInput(clip_id_of_stem(path.stem), path.resolve(), seek=start, seek_end=end)
    report = preprocess(Inputs(path.parent, "folder", items=[item]), out, data, jobs=1)
    if report.n_ok != 1:
        lines = report.failures_path.read_text(encoding="utf-8").splitlines()
        failure = json.loads(lines[0]) if lines else {"reason": "failed"}
        raise UserError(f"{path}: cannot preprocess ({failure['reason']}: {failure.get('detail', '')})")
    return report.manifest


def _run(inputs: Inputs, out: Path, settings: ClipSettings, jobs: int, progress: Progress | None) -> PreprocessReport:
    """``preprocess`` once ``out`` is locked. A Ctrl-C (or SIGTERM) stops handing out clips, keeps
    the ones finished, drops the failures of those it interrupted (``engine/interrupt.py``), writes
    both JSONL files for what is settled and raises ``Stopped``; the clips not reached are in
    neither file, and a rerun does them."""
    if inputs.kind == "cavmae_json":  # no decoding: point at CAV-MAE's extracted files
        records, failures = cavmae_json.import_entries(inputs.entries, inputs.src, progress)
        return _finish(inputs, out, records, failures, n_done=len(records), n_skipped=0)
    items = inputs.items
    for stale in (out / "clips").glob(f"{TMP_PREFIX}*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)

    # Ids must be unique: the second and later inputs with a taken id are failures.
    results: list[tuple[str, ClipRecord | Failure] | None] = [None] * len(items)
    seen: dict[str, str] = {}
    todo = []
    for i, item in enumerate(items):
        if isinstance(item, Failure):
            results[i] = ("failed", item)
        elif item.id in seen:
            detail = f"id '{item.id}' is taken by {seen[item.id]}"
            results[i] = ("failed", Failure(str(item.path), "duplicate_id", detail, item.id))
        else:
            seen[item.id] = str(item.path)
            todo.append(i)
    if progress and len(todo) < len(items):
        progress(len(items) - len(todo), "listed failures")

    def settle(i: int, result: tuple[str, ClipRecord | Failure]) -> None:
        results[i] = result
        if progress:
            progress(1, items[i].id)

    workers = jobs or os.cpu_count() or 1
    with StopRequests() as stop:
        late = run_pool(lambda i: process_clip(items[i], out, settings), todo, workers, settle, stop)
    for i, result in late:  # in flight at the stop: ffmpeg got the same Ctrl-C, so only successes count
        if result[0] != "failed":
            results[i] = result
    settled = [r for r in results if r is not None]
    records = [r for status, r in settled if status != "failed"]  # type: ignore[misc]
    failures = [r for status, r in settled if status == "failed"]  # type: ignore[misc]
    n_done = sum(1 for status, _ in settled if status == "done")
    report = _finish(inputs, out, records, failures, n_done=n_done, n_skipped=len(records) - n_done)
    if stop.reason is not None:
        raise Stopped(len(settled), len(items), "inputs", stop.reason)
    return report


def _finish(
    inputs: Inputs, out: Path, records: list[ClipRecord], failures: list[Failure], *, n_done: int, n_skipped: int
) -> PreprocessReport:
    """Write manifest.jsonl, failures.jsonl (and a VGGSound label CSV) atomically; the report."""
    manifest_path, failures_path = out / MANIFEST, out / FAILURES
    manifest.write_lines(manifest_path, records)
    manifest.write_lines(failures_path, failures)
    label_csv = None
    if inputs.label_names is not None:
        label_csv = out / LABEL_CSV
        manifest.write_label_csv(label_csv, manifest.LabelSet(inputs.label_names, inputs.label_names))
    return PreprocessReport(
        out=out,
        manifest=manifest_path,
        failures_path=failures_path,
        label_csv=label_csv,
        n_inputs=len(inputs),
        n_done=n_done,
        n_skipped=n_skipped,
        n_padded=sum(1 for r in records if r.padded),
        failures=Counter(f.reason for f in failures),
    )
