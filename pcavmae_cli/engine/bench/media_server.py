"""A local stand-in for a video site: serves files with HTTP ranges and logs every byte it sends.

``pcav download`` is judged on what it asks of the site: how many bytes a 10 s window of a
long video costs, what it does when the site answers 429. YouTube cannot be asked that in a
test, so the download tests and ``benchmarks/download_throughput.py`` point the downloader at
this server instead. It answers

* ``GET``/``HEAD /{name}`` with the file ``root/{name}``, honouring ``Range: bytes=a-b`` with
  ``206 Partial Content`` (or ignoring it with ``ranges=False``, as a site that cannot serve
  ranges would);
* a request whose target is an absolute URL (``GET http://any.host/x.mp4``) as an HTTP proxy
  would, serving the path from ``root`` and marking the request ``proxied``;
* ``429 Too Many Requests`` (with ``Retry-After`` when set) to the next ``n`` requests after
  ``limit_next(n)``, or to every request until ``limit_until`` passes.

Each answered request is one ``Served`` line in ``log``: the bytes it wrote to the socket (a
client that hangs up early stops the count at what was written).

``make_numbered_video`` writes what it serves in the tests and the benchmark: a long video whose
every frame shows its own number, so that a clip's first frame tells where the cut began.
"""

from __future__ import annotations

import http.server
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

NUMBER_BITS = 12  # frame numbers up to 4095: 13 min at 5 fps
BIT_WIDTH = 16  # pixels per bit stripe
CHUNK = 16 * 1024
SEND_BUFFER = 32 * 1024
_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


@dataclass
class Served:
    """One answered request."""

    name: str  # the file asked for
    status: int
    bytes: int  # body bytes written to the socket
    range: str | None = None  # the request's Range header
    proxied: bool = False
    cookie: str | None = None  # the request's Cookie header


class MediaServer:
    """A threading HTTP server on ``127.0.0.1`` (a free port) serving ``root``; see the module doc.

    Use as a context manager, or call ``close``. ``template`` is a ``--url-template`` for it.
    """

    def __init__(self, root: str | Path, *, ranges: bool = True):
        self.root = Path(root)
        self.ranges = ranges
        self.log: list[Served] = []
        self.retry_after: float | None = None
        self.limit_until = 0.0  # time.monotonic() until which every request gets a 429
        self._limit_next = 0
        self._lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), _handler(self))
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.template = f"{self.url}/{{ytid}}.mp4"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def limit_next(self, n: int, retry_after: float | None = None) -> None:
        """Answer the next ``n`` requests with 429 (``Retry-After: retry_after`` when given)."""
        with self._lock:
            self._limit_next = n
            self.retry_after = retry_after

    def bytes_for(self, name: str) -> int:
        """Body bytes sent for file ``name`` over all requests."""
        return sum(s.bytes for s in self.log if s.name == name)

    def requests_for(self, name: str) -> list[Served]:
        return [s for s in self.log if s.name == name]

    def statuses(self) -> list[int]:
        return [s.status for s in self.log]

    def _take_limit(self) -> bool:
        with self._lock:
            if self._limit_next > 0:
                self._limit_next -= 1
                return True
        return time.monotonic() < self.limit_until

    def _record(self, served: Served) -> None:
        with self._lock:
            self.log.append(served)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> MediaServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def get_request(self):
        # A small send buffer keeps "bytes written" close to "bytes the client took": with the
        # default (megabytes on loopback) a client that reads 512 bytes and hangs up would be
        # charged for the whole file.
        sock, addr = super().get_request()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        return sock, addr

    def handle_error(self, request, client_address):
        pass  # a client hanging up mid-body (ffmpeg once it has its window) is normal here


