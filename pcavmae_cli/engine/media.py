"""Finding ffmpeg and probing media files with it.

Why not ffprobe: the ffmpeg that always comes with pcav is the static binary in the
``imageio-ffmpeg`` wheel, which has no ffprobe. So probing copies a file's audio and video
packets into ffmpeg's ``framecrc`` muxer and reads its structured listing (stream types,
codecs, time bases, one line per packet); that works with any ffmpeg, system or bundled, and
never reads the banner text, where the file's own metadata and name appear.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pcavmae_cli.engine.errors import UserError

FFMPEG_ENV = "PCAV_FFMPEG"


@functools.lru_cache(maxsize=None)
def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary pcav runs.

    Order: ``$PCAV_FFMPEG`` if set, else the binary bundled by imageio-ffmpeg (a pinned,
    known build with libx264 and aac), else ``ffmpeg`` on PATH.
    """
    override = os.environ.get(FFMPEG_ENV)
    if override:
        if not Path(override).is_file():
            raise UserError(f"{FFMPEG_ENV}={override} is not a file")
        return override
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        pass
    found = shutil.which("ffmpeg")
    if found:
        return found
    raise UserError("no ffmpeg found: install imageio-ffmpeg (pip) or ffmpeg, or set PCAV_FFMPEG")


@dataclass(frozen=True)
class MediaInfo:
    """The streams of a media file, measured from its packets (see ``probe``).

    Times are seconds from the start of the file; a stream's ``*_start`` is where its first
    presented sample is (0 when encoder priming makes the first packet start before the file).
    """

    duration: float | None  # end of the longest stream; None when no packet has a timestamp
    has_video: bool
    has_audio: bool
    video_codec: str | None
    audio_codec: str | None
    width: int | None
    height: int | None
    fps: float | None  # from the video packets' typical duration
    video_start: float | None = None
    video_end: float | None = None
    audio_start: float | None = None
    audio_end: float | None = None
    read_errors: tuple[str, ...] = ()  # what ffmpeg reported while reading the packets


class ProbeError(Exception):
    """ffmpeg could not open the file; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "ffmpeg failed without a message"


_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"styp", b"uuid"}


def _looks_like_mp4(path: Path) -> bool:
    """True when the file starts with an ISO-BMFF box header (size, then a known type)."""
    with path.open("rb") as fh:
        head = fh.read(8)
    return len(head) == 8 and head[4:8] in _MP4_BOXES


# ffmpeg's own log lines (``[in#0 @ 0x...] message``, ``[mov,mp4,... @ 0x...]`` in older releases),
# whole lines, never the file name or its metadata.
_MOOV_MISSING = re.compile(r"^\[[^\]\n]* @ 0x[0-9a-f]+\] moov atom not found$", re.M)
# Older ffmpeg releases (a distribution's) say "Output file #0 does not contain any stream", unprefixed.
_NO_STREAM = re.compile(r"^(\[[^\]\n]* @ 0x[0-9a-f]+\] )?Output file (#\d+ )?does not contain any stream$", re.M)
_NOPTS = -(2**63)


@dataclass
class _Stream:
    """One stream of a ``framecrc`` listing: its header lines and its packets' times."""

    header: dict[str, str]
    tb: float = 0.0
    starts: list[int] | None = None
    ends: list[int] | None = None
    durations: list[int] | None = None


def _parse_framecrc(text: str) -> list[_Stream]:
    """Streams of ffmpeg's ``framecrc`` output.

    The header has ``#key N: value`` lines per stream (``tb``, ``media_type``, ``codec_id``,
    ``dimensions``...); each packet is a line ``stream, dts, pts, duration, size, checksum``
    in that stream's time base. Only the muxer writes here, so nothing the file says about
    itself (titles, comments, its name) can appear in it.
    """
    streams: dict[int, _Stream] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            key, _, value = line[1:].partition(":")
            name, _, index = key.partition(" ")
            if index.isdigit():
                streams.setdefault(int(index), _Stream({})).header[name] = value.strip()
            continue
        fields = line.split(",")
        if len(fields) < 5 or not fields[0].strip().isdigit():
            continue
        stream = streams.get(int(fields[0]))
        if stream is None:
            continue
        try:
            dts, pts, duration = (int(f) for f in fields[1:4])
        except ValueError:
            continue
        when = pts if pts != _NOPTS else dts  # raw elementary streams carry decode times only
        if when == _NOPTS:
            continue
        if stream.starts is None:
            stream.starts, stream.ends, stream.durations = [], [], []
        stream.starts.append(when)
        stream.ends.append(when + max(duration, 0))
        stream.durations.append(duration)
    for stream in streams.values():
        num, _, den = stream.header.get("tb", "0/1").partition("/")
        stream.tb = int(num) / int(den) if den and int(den) else 0.0
    return [streams[i] for i in sorted(streams)]


