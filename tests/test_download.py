"""``pcav download`` against a local HTTP server that serves real MP4s in place of YouTube.

yt-dlp's generic extractor treats ``http://127.0.0.1:PORT/{ytid}.mp4`` as a direct video
link, so the whole path runs for real: yt-dlp fetch, ffmpeg cut, logs, resume, failures.
The served video is 15 s of testsrc with a 440 Hz tone whose amplitude grows with time
(0.06 * t), so the loudness at the start of a cut tells where the cut began.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import download as dl
from pcavmae_cli.engine.errors import UserError

SOURCE_SECONDS = 15
SERVED = ["clipAAAAAAA", "clipBBBBBBB", "clipCCCCCCC", "clipVVVVVVV"]
AUDIOSET_HEADER = (
    "# Segments csv created Sun Mar  5 10:54:31 2017\n"
    "# num_ytids=2, num_segs=2, num_unique_labels=3, num_positive_labels=3\n"
    "# YTID, start_seconds, end_seconds, positive_labels\n"
)


def _make_mp4(path: Path) -> None:
    subprocess.run(
        [
            media.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
            "-f", "lavfi", "-i", "testsrc=size=160x120:rate=5",
            "-f", "lavfi", "-i", "aevalsrc=0.06*t*sin(2*PI*440*t):s=16000",
            "-t", str(SOURCE_SECONDS), "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
            "-c:a", "aac", "-shortest", str(path),
        ],
        check=True,
    )


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1:0 that counts GET requests per video ID."""

    def __init__(self, root: Path):
        self.requests: Counter[str] = Counter()
        lock = threading.Lock()
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                with lock:
                    requests[self.path.lstrip("/").removesuffix(".mp4")] += 1
                super().do_GET()

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # yt-dlp closes its first probe request early: a broken pipe is normal

        self.httpd = Server(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.template = f"http://127.0.0.1:{self.httpd.server_address[1]}/{{ytid}}.mp4"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def count(self, ytid: str) -> int:
        return self.requests[ytid]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    _make_mp4(root / f"{SERVED[0]}.mp4")
    for name in SERVED[1:]:
        os.link(root / f"{SERVED[0]}.mp4", root / f"{name}.mp4")
    srv = _Server(root)
    yield srv
    srv.httpd.shutdown()


def _audioset_csv(path: Path, rows: list[str]) -> Path:
    path.write_text(AUDIOSET_HEADER + "".join(r + "\n" for r in rows))
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _rms_at_start(path: Path) -> float:
    """RMS of the clip's audio between 0.1 s and 0.5 s."""
    raw = subprocess.run(
        [media.ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-f", "f32le", "-ac", "1", "-ar", "16000", "-"],
        capture_output=True, check=True,
    ).stdout
    x = np.frombuffer(raw, dtype=np.float32)[1600:8000]
    return float(np.sqrt(np.mean(x**2)))


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_audioset_csv_cuts_each_window(server, tmp_path):
    csv = _audioset_csv(tmp_path / "segments.csv", [
        'clipAAAAAAA, 4.000, 9.000, "/m/09x0r,/t/dd00088"',
        'clipBBBBBBB, 0.000, 10.000, "/m/04rlf"',
    ])
    out = tmp_path / "out"
    calls = []
    report = dl.download(csv, "audioset", out, url_template=server.template, jobs=2,
                         progress=lambda n=1, note="": calls.append(n))

    assert sorted(p.name for p in (out / "videos").iterdir()) == ["clipAAAAAAA_4.mp4", "clipBBBBBBB_0.mp4"]
    for name, seconds in [("clipAAAAAAA_4.mp4", 5.0), ("clipBBBBBBB_0.mp4", 10.0)]:
        info = media.probe(out / "videos" / name)
        assert info.duration == pytest.approx(seconds, abs=0.15), name
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    # Amplitude is 0.06 * t: a cut from 4 s starts loud (~0.18 RMS), one from 0 s near silent.
    assert 0.13 < _rms_at_start(out / "videos" / "clipAAAAAAA_4.mp4") < 0.23
    assert _rms_at_start(out / "videos" / "clipBBBBBBB_0.mp4") < 0.04

    assert len(report.downloaded) == 2 and not report.failures and sum(calls) == 2
    logged = {d["id"]: d for d in _jsonl(out / "downloaded.jsonl")}
    assert logged["clipAAAAAAA_4"]["labels"] == ["/m/09x0r", "/t/dd00088"]
    assert logged["clipBBBBBBB_0"]["video"] == "videos/clipBBBBBBB_0.mp4"
    assert (out / "failures.jsonl").read_text() == ""
    assert not (out / ".tmp").exists()


def test_failures_are_recorded_and_the_run_goes_on(server, tmp_path):
    csv = _audioset_csv(tmp_path / "segments.csv", [
        'clipAAAAAAA, 2.000, 12.000, "/m/09x0r"',
        'missingXXXX, 0.000, 10.000, "/m/09x0r"',
        'clipCCCCCCC, 10.000, 20.000, "/m/09x0r"',  # the source ends at 15 s: keep 5 s
        'clipBBBBBBB, 20.000, 30.000, "/m/09x0r"',  # starts after the end: nothing to keep
    ])
    out = tmp_path / "out"
    settled, logged_by_then = [], []

    def progress(n=1, note=""):  # a killed run keeps what the logs hold at each step
        settled.append(n)
        logs = (out / "failures.jsonl").read_text() + (out / "downloaded.jsonl").read_text()
        logged_by_then.append(len(logs.splitlines()))

    report = dl.download(csv, "audioset", out, url_template=server.template, jobs=2, progress=progress)

    assert logged_by_then == [1, 2, 3, 4] and sum(settled) == 4
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["clipAAAAAAA_2.mp4", "clipCCCCCCC_10.mp4"]
    failures = {f["id"]: f for f in _jsonl(out / "failures.jsonl")}
    assert set(failures) == {"missingXXXX_0", "clipBBBBBBB_20"}
    assert failures["missingXXXX_0"]["reason"] == "http_404"
    assert "404" in failures["missingXXXX_0"]["detail"]
    assert failures["missingXXXX_0"]["input"] == server.template.format(ytid="missingXXXX")
    assert failures["clipBBBBBBB_20"]["reason"] == "too_short"
    assert report.failed_by_reason() == Counter({"http_404": 1, "too_short": 1})

    (short,) = report.short
    assert short.id == "clipCCCCCCC_10" and short.duration == pytest.approx(5.0, abs=0.15)
    assert media.probe(out / "videos" / "clipCCCCCCC_10.mp4").duration == pytest.approx(5.0, abs=0.15)
    assert {d["id"]: d.get("short", False) for d in _jsonl(out / "downloaded.jsonl")} == {
        "clipAAAAAAA_2": False, "clipCCCCCCC_10": True,
    }
    assert not (out / ".tmp").exists()


def test_rerun_skips_done_clips_and_known_failures(server, tmp_path):
    csv = _audioset_csv(tmp_path / "segments.csv", [
        'clipAAAAAAA, 1.000, 6.000, "/m/09x0r"',
        'missingYYYY, 0.000, 10.000, "/m/09x0r"',
    ])
    out = tmp_path / "out"
    dl.download(csv, "audioset", out, url_template=server.template)
    clip = out / "videos" / "clipAAAAAAA_1.mp4"
    mtime, fetched, missed = clip.stat().st_mtime_ns, server.count("clipAAAAAAA"), server.count("missingYYYY")
    assert fetched > 0 and missed > 0

    # What a killed run leaves: a torn log line and a half-made clip in a work folder.
    with (out / "failures.jsonl").open("a") as fh:
        fh.write('{"input": "x", "reas')
    (out / ".tmp" / "clipBBBBBBB_0-x").mkdir(parents=True)
    (out / ".tmp" / "clipBBBBBBB_0-x" / "cut.mp4").write_bytes(b"\0" * 100)
    csv = _audioset_csv(tmp_path / "segments.csv", [
        'clipAAAAAAA, 1.000, 6.000, "/m/09x0r"',
        'missingYYYY, 0.000, 10.000, "/m/09x0r"',
        'clipBBBBBBB, 0.000, 5.000, "/m/09x0r"',
    ])
    again = dl.download(csv, "audioset", out, url_template=server.template)

    assert (again.already_done, again.skipped_failed, len(again.downloaded)) == (1, 1, 1)
    assert server.count("clipAAAAAAA") == fetched and server.count("missingYYYY") == missed
    assert clip.stat().st_mtime_ns == mtime
    assert media.probe(out / "videos" / "clipBBBBBBB_0.mp4").duration == pytest.approx(5.0, abs=0.15)
    assert [f["id"] for f in _jsonl(out / "failures.jsonl")] == ["missingYYYY_0"]  # compacted
    assert sorted(d["id"] for d in _jsonl(out / "downloaded.jsonl")) == ["clipAAAAAAA_1", "clipBBBBBBB_0"]
    assert not (out / ".tmp").exists()

    retried = dl.download(csv, "audioset", out, url_template=server.template, retry_failed=True)
    assert server.count("missingYYYY") > missed
    assert retried.failed_by_reason() == Counter({"http_404": 1}) and retried.already_done == 2


def test_unsafe_ids_are_rejected_and_nothing_leaves_out(server, tmp_path):
    box = tmp_path / "box"
    out = box / "out"
    csv = _audioset_csv(tmp_path / "segments.csv", [
        '../evil, 0.000, 10.000, "/m/09x0r"',
        'a/b, 0.000, 10.000, "/m/09x0r"',
        '.., 0.000, 10.000, "/m/09x0r"',
    ])
    before = set(_all_files(tmp_path))
    report = dl.download(csv, "audioset", out, url_template=server.template)

    assert report.failed_by_reason() == Counter({"invalid_id": 3})
    assert {f["input"] for f in _jsonl(out / "failures.jsonl")} == {"../evil", "a/b", ".."}
    assert not any("evil" in key or key.startswith("a") or key == ".." for key in server.requests)
    new = set(_all_files(tmp_path)) - before
    assert new and all(p.is_relative_to(out) for p in new)
    assert list(box.iterdir()) == [out]
    assert not any("evil" in p.name for p in tmp_path.rglob("*"))
    assert list((out / "videos").iterdir()) == []


def test_vggsound_csv(server, tmp_path):
    csv = tmp_path / "vggsound.csv"
    csv.write_text("clipVVVVVVV,3,dog barking,train\n")
    out = tmp_path / "out"
    report = dl.download(csv, "vggsound", out, url_template=server.template)

    assert [d.id for d in report.downloaded] == ["clipVVVVVVV_3"]
    info = media.probe(out / "videos" / "clipVVVVVVV_3.mp4")
    assert info.duration == pytest.approx(10.0, abs=0.15)
    (logged,) = _jsonl(out / "downloaded.jsonl")
    assert (logged["labels"], logged["split"], logged["end"]) == (["dog barking"], "train", 13.0)

    with pytest.raises(UserError, match="is in vggsound format, not audioset"):
        dl.download(csv, "audioset", out, url_template=server.template)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"url_template": "http://127.0.0.1/video.mp4"}, "lacks '{ytid}'"),
        ({"url_template": "http://127.0.0.1/{ytid}/{quality}.mp4"}, "only '{ytid}'"),
        ({"jobs": 0}, "--jobs must be at least 1"),
    ],
)
def test_user_mistakes_are_one_user_error(tmp_path, kwargs, message):
    csv = tmp_path / "vggsound.csv"
    csv.write_text("clipVVVVVVV,3,dog barking,train\n")
    with pytest.raises(UserError, match=message):
        dl.download(csv, "vggsound", tmp_path / "out", **kwargs)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        dl.download(csv, "vggsound", tmp_path / "file")
    assert not (tmp_path / "out").exists()


