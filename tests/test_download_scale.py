"""``pcav download`` at AudioSet scale, against ``engine/bench/media_server.py`` in place of YouTube.

The served video lasts 5 minutes and shows its own frame number: frame k's picture is 12
black-or-white stripes, the bits of k, so the first frame of a clip says exactly where the cut
began. The server logs every byte it sends, answers ranges (or not), 429s on request, and acts
as an HTTP proxy for any host.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pcavmae_cli.engine import media
from pcavmae_cli.engine.bench.media_server import MediaServer, frame_numbers, make_numbered_video
from pcavmae_cli.engine.data import download as dl
from pcavmae_cli.engine.data.download_errors import SetupWatch, is_throttled
from pcavmae_cli.engine.data.pacing import Pacing, RateGate, backoff_delay
from pcavmae_cli.engine.data.throughput import Throughput
from pcavmae_cli.engine.errors import UserError

FPS = 5
LONG_SECONDS = 300
# Fast retries for the tests: the logic of the real defaults, in milliseconds.
FAST = Pacing(base_delay=0.01, max_delay=0.05, cooldown=0.05, max_cooldown=0.2, window=6, trip_after=3)


def _make_long_video(folder: Path) -> None:
    """``long.mp4`` (index first) and ``long_end.mp4`` (index last), 5 min; ``long0..7`` link to the first."""
    make_numbered_video(folder / "long.mp4", LONG_SECONDS, FPS)
    make_numbered_video(folder / "long_end.mp4", LONG_SECONDS, FPS, faststart=False)
    for i in range(8):  # more IDs for the runs of many clips, one file on disk
        os.link(folder / "long.mp4", folder / f"long{i}.mp4")
    for stream, drop in (("video", "-an"), ("audio", "-vn")):  # YouTube's separate formats
        subprocess.run([media.ffmpeg_exe(), "-loglevel", "error", "-i", str(folder / "long.mp4"), "-c", "copy", drop,
                        "-movflags", "+faststart", str(folder / f"long_{stream}.mp4")], check=True)  # fmt: skip


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    _make_long_video(root)
    return root


@pytest.fixture
def server(served):
    with MediaServer(served) as srv:
        yield srv


def _csv(path: Path, rows: list[tuple[str, float]]) -> Path:
    path.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                    + "".join(f'{y}, {s:.3f}, {s + 10:.3f}, "/m/09x0r"\n' for y, s in rows))  # fmt: skip
    return path


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- fetching only the window -----------------------------------------------------------------


def test_a_window_costs_a_small_fraction_of_the_file_and_is_frame_exact(server, served, tmp_path):
    size = (served / "long.mp4").stat().st_size
    csv = _csv(tmp_path / "s.csv", [("long", 150.4)])
    report = dl.download(csv, "audioset", tmp_path / "out", url_template=server.template, pacing=FAST)

    (clip,) = report.downloaded
    served_bytes = server.bytes_for("long.mp4")
    assert served_bytes < 0.12 * size, (served_bytes, size, server.log)  # 10 s of 300 s, plus the index
    assert all(s.status in (200, 206) for s in server.log)
    assert any(s.status == 206 for s in server.log)  # ffmpeg asked for ranges
    video = tmp_path / "out" / "videos" / "long_150.4.mp4"
    assert frame_numbers(video) == [752, 753, 754]  # 150.4 s x 5 fps: the exact frame, not a keyframe
    info = media.probe(video)
    assert info.duration == pytest.approx(10.0, abs=0.05)
    assert info.audio_end - info.audio_start == pytest.approx(10.0, abs=0.05)
    (logged,) = _jsonl(tmp_path / "out" / "downloaded.jsonl")
    assert logged["fetch"] == "window" and "fallback" not in logged
    assert 0 < logged["bytes"] < 0.15 * size

    # The same clip fetched whole: the server sends the whole file at least once.
    before = server.bytes_for("long.mp4")
    csv = _csv(tmp_path / "w.csv", [("long", 150.4)])
    dl.download(csv, "audioset", tmp_path / "whole", url_template=server.template, fetch="whole", pacing=FAST)
    assert server.bytes_for("long.mp4") - before >= size
    assert frame_numbers(tmp_path / "whole" / "videos" / "long_150.4.mp4") == [752, 753, 754]
    (logged,) = _jsonl(tmp_path / "whole" / "downloaded.jsonl")
    assert logged["fetch"] == "whole" and logged["bytes"] >= size


def test_separate_video_and_audio_formats_are_read_as_two_windows(server, tmp_path):
    """YouTube serves picture and sound as two formats: one ffmpeg reads both windows and muxes them."""
    from pcavmae_cli.engine.data import clip_fetch

    info = {"requested_formats": [
        {"url": f"{server.url}/long_video.mp4", "protocol": "http", "http_headers": {"User-Agent": "pcav-test"}},
        {"url": f"{server.url}/long_audio.mp4", "protocol": "http", "http_headers": {"User-Agent": "pcav-test"}},
    ]}  # fmt: skip
    made = clip_fetch.fetch_window(info, tmp_path / "clip.mp4", 42.6, 52.6, clip_fetch.FetchOptions())
    assert made.duration == pytest.approx(10.0, abs=0.05) and made.fetch == "window"
    assert frame_numbers(tmp_path / "clip.mp4") == [213, 214, 215]
    clip = media.probe(tmp_path / "clip.mp4")
    assert clip.has_audio and clip.audio_end - clip.audio_start == pytest.approx(10.0, abs=0.05)
    assert server.requests_for("long_video.mp4")  # 33 kB of tiny pictures: one request reads it all
    audio = server.requests_for("long_audio.mp4")
    assert sum(s.bytes for s in audio) < 0.2 * (server.root / "long_audio.mp4").stat().st_size
    assert {s.range is not None for s in server.log} == {True}  # ranges only


def test_a_stop_ends_a_window_fetch_in_flight(server, tmp_path):
    from pcavmae_cli.engine.data import clip_fetch

    info = {"url": f"{server.url}/long.mp4", "protocol": "http"}
    began = time.monotonic()
    with pytest.raises(clip_fetch.ClipError, match="stopped by Ctrl-C"):  # 250 s to encode: seconds of work
        clip_fetch.fetch_window(info, tmp_path / "c.mp4", 0.0, 250.0, clip_fetch.FetchOptions(), lambda: "Ctrl-C")
    assert time.monotonic() - began < 2.0


def test_a_site_without_ranges_falls_back_to_the_whole_video_per_clip(served, tmp_path):
    """Without ranges, a file whose index is at its end cannot be read at an offset: that clip is
    fetched whole (and says so); one with its index first is still read from the start, as a window."""
    csv = _csv(tmp_path / "s.csv", [("long_end", 20.0), ("long", 20.0)])
    with MediaServer(served, ranges=False) as srv:
        report = dl.download(csv, "audioset", tmp_path / "out", url_template=srv.template, pacing=FAST, jobs=1)
    assert not report.failures
    logged = {d["id"]: d for d in _jsonl(tmp_path / "out" / "downloaded.jsonl")}
    assert logged["long_end_20"]["fetch"] == "whole"
    assert "window fetch failed" in logged["long_end_20"]["fallback"]
    assert logged["long_20"]["fetch"] == "window"
    for cid in ("long_end_20", "long_20"):
        assert frame_numbers(tmp_path / "out" / "videos" / f"{cid}.mp4") == [100, 101, 102]


def test_a_window_past_the_end_is_too_short_and_a_window_over_it_is_short(server, tmp_path):
    csv = _csv(tmp_path / "s.csv", [("long", 301.0), ("long", 295.0)])
    report = dl.download(csv, "audioset", tmp_path / "out", url_template=server.template, pacing=FAST)
    assert report.failed_by_reason() == Counter({"too_short": 1})
    (short,) = report.downloaded
    assert short.short and short.duration == pytest.approx(5.0, abs=0.1)


# --- rate limits --------------------------------------------------------------------------------


def test_429s_are_retried_with_backoff_and_pause_everyone(server, tmp_path):
    """The first 6 requests get 429: every clip still arrives, none is recorded as failed, and
    the breaker paused all workers at least once."""
    server.limit_next(6, retry_after=0)
    csv = _csv(tmp_path / "s.csv", [(f"long{i}", 10.0 * i) for i in range(4)])
    report = dl.download(csv, "audioset", tmp_path / "out", url_template=server.template, jobs=2,
                         pacing=Pacing(**{**FAST.__dict__, "retries": 6}))  # fmt: skip
    assert server.statuses().count(429) == 6
    assert len(report.downloaded) == 4 and not report.failures
    assert report.throttled_attempts == 6 and report.breaker_trips >= 1
    assert (tmp_path / "out" / "failures.jsonl").read_text() == ""


def test_a_lasting_rate_limit_is_never_a_permanent_failure(server, tmp_path):
    server.limit_until = time.monotonic() + 3600
    csv = _csv(tmp_path / "s.csv", [("long0", 0.0), ("long1", 0.0)])
    out = tmp_path / "out"
    notices = []
    report = dl.download(csv, "audioset", out, url_template=server.template, pacing=FAST, on_notice=notices.append)
    assert report.failed_by_reason() == Counter({"rate_limited": 2})
    assert server.statuses().count(429) == 2 * (FAST.retries + 1)  # each clip: a try and its retries
    assert {f["reason"] for f in _jsonl(out / "failures.jsonl")} == {"rate_limited"}

    server.limit_until = 0.0  # the site lets us in again: a plain rerun retries them
    again = dl.download(csv, "audioset", out, url_template=server.template, pacing=FAST)
    assert (again.skipped_failed, len(again.downloaded)) == (0, 2)
    assert _jsonl(out / "failures.jsonl") == []


def test_backoff_is_jittered_capped_and_respects_retry_after():
    pacing = Pacing(base_delay=1.0, max_delay=8.0)
    rng = random.Random(0)
    delays = [[backoff_delay(a, pacing, rng=rng) for _ in range(200)] for a in range(6)]
    for attempt, ds in enumerate(delays):
        cap = min(8.0, 2**attempt)
        assert all(0 <= d <= cap for d in ds) and max(ds) > 0.8 * cap  # full jitter over [0, cap]
    assert backoff_delay(0, pacing, retry_after=5.0, rng=rng) >= 5.0
    assert backoff_delay(0, pacing, retry_after=600.0, rng=rng) == 8.0  # a Retry-After past max_delay is capped


class FakeClock:
    def __init__(self):
        self.t = 0.0
        self.slept = []

    def now(self):
        return self.t

    def sleep(self, seconds, stop=None):
        self.slept.append(seconds)
        self.t += seconds
        return True


def test_the_pace_spaces_attempts_and_the_breaker_pauses_with_growing_cooldowns():
    clock = FakeClock()
    gate = RateGate(Pacing(interval=0.5, window=4, trip_after=2, cooldown=10, max_cooldown=25), clock)
    starts = []
    for _ in range(3):
        gate.before_attempt()
        starts.append(clock.t)
    assert starts == [0.0, 0.5, 1.0]

    gate.after_attempt(True)
    gate.after_attempt(True)  # 2 of the last 4 throttled: everyone pauses 10 s
    assert gate.trips == 1 and gate.paused_for() == 10
    gate.before_attempt()
    assert clock.t == pytest.approx(11.0)
    gate.after_attempt(True)
    gate.after_attempt(True)  # again, without a success between: twice as long
    assert gate.paused_for() == 20
    clock.t += 20
    gate.after_attempt(True)
    gate.after_attempt(True)
    assert gate.paused_for() == 25  # capped at max_cooldown
    clock.t += 25
    gate.after_attempt(False)  # a success resets the cooldown
    gate.after_attempt(True)
    gate.after_attempt(True)
    assert gate.paused_for() == 10 and gate.trips == 4


def test_throttled_reasons():
    assert all(is_throttled(r) for r in ("rate_limited", "http_503", "http_500", "timeout"))
    assert not any(is_throttled(r) for r in ("http_404", "private", "window_failed", "download_failed"))
    assert dl.classify_error("ERROR: [youtube] x: The current session has been rate-limited by YouTube") == "rate_limited"
    assert dl.classify_error("Error opening input files: Server returned 429 Too Many Requests") == "rate_limited"
    assert dl.classify_error("Server returned 5XX Server Error reply") == "http_500"
    assert dl.classify_error("ERROR: [youtube] x: Sign in to confirm you're not a bot") == "sign_in_required"
    assert dl.classify_error("WARNING: n challenge solving failed: no JavaScript runtime") == "js_runtime_missing"


# --- setup: cookies, proxy, the first-failure message -----------------------------------------


def test_cookies_reach_both_the_page_and_the_media_requests(server, tmp_path):
    cookies = tmp_path / "cookies.txt"
    cookies.write_text("# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tSID\tsecret42\n")
    before = cookies.read_text()
    csv = _csv(tmp_path / "s.csv", [("long", 30.0)])
    report = dl.download(csv, "audioset", tmp_path / "out", url_template=server.template, cookies=cookies, pacing=FAST)
    assert len(report.downloaded) == 1
    assert server.log and all(s.cookie and "SID=secret42" in s.cookie for s in server.log), server.log
    assert cookies.read_text() == before  # the user's file is never written
    assert not (tmp_path / "out" / ".tmp").exists()  # nor its private copy kept

    with pytest.raises(UserError, match="--cookies .*nope.txt: no such file"):
        dl.download(csv, "audioset", tmp_path / "o2", url_template=server.template, cookies=tmp_path / "nope.txt")
    with pytest.raises(UserError, match="--cookies-from-browser 'netscape'"):
        dl.download(csv, "audioset", tmp_path / "o2", url_template=server.template, cookies_from_browser="netscape")


def test_every_request_goes_through_the_proxy(server, tmp_path):
    csv = _csv(tmp_path / "s.csv", [("long", 30.0)])
    template = "http://videos.example.invalid/{ytid}.mp4"  # resolvable only by the proxy
    report = dl.download(csv, "audioset", tmp_path / "out", url_template=template, proxy=server.url, pacing=FAST)
    assert len(report.downloaded) == 1 and report.downloaded[0].fetch == "window"
    assert server.log and all(s.proxied for s in server.log)
    with pytest.raises(UserError, match="--proxy 'localhost:3128'"):
        dl.download(csv, "audioset", tmp_path / "o2", url_template=template, proxy="localhost:3128")


def test_the_first_failures_alike_name_the_fix_once():
    watch = SetupWatch(first=3)
    assert watch.message("sign_in_required") is None and watch.message("sign_in_required") is None
    message = watch.message("sign_in_required")
    assert "--cookies-from-browser" in message and "--cookies" in message
    assert watch.message("sign_in_required") is None  # once
    mixed = SetupWatch(first=2)
    assert mixed.message("private") is None and mixed.message("sign_in_required") is None
    works = SetupWatch(first=2)
    assert works.message(None) is None and works.message("no_network") is None and works.message("no_network") is None
    js = SetupWatch(first=1).message("js_runtime_missing")
    assert "pcavmae-cli[download]" in js


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pcavmae_cli", "download", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}, **kw,
    )


def test_cli_says_once_what_is_missing_when_every_clip_fails_alike(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    csv = _csv(tmp_path / "s.csv", [(f"clip{i}", 0.0) for i in range(6)])
    result = _cli("audioset", "--csv", str(csv), "--out", str(tmp_path / "out"), "--jobs", "2",
                  "--url-template", f"http://127.0.0.1:{port}/{{ytid}}.mp4")  # fmt: skip
    assert result.returncode == 1
    assert result.stdout.count("warning: the first 5 clips all failed with connection_refused") == 1, result.stdout
    assert "--proxy" in result.stdout


# --- throughput -----------------------------------------------------------------------------------


def test_the_progress_note_has_clips_per_minute_bytes_per_clip_and_the_failure_mix():
    t = [0.0]
    tp = Throughput(clock=lambda: t[0])
    for _ in range(3):
        tp.add_clip(2_000_000, "window")
    tp.add_failure("unavailable")
    tp.add_failure("unavailable")
    tp.add_failure("rate_limited")
    t[0] = 30.0
    assert tp.note() == "6.0 clips/min · 2.0 MB/clip · failed 3: unavailable 2, rate_limited 1"


def test_cli_progress_and_summary_show_the_rate(server, tmp_path):
    csv = _csv(tmp_path / "s.csv", [("long0", 0.0), ("long1", 10.0)])
    result = _cli("audioset", "--csv", str(csv), "--out", str(tmp_path / "out"), "--url-template", server.template,
                  "--max-rate", "600", "--sleep", "0.01")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "clips/min" in result.stdout and "fetched per clip" in result.stdout and "window 2" in result.stdout
    # Not a terminal (a log file): plain progress lines with the rate, the first and the last.
    lines = [ln for ln in result.stdout.splitlines() if ln.startswith("download audioset: ")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"] and "clips/min · " in lines[-1] and "B/clip" in lines[-1]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--max-rate", "0"], "--max-rate must be more than 0"),
        (["--sleep", "-1"], "--sleep must be 0 or more seconds"),
        (["--fetch", "all"], "--fetch 'all': expected window or whole"),
        (["--keep-videos"], "--keep-videos applies with --preprocess"),
        (["--proxy", "ftp://x:1"], "--proxy 'ftp://x:1'"),
        (["--cookies", "/nonexistent/c.txt"], "--cookies /nonexistent/c.txt: no such file"),
        (["--cookies-from-browser", "lynx"], "--cookies-from-browser 'lynx': the browser must be one of"),
        (["--preprocess", "DATA", "--recipe", "no_such_recipe"], "no_such_recipe"),
    ],
)
def test_cli_mistakes_are_one_line(tmp_path, args, message):
    csv = _csv(tmp_path / "s.csv", [("long", 0.0)])
    args = [str(tmp_path / a) if a == "DATA" else a for a in args]
    result = _cli("audioset", "--csv", str(csv), "--out", str(tmp_path / "out"), *args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "DATA").exists()


def test_cli_preprocess_with_a_recipe(server, tmp_path):
    csv = _csv(tmp_path / "s.csv", [("long", 60.0)])
    data = tmp_path / "data"
    result = _cli("audioset", "--csv", str(csv), "--out", str(tmp_path / "out"), "--url-template", server.template,
                  "--preprocess", str(data), "--recipe", "base", "--keep-videos")  # fmt: skip
    assert result.returncode == 0, result.stderr
    (line,) = (data / "manifest.jsonl").read_text().splitlines()
    assert json.loads(line)["id"] == "long_60" and (tmp_path / "out" / "videos" / "long_60.mp4").is_file()
    assert f"manifest:   {data / 'manifest.jsonl'}" in result.stdout


# --- a killed run, resumed --------------------------------------------------------------------------


def test_a_killed_download_resumes_without_losing_or_repeating_a_clip(server, tmp_path):
    ids = [f"long{i}" for i in range(8)]
    csv = _csv(tmp_path / "s.csv", [(y, 5.0 * i) for i, y in enumerate(ids)])
    out = tmp_path / "out"
    args = ["audioset", "--csv", str(csv), "--out", str(out), "--url-template", server.template, "--jobs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "pcavmae_cli", "download", *args, "--max-rate", "150"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    log = out / "downloaded.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to tidy up
    proc.wait()
    done_before = {d["id"] for d in _jsonl(log)}
    assert 3 <= len(done_before) < len(ids), "the run must be killed midway"
    fetched_before = {y: len(server.requests_for(f"{y}.mp4")) for y in ids}

    result = _cli(*args)
    assert result.returncode == 0, result.stderr
    logged = [d["id"] for d in _jsonl(log)]
    expected = sorted(f"{y}_{5 * i:g}" for i, y in enumerate(ids))
    assert sorted(logged) == expected  # every clip, each once
    assert sorted(p.stem for p in (out / "videos").iterdir()) == expected
    for cid in done_before:  # what the killed run finished was not fetched again
        ytid = cid.rsplit("_", 1)[0]
        assert len(server.requests_for(f"{ytid}.mp4")) == fetched_before[ytid]
    assert not (out / ".tmp").exists()


# --- straight into training data ----------------------------------------------------------------------


def test_preprocess_makes_training_clips_and_keeps_no_video(server, tmp_path):
    from pcavmae_cli.engine.data.manifest import read_manifest
    from pcavmae_cli.engine.data.preprocess import ClipSettings

    settings = ClipSettings(clip_seconds=10, fps=1, n_frames=10, short_side=16, jpeg_quality=5,
                            sample_rate=16000, min_seconds=1)  # fmt: skip
    data = tmp_path / "data"
    csv = _csv(tmp_path / "s.csv", [("long0", 0.0), ("long1", 100.0), ("long2", 200.0)])
    prep = dl.Preprocessing(data, settings)
    report = dl.download(csv, "audioset", tmp_path / "out", url_template=server.template, pacing=FAST,
                         preprocess_to=prep, jobs=2)  # fmt: skip
    assert len(report.downloaded) == 3 and report.manifest == data / "manifest.jsonl"
    records = read_manifest(data / "manifest.jsonl")
    assert [r.id for r in records] == ["long0_0", "long1_100", "long2_200"]  # the CSV's order
    assert all(r.n_frames == 10 and (data / r.audio).is_file() for r in records)
    assert list((tmp_path / "out" / "videos").iterdir()) == []  # the cut videos are gone
    assert all("video" not in d and d["preprocessed"] for d in _jsonl(tmp_path / "out" / "downloaded.jsonl"))

    # A killed run leaves finished clips without their manifest lines: the rerun fetches nothing
    # again and writes each clip once.
    (data / "manifest.jsonl").write_text("")
    n_requests = len(server.log)
    again = dl.download(csv, "audioset", tmp_path / "out", url_template=server.template, pacing=FAST,
                        preprocess_to=prep)  # fmt: skip
    assert again.already_done == 3 and len(server.log) == n_requests
    assert [r.id for r in read_manifest(data / "manifest.jsonl")] == ["long0_0", "long1_100", "long2_200"]
    assert len(_jsonl(tmp_path / "out" / "downloaded.jsonl")) == 3


# --- what today's YouTube needs -----------------------------------------------------------------------


def test_the_download_extra_gives_yt_dlp_a_javascript_runtime():
    import importlib

    import yt_dlp

    importlib.import_module("yt_dlp_ejs")  # the challenge solver of yt-dlp[default]

    from pcavmae_cli.engine.data import site_access

    runtimes = site_access.js_runtimes()
    assert "deno" in runtimes
    with yt_dlp.YoutubeDL({"quiet": True, "js_runtimes": runtimes}) as ydl:
        deno = ydl._js_runtimes["deno"].info
    assert deno is not None and deno.supported


def test_a_youtube_run_without_a_javascript_runtime_says_so_before_it_starts(tmp_path, monkeypatch):
    from pcavmae_cli.engine.data import site_access

    monkeypatch.setattr(site_access, "js_runtimes", lambda: {})
    notices = []
    dl.download_segments([], tmp_path / "out", on_notice=notices.append)
    assert notices == [site_access.NO_JS_RUNTIME] and "pcavmae-cli[download]" in notices[0]
    notices.clear()
    dl.download_segments([], tmp_path / "out2", url_template="http://127.0.0.1:9/{ytid}.mp4", on_notice=notices.append)
    assert notices == []  # another site: no JavaScript needed
