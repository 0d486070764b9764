"""One segment of one video onto disk, as an exact H.264 + AAC clip: by its window, or whole.

An AudioSet clip is 10 s of a video that often lasts minutes, so fetching the whole video
moves tens of times the bytes that are kept. The **window** fetch lets yt-dlp resolve the media
URL(s) only (the chosen format, or YouTube's separate video and audio formats, with the HTTP
headers and cookies they need), then has ffmpeg read them with an input seek
(``-ss START -t DUR -i URL``): ffmpeg reads the file's index and asks the server for the byte
ranges of the window, in requests of ``REQUEST_SIZE`` bytes at most so that it never pulls much
past what it needs. The clip is re-encoded, so it begins at START exactly, not at the keyframe
before it.

The **whole** fetch is the fallback: yt-dlp downloads the entire file and ffmpeg cuts it. It is
used where the window fetch cannot work (a format that is not a plain HTTP file or HLS
playlist, a SOCKS proxy, which ffmpeg cannot use) or failed for a reason that is about reading
at an offset (a server that ignores ranges on a file whose index is at its end, ...), and
``--fetch whole`` asks for it. Each clip's log line says which one made it (``fetch``).

Bytes are counted as fetched: ffmpeg's own count of what it read from its inputs (its
``Statistics: N bytes read`` lines) for a window, the size of what yt-dlp wrote for a whole video.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data.download_errors import classify_error, clean

# A 10 s clip is resized to 224 px and 1 fps downstream, so anything above 360p is wasted
# bandwidth. "bv*+ba/b" takes one file with sound and picture, merging a separate audio track
# only when the video has none; the sort prefers the largest resolution <= 360p and mp4/m4a,
# which also picks the single format of a plain direct link.
DEFAULT_FORMAT = "bv*+ba/b"
DEFAULT_FORMAT_SORT = ("res:360", "ext:mp4:m4a")

REQUEST_SIZE = 256 * 1024  # bytes per HTTP range request of a window fetch
FIRST_REQUEST_SIZE = 64 * 1024  # the first one, which mostly reads the file's index
WINDOW_PROTOCOLS = frozenset({"http", "https", "m3u8", "m3u8_native"})
IO_TIMEOUT_S = 30


class ClipError(Exception):
    """One clip could not be made; ``reason`` is the short code written to failures.jsonl.

    ``retry_after``: the server's Retry-After, in seconds, when it sent one. ``window_only``:
    the failure is the window fetch's own (a seek the server could not serve), so the whole
    fetch may still work.
    """

    def __init__(self, reason: str, detail: str, *, retry_after: float | None = None, window_only: bool = False):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after
        self.window_only = window_only


@dataclass(frozen=True)
class FetchOptions:
    """How to reach the site: format choice, cookies, proxy. One per run, shared by the workers."""

    fmt: str | None = None  # yt-dlp format selector replacing DEFAULT_FORMAT
    cookiefile: Path | None = None  # Netscape cookies.txt (a private copy, see youtube_setup.py)
    proxy: str | None = None  # http://host:port, socks5://...
    socket_timeout: float = IO_TIMEOUT_S
    js_runtimes: dict | None = None  # yt-dlp's js_runtimes (site_access.js_runtimes); None: its default

    def ytdlp_params(self, work: Path) -> dict:
        """yt-dlp's options for one clip whose files go to ``work``."""
        params = {
            "format": self.fmt or DEFAULT_FORMAT,
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
            # Rate limits and server errors are retried by the caller, with backoff and the
            # circuit breaker; yt-dlp's own retries would hammer the site without either.
            "retries": 0,
            "extractor_retries": 0,
            "fragment_retries": 3,
            "socket_timeout": self.socket_timeout,
        }
        if self.fmt is None:
            params["format_sort"] = list(DEFAULT_FORMAT_SORT)
        if self.cookiefile is not None:
            # yt-dlp writes the jar back into its cookie file when it closes: each clip gets
            # its own copy, so that parallel clips never write into one file.
            own = work / "cookies.txt"
            shutil.copyfile(self.cookiefile, own)
            own.chmod(0o600)
            params["cookiefile"] = str(own)
        if self.proxy:
            params["proxy"] = self.proxy
        if self.js_runtimes:
            params["js_runtimes"] = self.js_runtimes
        return params

    def window_possible(self) -> bool:
        """ffmpeg speaks to HTTP proxies only."""
        return not self.proxy or self.proxy.startswith(("http://", "https://"))


class _QuietLogger:
    """yt-dlp talks through this: nothing reaches the terminal, where the progress bar is.

    Errors are not lost: yt-dlp also raises them as ``DownloadError``, which becomes the
    failure's detail.
    """

    def debug(self, msg: str) -> None:
        pass

    info = warning = error = debug


@dataclass
class Fetched:
    """A clip made: its duration, whether it is shorter than asked, and the bytes fetched for it."""

    duration: float
    short: bool
    bytes: int
    fetch: str  # "window" or "whole"
    fallback: str | None = None  # why a window fetch was not possible, for "whole"


