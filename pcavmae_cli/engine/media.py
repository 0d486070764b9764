"""Finding ffmpeg and probing media files with it.

Why not ffprobe: the ffmpeg that always comes with pcav is the static binary in the
``imageio-ffmpeg`` wheel, which has no ffprobe. So probing runs ``ffmpeg -i FILE`` and reads
the stream summary it prints; that works with any ffmpeg, system or bundled.
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
    """What ``ffmpeg -i`` says about a file's container and first streams."""

    duration: float | None  # seconds; None when the container states none
    has_video: bool
    has_audio: bool
    video_codec: str | None
    audio_codec: str | None
    width: int | None
    height: int | None
    fps: float | None


class ProbeError(Exception):
    """ffmpeg could not open the file; ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


_DURATION = re.compile(r"Duration:\s*(N/A|(\d+):(\d+):(\d+(?:\.\d+)?))")
_VIDEO = re.compile(r"Stream #\d+:\d+.*?: Video: (\w+)[^\n]*?(\d{2,5})x(\d{2,5})")
_AUDIO = re.compile(r"Stream #\d+:\d+.*?: Audio: (\w+)")
_FPS = re.compile(r"(\d+(?:\.\d+)?) fps")


def _last_error_line(stderr: str) -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "ffmpeg failed without a message"


_MP4_BOXES = {b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pdin", b"styp", b"uuid"}


def _looks_like_mp4(path: Path) -> bool:
    """True when the file starts with an ISO-BMFF box header (size, then a known type)."""
    with path.open("rb") as fh:
        head = fh.read(8)
    return len(head) == 8 and head[4:8] in _MP4_BOXES


def probe(path: str | Path) -> MediaInfo:
    """Read duration and streams of ``path``.

    Raises:
        ProbeError: ``empty_file``, ``truncated`` (the MP4 index is missing, as in a cut
            download) or ``undecodable`` (not a media file ffmpeg can read, e.g. text
            named ``.mp4``).
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise ProbeError("empty_file", "file has 0 bytes")
    proc = subprocess.run(
        [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
    )
    text = proc.stderr
    if "moov atom not found" in text:
        if not _looks_like_mp4(path):  # ffmpeg says the same of any file named .mp4
            raise ProbeError("undecodable", "not an MP4 file: it does not start with an MP4 box")
        raise ProbeError("truncated", "MP4 index (moov atom) missing: the file is incomplete")
    if "Stream #" not in text:
        raise ProbeError("undecodable", _last_error_line(text))
    duration = None
    m = _DURATION.search(text)
    if m and m.group(1) != "N/A":
        duration = int(m.group(2)) * 3600 + int(m.group(3)) * 60 + float(m.group(4))
    v = _VIDEO.search(text)
    a = _AUDIO.search(text)
    fps = None
    if v:
        line = text[v.start() : text.find("\n", v.start())]
        f = _FPS.search(line)
        fps = float(f.group(1)) if f else None
    return MediaInfo(
        duration=duration,
        has_video=v is not None,
        has_audio=a is not None,
        video_codec=v.group(1) if v else None,
        audio_codec=a.group(1) if a else None,
        width=int(v.group(2)) if v else None,
        height=int(v.group(3)) if v else None,
        fps=fps,
    )