def _typical_step(stream: _Stream) -> int:
    """The median packet duration, or the median gap between packets where durations are 0."""
    steps = sorted(d for d in stream.durations or () if d > 0)
    if not steps:
        times = sorted(set(stream.starts or ()))
        steps = sorted(b - a for a, b in zip(times, times[1:]) if b > a)
    return steps[len(steps) // 2] if steps else 0


def _span(stream: _Stream | None) -> tuple[float | None, float | None]:
    """(start, end) in seconds of a stream's packets; priming before 0 is not counted."""
    if stream is None or not stream.starts:
        return None, None
    end = max(stream.ends or ())
    if max(stream.durations or (0,)) <= 0:  # no packet states its duration: add a typical one
        end = max(stream.starts) + _typical_step(stream)
    return max(0.0, min(stream.starts) * stream.tb), end * stream.tb


def probe(path: str | Path) -> MediaInfo:
    """Streams and durations of ``path``, read from its packets, not from ffmpeg's banner.

    Why packets: the banner's ``Duration:`` and ``Stream #`` text sits among the file's own
    metadata and name, which can say anything (a title ``Duration: 00:00:02.00`` would be
    read as the duration). One stream copy of the audio and video packets into ffmpeg's
    ``framecrc`` muxer lists every packet's stream, timestamp and duration with each stream's
    time base, codec and size: structured output of ffmpeg itself. It reads the file once
    but decodes nothing, so a whole long video is cheap to measure. Errors ffmpeg reports
    while reading (a cut download, garbage in the middle) come back in ``read_errors``.

    Raises:
        ProbeError: ``empty_file``, ``truncated`` (the MP4 index is missing, as in a cut
            download) or ``undecodable`` (not a media file ffmpeg can read, e.g. text
            named ``.mp4``).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ProbeError("empty_file", "file has 0 bytes")
    with path.open("rb"):  # an OSError (no permission) here, not an ffmpeg message below
        pass
    # "file:" keeps a name like "concat:x" a file name; -copyinkf keeps packets before the first
    # keyframe (SWF marks none, and a plain copy would drop its whole video).
    cmd = [
        ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-i", f"file:{path}",
        "-map", "0:v?", "-map", "0:a?", "-c", "copy", "-copyinkf", "-f", "framecrc", "-",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        if _NO_STREAM.search(proc.stderr):  # a media file, but of subtitles or data only
            return MediaInfo(None, False, False, None, None, None, None, None)
        if _MOOV_MISSING.search(proc.stderr):
            if not _looks_like_mp4(path):  # ffmpeg says the same of any file named .mp4
                raise ProbeError("undecodable", "not an MP4 file: it does not start with an MP4 box")
            raise ProbeError("truncated", "MP4 index (moov atom) missing: the file is incomplete")
        raise ProbeError("undecodable", _last_error_line(proc.stderr))
    streams = _parse_framecrc(proc.stdout)
    video = next((s for s in streams if s.header.get("media_type") == "video"), None)
    audio = next((s for s in streams if s.header.get("media_type") == "audio"), None)
    video_start, video_end = _span(video)
    audio_start, audio_end = _span(audio)
    ends = [e for e in (video_end, audio_end) if e is not None]
    width = height = fps = None
    if video is not None:
        size = re.fullmatch(r"(\d+)x(\d+)", video.header.get("dimensions", ""))
        if size:
            width, height = int(size.group(1)), int(size.group(2))
        step = _typical_step(video) * video.tb
        fps = round(1.0 / step, 3) if step > 0 else None
    errors = tuple(ln.strip() for ln in proc.stderr.splitlines() if ln.strip())
    return MediaInfo(
        duration=max(ends) if ends else None,
        has_video=video is not None,
        has_audio=audio is not None,
        video_codec=video.header.get("codec_id") if video else None,
        audio_codec=audio.header.get("codec_id") if audio else None,
        width=width,
        height=height,
        fps=fps,
        video_start=video_start,
        video_end=video_end,
        audio_start=audio_start,
        audio_end=audio_end,
        read_errors=errors,
    )