def test_classify_error():
    assert dl.classify_error("ERROR: [youtube] x: Private video. Sign in if you've been granted access") == "private"
    removed = "ERROR: [youtube] x: Video unavailable. This video has been removed by the uploader"
    assert dl.classify_error(removed) == "unavailable"
    assert dl.classify_error("ERROR: [youtube] x: Sign in to confirm your age.") == "age_restricted"
    assert dl.classify_error("ERROR: unable to download video data: HTTP Error 403: Forbidden") == "http_403"
    assert dl.classify_error("ERROR: whatever", status=429) == "rate_limited"
    assert dl.classify_error("ERROR: [Errno 111] Connection refused") == "connection_refused"
    assert dl.classify_error("ERROR: whatever") == "download_failed"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pcavmae_cli", "download", *args],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )


def test_cli_partial_failure_exits_0_with_a_summary(server, tmp_path):
    csv = _audioset_csv(tmp_path / "segments.csv", [
        'clipAAAAAAA, 5.000, 10.000, "/m/09x0r"',
        'missingZZZZ, 0.000, 10.000, "/m/09x0r"',
    ])
    out = tmp_path / "out"
    result = _cli("audioset", "--csv", str(csv), "--out", str(out), "--url-template", server.template, "--jobs", "2")

    assert result.returncode == 0, result.stderr
    assert (out / "videos" / "clipAAAAAAA_5.mp4").is_file()
    lines = result.stdout.splitlines()
    assert any("downloaded" in ln and ln.rstrip(" │").endswith("1") for ln in lines), result.stdout
    assert any("failed: http_404" in ln for ln in lines), result.stdout
    assert "warning: 1 clip failed" in result.stdout
    assert str(out / "failures.jsonl") in result.stdout
    assert "Traceback" not in result.stderr


def test_cli_user_errors_are_one_line(server, tmp_path):
    missing = _cli("audioset", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "out"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"error: segments CSV not found: {tmp_path / 'nope.csv'}"]
    assert not (tmp_path / "out").exists()

    csv = _audioset_csv(tmp_path / "segments.csv", ['missingWWWW, 0.000, 10.000, "/m/09x0r"'])
    nothing = _cli("audioset", "--csv", str(csv), "--out", str(tmp_path / "out"), "--url-template", server.template)
    assert nothing.returncode == 1
    (line,) = nothing.stderr.strip().splitlines()
    assert line.startswith("error: no clip of") and "http_404" in line


def test_engine_imports_without_typer_or_rich():
    code = (
        "import sys; sys.modules['typer'] = None; sys.modules['rich'] = None; "
        "import pcavmae_cli.engine.data.download"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
