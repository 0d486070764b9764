"""Media read by content: containers by probe, every folder entry accounted for, damaged middles
caught, durations from packets (never from text the file carries).

Files are made here with the bundled ffmpeg (``scripts/real_media_formats.py`` does the same for
~20 containers from a real recording).
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest

from pcavmae_cli.engine import config, media
from pcavmae_cli.engine.data import decode_check, manifest
from pcavmae_cli.engine.data import preprocess as pp
from tests.cli_helpers import pcav

DATA = config.load_recipe("base").data  # 10-s clips, 10 frames at 1 fps, 16 kHz, min_seconds 1
SECONDS = 3


def encode(path: Path, options: list[str], *, seconds: float = SECONDS, video: bool = True, audio: bool = True,
           size: str = "160x120", metadata: dict[str, str] | None = None) -> Path:  # fmt: skip
    """A clip of ffmpeg's test picture and a 440 Hz tone, written with ``options``."""
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    if video:
        cmd += ["-f", "lavfi", "-i", f"testsrc=size={size}:rate=25:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=44100:duration={seconds}"]
    for key, value in (metadata or {}).items():
        cmd += ["-metadata", f"{key}={value}"]
    subprocess.run([*cmd, *options, str(path)], check=True, capture_output=True)
    return path


# Containers pcav once refused by name although they hold both streams, and the rest's true reasons.
FORMATS = {
    "theora.ogg": (["-c:v", "libtheora", "-c:a", "libvorbis", "-f", "ogg"], "ok"),
    "windows.asf": (["-c:v", "wmv2", "-c:a", "wmav2", "-f", "asf"], "ok"),
    "dvd.vob": (["-c:v", "mpeg2video", "-c:a", "ac3", "-ar", "48000", "-f", "vob"], "ok"),
    "phone.3g2": (["-c:v", "mpeg4", "-c:a", "aac", "-f", "3g2"], "ok"),
    "flash.f4v": (["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "f4v"], "ok"),
    "picture.gif": (["-an", "-f", "gif"], "no_audio_stream"),
    "elementary.m1v": (["-an", "-c:v", "mpeg1video", "-f", "mpeg1video"], "no_audio_stream"),
    "sound.mp4": (["-vn", "-c:a", "aac", "-f", "mp4"], "no_video_stream"),
}


def _outcomes(out: Path) -> dict[str, str]:
    """Input file name -> 'ok' or its failure reason; each input must appear exactly once."""
    found = {}
    for record in manifest.read_manifest(out / pp.MANIFEST):
        found[Path(record.source).name] = "ok"
        assert record.decode_issue is None  # good files are not flagged
    for line in (out / pp.FAILURES).read_text().splitlines():
        failure = json.loads(line)
        name = Path(failure["input"]).name
        assert name not in found, f"{name} listed twice"
        found[name] = failure["reason"]
    return found


def test_a_folder_is_read_by_content_whatever_the_file_names(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    expected = {}
    for name, (options, outcome) in FORMATS.items():
        encode(src / name, options)
        expected[name] = outcome
    (src / "notes.txt").write_text("a text file is not media\n")
    expected["notes.txt"] = "undecodable"
    (src / "subtitles.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhello\n")
    expected["subtitles.srt"] = "no_video_stream"  # media, but neither picture nor sound
    report = pp.preprocess(src, tmp_path / "out", DATA, jobs=2)
    assert _outcomes(tmp_path / "out") == expected
    records = manifest.read_manifest(report.manifest)
    assert {r.id for r in records} == {"theora", "windows", "dvd", "phone", "flash"}
    assert all(r.duration == pytest.approx(SECONDS, abs=0.1) and r.padded for r in records)


def test_every_folder_entry_is_accounted_for(tmp_path):
    elsewhere = encode(tmp_path / "target_name.mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-c:a", "aac"])
    src = tmp_path / "src"
    src.mkdir()
    (src / "linked.mp4").symlink_to(elsewhere)
    (src / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    (src / "x.mp4").mkdir()
    (src / ".hidden.mp4").symlink_to(elsewhere)  # hidden: not an input
    out = src / "out"  # the output inside the input folder: not an input
    out.mkdir()
    (out / "old.mp4").write_text("")
    pp.preprocess(src, out, DATA, jobs=1)
    assert pp.preprocess(src, out, DATA, jobs=1).n_inputs == 3  # a rerun does not list OUT either
    (record,) = manifest.read_manifest(out / pp.MANIFEST)
    assert record.id == "linked" and record.source == str(src.resolve() / "linked.mp4")  # the link's name
    failures = {Path(f["input"]).name: f for f in map(json.loads, (out / pp.FAILURES).read_text().splitlines())}
    reasons = {name: f["reason"] for name, f in failures.items()}
    assert reasons == {"dangling.mp4": "broken_symlink", "x.mp4": "not_a_file"}
    assert str(tmp_path / "gone.mp4") in failures["dangling.mp4"]["detail"]
    assert "folder" in failures["x.mp4"]["detail"]


def test_a_csv_finds_its_videos_under_any_extension(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("clipAAAAAAA_0.asf", "clipBBBBBBB_0.ogg", "clipBBBBBBB_0.mkv", "clipBBBBBBB_0.json"):
        (videos / name).write_bytes(b"x")
    csv = tmp_path / "segments.csv"
    csv.write_text("# Segments csv\n# YTID, start_seconds, end_seconds, positive_labels\n"
                   'clipAAAAAAA, 0.000, 10.000, "/m/a"\nclipBBBBBBB, 0.000, 10.000, "/m/b"\n')  # fmt: skip
    items, _ = pp.list_segments(csv, videos, None)
    assert [(i.id, i.path.name) for i in items] == [
        ("clipAAAAAAA_0", "clipAAAAAAA_0.asf"),
        ("clipBBBBBBB_0", "clipBBBBBBB_0.mkv"),  # a known video extension first
    ]


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    """A 10-s H.264 + AAC MP4 with 40 kB of random bytes over the middle of its media data.

    About 1.7 s of its AAC cannot be decoded: less than a length check of max(1 s, 20 %) notices.
    """
    folder = tmp_path_factory.mktemp("corrupt")
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-threads", "1", "-pix_fmt", "yuv420p"]
    path = encode(folder / "damaged.mp4", [*h264, "-c:a", "aac", "-movflags", "+faststart"], seconds=10, size="320x240")
    data = bytearray(path.read_bytes())
    assert len(data) > 120_000  # the index at the start, the 40 kB well inside the media data
    middle = len(data) // 2
    data[middle : middle + 40_000] = random.Random(0).randbytes(40_000)
    path.write_bytes(bytes(data))
    return folder


def test_a_corrupt_middle_fails_with_the_decode_errors(corrupt, tmp_path):
    report = pp.preprocess(corrupt, tmp_path / "out", DATA, jobs=1)
    (failure,) = [json.loads(line) for line in report.failures_path.read_text().splitlines()]
    assert failure["reason"] == "decode_errors" and failure["id"] == "damaged"
    assert "decode error(s), first:" in failure["detail"]


def test_a_corrupt_middle_is_kept_and_flagged_when_asked(corrupt, tmp_path):
    out = tmp_path / "out"
    result = pcav("preprocess", str(corrupt), str(out), "--on-decode-error", "flag", "--jobs", "1")
    assert result.returncode == 0, result.stderr
    (record,) = manifest.read_manifest(out / pp.MANIFEST)
    assert record.id == "damaged" and "decode error(s)" in record.decode_issue
    again = pp.preprocess(corrupt, out, DATA, jobs=1)  # the default policy: the flagged clip now fails
    assert dict(again.failures) == {"decode_errors": 1} and again.n_ok == 0


def test_decoded_audio_shorter_than_its_packets_is_a_length_mismatch():
    settings = pp.ClipSettings.from_config(DATA)
    info = media.MediaInfo(10.0, True, True, "h264", "aac", 320, 240, 25.0, 0.0, 10.0, 0.0, 10.0)
    assert decode_check.decode_issues(info, 0.0, settings, [], 16000 * 10, 10) is None
    assert decode_check.decode_issues(info, 0.0, settings, [], 16000 * 10 - 800, 10) is None  # 50 ms: encoder padding
    reason, detail = decode_check.decode_issues(info, 0.0, settings, [], int(16000 * 8.8), 10)  # 1.2 s of audio lost
    assert reason == "length_mismatch" and detail == "decoded 8.80 s of audio where its packets hold 10.00 s"
    reason, detail = decode_check.decode_issues(info, 0.0, settings, [], 16000 * 10, 7)
    assert reason == "length_mismatch" and "decoded 7 frames" in detail


def test_durations_and_streams_come_from_packets_not_from_text(tmp_path):
    h264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p", "-c:a", "aac", "-f", "mp4"]
    src = tmp_path / "src"
    src.mkdir()
    encode(src / "tagged.mp4", h264, metadata={"title": "Duration: 00:00:02.00", "comment": "Duration: 01:00:00.00"})
    encode(src / "named Duration: 00:00:02.00.mp4", h264)
    silent = encode(src / "silent.mp4", ["-c:v", "libx264", "-preset", "ultrafast", "-f", "mp4"], audio=False,
                    metadata={"title": "Stream #0:1: Audio: aac, 44100 Hz, mono"})  # fmt: skip
    info = media.probe(src / "tagged.mp4")
    assert info.duration == pytest.approx(SECONDS, abs=0.05)
    assert (info.width, info.height, info.fps, info.video_codec, info.audio_codec) == (160, 120, 25.0, "h264", "aac")
    assert media.probe(silent).has_audio is False
    report = pp.preprocess(src, tmp_path / "out", DATA, jobs=2)
    durations = {r.id: r.duration for r in manifest.read_manifest(report.manifest)}
    assert durations == pytest.approx({"tagged": SECONDS, "named_Duration__00_00_02.00": SECONDS}, abs=0.05)
    assert dict(report.failures) == {"no_audio_stream": 1}



def test_a_seek_into_an_open_gop_video_is_not_a_decode_error(tmp_path):
    # Open GOPs: after a seek the decoder misses references of frames before the window and
    # logs it ("mmco: unref short failure"); those frames are dropped, the clip is whole.
    whole = encode(tmp_path / "whole.mp4", ["-c:v", "libx264", "-preset", "veryfast", "-bf", "3", "-threads", "1",
                                            "-x264-params", "open-gop=1:keyint=50", "-c:a", "aac"], seconds=15)  # fmt: skip
    settings = pp.ClipSettings.from_config(DATA)
    (tmp_path / "raw").mkdir()
    assert any("mmco: unref short failure" in line for line in pp._run_ffmpeg(whole, tmp_path / "raw", 4.1, settings))
    item = pp.ClipInput("whole_4", whole, seek=4.1, seek_end=14.1)
    status, record = pp.process_clip(item, tmp_path / "out", settings)
    assert status == "done" and record.decode_issue is None and record.duration == pytest.approx(10.0, abs=0.05)


def test_decode_error_lines_are_counted_with_their_repeats():
    lines = ["[aac @ 0x1] Reserved bit set.", "Last message repeated 2 times", "[h264 @ 0x2] mmco: unref short failure"]
    assert decode_check.decode_errors(lines, seeking=False) == [lines[0]] * 3 + [lines[2]]
    assert decode_check.decode_errors([*lines, "Last message repeated 4 times"], seeking=True) == [lines[0]] * 3