def _ytdlp_error(exc: BaseException) -> ClipError:
    """A yt-dlp ``DownloadError`` as a ``ClipError`` with its reason and Retry-After."""
    cause = exc.exc_info[1] if getattr(exc, "exc_info", None) else None
    status = getattr(cause, "status", None)
    retry_after = None
    response = getattr(cause, "response", None)
    if response is not None:
        retry_after = _seconds(response.headers.get("Retry-After"))
    return ClipError(classify_error(str(exc), status), clean(str(exc)), retry_after=retry_after)


def _seconds(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:  # an HTTP date: rare, and the backoff covers it
        return None


def resolve(url: str, options: FetchOptions, work: Path) -> dict:
    """yt-dlp's info of ``url`` without downloading: the chosen format(s), their URLs and headers."""
    import yt_dlp  # here, not at the top: the CLI starts faster without it

    try:
        with yt_dlp.YoutubeDL(options.ytdlp_params(work)) as ydl:
            info = ydl.extract_info(url, download=False)
            info = ydl.sanitize_info(info) if info else {}
            for fmt in info.get("requested_formats") or [info]:
                if fmt.get("url"):
                    fmt["pcav_cookies"] = _cookie_lines(ydl, fmt["url"])
            return info
    except yt_dlp.utils.DownloadError as exc:
        raise _ytdlp_error(exc) from None
    except Exception as exc:  # noqa: BLE001 - one odd page must not end a run of thousands
        raise ClipError("download_failed", f"{type(exc).__name__}: {exc}") from None


def _cookie_lines(ydl, url: str) -> str:
    """The jar's cookies for ``url`` in ffmpeg's ``-cookies`` form (Set-Cookie lines).

    The jar has chosen the cookies for this URL; each is given the URL's own host as its
    domain, with the port when there is one, because that is what ffmpeg compares it with.
    """
    host = urlsplit(url).netloc.rpartition("@")[2]
    cookies = ydl.cookiejar.get_cookies_for_url(url)
    return "".join(f"{c.name}={c.value}; path={c.path}; domain={host};\r\n" for c in cookies)


def streams_of(info: dict) -> list[dict]:
    """The format dicts ffmpeg has to read: one, or video and audio apart."""
    return [f for f in (info.get("requested_formats") or [info]) if f.get("url")]


def window_unsupported(info: dict, options: FetchOptions) -> str | None:
    """Why a window fetch cannot work for this info (None when it can)."""
    if not options.window_possible():
        return f"ffmpeg cannot use the proxy {options.proxy.split('://')[0]}://"
    streams = streams_of(info)
    if not streams:
        return "yt-dlp found no media URL"
    for fmt in streams:
        if fmt.get("protocol", "https") not in WINDOW_PROTOCOLS:
            return f"format {fmt.get('format_id')} is served as {fmt.get('protocol')}"
    return None


@functools.lru_cache(maxsize=None)
def _ffmpeg_has_request_size(exe: str) -> bool:
    """Bounded range requests (``-request_size``) came with ffmpeg 7; older ones read open-ended."""
    out = subprocess.run([exe, "-hide_banner", "-h", "protocol=http"], capture_output=True, text=True, errors="replace")
    return "-request_size" in out.stdout


def _input_args(fmt: dict, options: FetchOptions, start: float, seconds: float, exe: str) -> list[str]:
    url = fmt["url"]
    args: list[str] = []
    if url.startswith(("http://", "https://")) or fmt.get("protocol", "").startswith("m3u8"):
        headers = fmt.get("http_headers") or {}
        if headers:
            args += ["-headers", "".join(f"{k}: {v}\r\n" for k, v in headers.items())]
        if fmt.get("pcav_cookies"):
            args += ["-cookies", fmt["pcav_cookies"]]
        if options.proxy:
            args += ["-http_proxy", options.proxy]
        args += ["-rw_timeout", str(int(options.socket_timeout * 1_000_000))]
        if fmt.get("protocol", "https") in ("http", "https") and _ffmpeg_has_request_size(exe):
            args += ["-request_size", str(REQUEST_SIZE), "-initial_request_size", str(FIRST_REQUEST_SIZE),
                     "-multiple_requests", "1"]
    return [*args, "-ss", f"{start:.3f}", "-t", f"{seconds:.3f}", "-i", url]


ENCODE_ARGS = [
    "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p",
    "-c:a", "aac", "-b:a", "128k", "-movflags", "+faststart", "-f", "mp4",
]
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\] )+")  # "[http @ 0x...] [error] "
_BYTES_READ = re.compile(r"Statistics: (\d+) bytes read")
_DURATION = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")