def _handler(server: MediaServer) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self._answer(body=False)

        def do_GET(self):
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            proxied = self.path.startswith(("http://", "https://"))
            name = unquote(urlsplit(self.path).path).lstrip("/")
            if server._take_limit():
                self._empty(429, name, proxied, server.retry_after)
                return
            path = server.root / name
            if "/" in name or name.startswith(".") or not path.is_file():
                self._empty(404, name, proxied)
                return
            size = path.stat().st_size
            start, end = 0, size - 1
            status = 200
            asked = self.headers.get("Range")
            if asked and server.ranges:
                m = _RANGE.match(asked.strip())
                if not m or (not m.group(1) and not m.group(2)):
                    self._empty(416, name, proxied)
                    return
                if m.group(1):
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                else:  # bytes=-N: the last N bytes
                    start = max(0, size - int(m.group(2)))
                if start >= size or start > end:
                    self._empty(416, name, proxied, content_range=f"bytes */{size}")
                    return
                status = 206
            self.send_response(status)
            self.send_header("Content-Type", "video/mp4")
            self.send_header("Content-Length", str(end - start + 1))
            if server.ranges:
                self.send_header("Accept-Ranges", "bytes")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            sent = 0
            try:
                if body:
                    with path.open("rb") as fh:
                        fh.seek(start)
                        left = end - start + 1
                        while left > 0:
                            block = fh.read(min(CHUNK, left))
                            if not block:
                                break
                            self.wfile.write(block)
                            sent += len(block)
                            left -= len(block)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                server._record(Served(name, status, sent, asked, proxied, self.headers.get("Cookie")))

        def _empty(self, status: int, name: str, proxied: bool, retry_after: float | None = None,
                   content_range: str | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            if retry_after is not None:
                self.send_header("Retry-After", f"{retry_after:g}")
            if content_range:
                self.send_header("Content-Range", content_range)
            self.end_headers()
            server._record(Served(name, status, 0, self.headers.get("Range"), proxied, self.headers.get("Cookie")))

    return Handler


def make_numbered_video(path: str | Path, seconds: float = 300, fps: int = 5, faststart: bool = True) -> Path:
    """An H.264 + AAC mp4 of ``seconds`` whose frame k shows k as 12 black-or-white stripes (bit i
    is the stripe at x = 16 i .. 16 i + 15), with a 440 Hz stereo tone at 128 kb/s, YouTube's
    audio rate. The tone is encoded for 10 s once and repeated, so 5 minutes build in a second.
    ``faststart``: the index (moov) first, as YouTube serves it; else last.
    """
    from pcavmae_cli.engine import media

    path = Path(path)
    quiet = [media.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    tone = path.with_name(path.stem + ".tone.m4a")
    subprocess.run([*quiet, "-f", "lavfi", "-i", "sine=f=440:r=44100", "-t", "10", "-c:a", "aac", "-b:a", "128k",
                    "-ac", "2", str(tone)], check=True)  # fmt: skip
    width = NUMBER_BITS * BIT_WIDTH
    bits = f"nullsrc=s={width}x16:r={fps},geq=lum='255*mod(floor(N/pow(2,floor(X/{BIT_WIDTH}))),2)':cb=128:cr=128"
    try:
        subprocess.run([*quiet, "-f", "lavfi", "-i", bits, "-stream_loop", "-1", "-i", str(tone), "-t", f"{seconds:g}",
                        "-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast", "-g", str(10 * fps),
                        "-pix_fmt", "yuv420p", "-c:a", "copy", *(["-movflags", "+faststart"] if faststart else []),
                        str(path)], check=True)  # fmt: skip
    finally:
        tone.unlink(missing_ok=True)
    return path


def frame_numbers(path: str | Path, n: int = 3) -> list[int]:
    """The numbers shown by the first ``n`` frames of a video made by ``make_numbered_video`` (or cut from one)."""
    import numpy as np

    from pcavmae_cli.engine import media

    raw = subprocess.run(
        [media.ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-frames:v", str(n), "-f", "rawvideo",
         "-pix_fmt", "gray", "-"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    frames = np.frombuffer(raw, np.uint8).reshape(-1, 16, NUMBER_BITS * BIT_WIDTH)
    return [sum(1 << i for i in range(NUMBER_BITS) if f[:, BIT_WIDTH * i:BIT_WIDTH * (i + 1)].mean() > 128)
            for f in frames]