def fetch_window(info: dict, dest: Path, start: float, end: float, options: FetchOptions,
                 abort: Callable[[], str | None] = lambda: None) -> Fetched:
    """Read [start, end] of the resolved ``info``'s stream(s) with ffmpeg into ``dest`` (module doc).

    ``abort()`` returning a reason (a stop was asked for) ends ffmpeg within ``POLL_S``: on a slow
    link a window can take a while, and SIGTERM reaches pcav, not its ffmpeg children.
    """
    exe = media.ffmpeg_exe()
    streams = streams_of(info)
    cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "repeat+level+verbose", "-y"]
    for fmt in streams:
        cmd += _input_args(fmt, options, start, end - start, exe)
    audio_input = len(streams) - 1
    cmd += ["-map", "0:v:0?", "-map", f"{audio_input}:a:0?", *ENCODE_ARGS, str(dest)]
    returncode, stderr = _run_abortable(cmd, abort)
    log = stderr.splitlines()
    fetched = sum(int(m.group(1)) for line in log if (m := _BYTES_READ.search(line)))
    errors = [_LOG_PREFIX.sub("", ln) for ln in log if "[error]" in ln or "[fatal]" in ln]
    source_seconds = _source_duration(log)
    if source_seconds is not None and source_seconds <= start:
        raise ClipError("too_short", f"the video is {source_seconds:.2f} s long; the segment starts at {start:g} s")
    if returncode != 0 or not dest.is_file():
        detail = errors[-1] if errors else f"ffmpeg exited with {returncode}"
        reason = classify_error(detail)
        if reason in ("download_failed", "http_416"):  # reading at an offset failed
            raise ClipError("window_failed", detail, window_only=True)
        raise ClipError(reason, detail)
    duration, short = check_clip(dest, start, end)
    return Fetched(duration, short, fetched, "window")


POLL_S = 0.2


def _run_abortable(cmd: list[str], abort: Callable[[], str | None]) -> tuple[int, str]:
    """Run ``cmd``; (exit status, stderr). Killed, as a ``ClipError('stopped')``, once ``abort()`` says why."""
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: nothing to drain while polling
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            try:
                proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                why = abort()
                if why is not None:
                    proc.kill()
                    proc.wait()
                    raise ClipError("stopped", f"stopped by {why}") from None
        err.seek(0)
        return proc.returncode, err.read().decode(errors="replace")


def _source_duration(log: list[str]) -> float | None:
    for line in log:
        m = _DURATION.search(line)
        if m:
            h, mnt, s = m.groups()
            return int(h) * 3600 + int(mnt) * 60 + float(s)
    return None


def fetch_whole(url: str, work: Path, options: FetchOptions, abort: Callable[[], str | None]) -> tuple[Path, int]:
    """Download all of ``url`` into ``work`` with yt-dlp; returns (the media file, bytes fetched).

    yt-dlp calls its progress hooks at every block it writes: ``abort()`` returning a reason
    (a stop was asked for) aborts the download there, so Ctrl-C does not wait for a whole video.
    """
    import yt_dlp

    def abort_on_stop(_status: dict) -> None:
        why = abort()
        if why is not None:
            raise ClipError("stopped", f"stopped by {why}")

    params = options.ytdlp_params(work)
    params["progress_hooks"] = [abort_on_stop]
    try:
        with yt_dlp.YoutubeDL(params) as ydl:
            info = ydl.extract_info(url, download=True)
    except yt_dlp.utils.DownloadError as exc:
        raise _ytdlp_error(exc) from None
    except ClipError:
        raise
    except Exception as exc:  # noqa: BLE001 - one odd page must not end a run of thousands
        raise ClipError("download_failed", f"{type(exc).__name__}: {exc}") from None
    downloads = (info or {}).get("requested_downloads", [])
    paths = [Path(d["filepath"]) for d in downloads if d.get("filepath")]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        raise ClipError("download_failed", "yt-dlp reported no downloaded file")
    # What yt-dlp kept: the file, or the merge of separate video and audio (within a few kB of their sum).
    return paths[0], sum(p.stat().st_size for p in paths)


def cut(source: Path, dest: Path, start: float, end: float) -> tuple[float, bool]:
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
        "-ss", f"{start:.3f}", "-t", f"{end - start:.3f}", "-i", str(source),
        "-map", "0:v:0?", "-map", "0:a:0?", *ENCODE_ARGS, str(dest),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"ffmpeg exited with {proc.returncode}"]
        raise ClipError("cut_failed", lines[-1])
    return check_clip(dest, start, end)


def check_clip(dest: Path, start: float, end: float) -> tuple[float, bool]:
    """(duration, shorter than asked) of a written clip; a clip of nothing is ``cut_failed``."""
    try:
        clip = media.probe(dest)
    except media.ProbeError as exc:
        raise ClipError("cut_failed", f"ffmpeg wrote an unreadable clip: {exc}") from None
    if not clip.duration or clip.duration < 0.1:
        raise ClipError("cut_failed", f"the cut clip lasts {clip.duration or 0:.2f} s")
    return clip.duration, clip.duration < (end - start) - 0.25
