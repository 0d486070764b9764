"""Preprocessing: every input ends in the manifest or in failures, with the right reason."""

from __future__ import annotations

import json
import shutil
import wave
from pathlib import Path

import ffmpeg
import numpy as np
import pytest
from PIL import Image

from pcavmae_cli.engine import config, media
from pcavmae_cli.engine.data import manifest
from pcavmae_cli.engine.data import preprocess as pp
from pcavmae_cli.engine.errors import UserError
from tests.cli_helpers import pcav
from tests.conftest import make_mp4

DATA = config.load_recipe("base").data  # 10 s clips, 10 frames at 1 fps, 16 kHz, shorter side 224
EXPECTED = {
    "demo0000_0.mp4": "ok",
    "demo0001_0.mp4": "ok",
    "stereo.mp4": "ok",
    "short4.mov": "ok",  # 4 s: kept, padded
    "short4.mp4": "duplicate_id",  # same id as short4.mov, listed after it
    "no_audio.mp4": "no_audio_stream",
    "no_video.mp4": "no_video_stream",
    "half.mp4": "truncated",  # first half of the bytes of a good faststart MP4
    "no_moov.mp4": "truncated",  # moov at the end, cut off
    "empty.mp4": "empty_file",
    "text.mp4": "undecodable",
    "tiny.mp4": "too_short",  # 0.5 s < min_seconds
    "notes.txt": "undecodable",  # probed, whatever the name says
    "subfolder": "not_a_file",  # not read, but listed
}


def _read_wav(path: Path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as fh:
        data = np.frombuffer(fh.readframes(fh.getnframes()), dtype="<i2").astype(np.float64) / 32768
        return data, fh.getframerate(), fh.getnchannels()


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2)))


@pytest.fixture(scope="module")
def mixed(demo_corpus, tmp_path_factory):
    """A folder of good and broken inputs, preprocessed once: (src, out, report)."""
    src = tmp_path_factory.mktemp("mixed")
    good = sorted(demo_corpus.videos.glob("*.mp4"))[:2]
    for f in good:
        shutil.copy(f, src / f.name)
    make_mp4(src / "stereo.mp4", 10, stereo=True)
    make_mp4(src / "short4.mov", 4)
    shutil.copy(src / "short4.mov", src / "short4.mp4")
    make_mp4(src / "no_audio.mp4", 10, with_audio=False)
    make_mp4(src / "no_video.mp4", 10, with_video=False)
    whole = good[0].read_bytes()
    (src / "half.mp4").write_bytes(whole[: len(whole) // 2])
    slow = make_mp4(src / "no_moov_full.mp4", 10, faststart=False)
    (src / "no_moov.mp4").write_bytes(slow.read_bytes()[: slow.stat().st_size // 2])
    slow.unlink()
    (src / "empty.mp4").write_bytes(b"")
    (src / "text.mp4").write_text("this is not a video\n")
    make_mp4(src / "tiny.mp4", 0.5)
    (src / "notes.txt").write_text("notes\n")
    (src / ".hidden.mp4").write_bytes(whole)  # hidden: not an input
    (src / "subfolder").mkdir()  # folders are not read: a failure
    out = tmp_path_factory.mktemp("mixed_out")
    calls = []
    report = pp.preprocess(src, out, DATA, jobs=2, progress=lambda n=1, note="": calls.append(n))
    assert sum(calls) == len(EXPECTED)
    return src, out, report


def _outcomes(out: Path) -> dict[str, str]:
    """Input file name -> 'ok' or the failure reason, from the files written."""
    found = {}
    for record in manifest.read_manifest(out / "manifest.jsonl"):
        found[Path(record.source).name] = "ok"
    for line in (out / "failures.jsonl").read_text().splitlines():
        failure = json.loads(line)
        name = Path(failure["input"]).name
        assert name not in found, f"{name} listed twice"
        found[name] = failure["reason"]
    return found


def test_every_input_is_accounted_for_with_its_reason(mixed):
    src, out, report = mixed
    assert _outcomes(out) == EXPECTED
    assert report.n_inputs == len(EXPECTED) and report.n_ok == 4 and report.n_done == 4
    assert report.n_padded == 1
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert all(f["detail"] for f in failures)
    by_name = {Path(f["input"]).name: f for f in failures}
    assert "partial file" in by_name["half.mp4"]["detail"]  # the index is there, the data stops
    assert by_name["tiny.mp4"]["detail"].endswith("less than min_seconds=1")
    assert "moov" in by_name["no_moov.mp4"]["detail"]
    assert by_name["short4.mp4"]["id"] == "short4"
    assert not list((out / "clips").glob(".tmp-*"))
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["demo0000_0", "demo0001_0", "short4", "stereo"]


def test_a_short_clip_is_padded_to_a_full_clip(mixed):
    _, out, _ = mixed
    record = {r.id: r for r in manifest.read_manifest(out / "manifest.jsonl")}["short4"]
    assert record.padded is True
    assert record.duration == pytest.approx(4.0, abs=0.1)
    assert record.n_frames == 10
    frames = [record.frame_path(out, k) for k in range(10)]
    assert all(f.is_file() for f in frames) and not record.frame_path(out, 10).exists()
    assert frames[9].read_bytes() == frames[4].read_bytes() != frames[0].read_bytes()  # last real frame repeated
    audio, rate, channels = _read_wav(record.audio_path(out))
    assert (rate, channels, audio.size) == (16000, 1, 160000)
    assert _rms(audio[: 3 * 16000]) > 0.2  # the tone
    assert np.all(audio[5 * 16000 :] == 0)  # silence after the source ends


def test_full_clips_have_jpeg_frames_with_shorter_side_224_and_exact_audio(mixed):
    _, out, _ = mixed
    records = {r.id: r for r in manifest.read_manifest(out / "manifest.jsonl")}
    assert records["demo0000_0"].padded is False and records["demo0000_0"].duration == pytest.approx(10.0, abs=0.05)
    for record in records.values():
        assert record.labels == [] and Path(record.source).is_absolute()
        assert record.video == f"clips/{record.id}" and record.audio == f"clips/{record.id}/audio.wav"
        assert (out / record.video / "clip.json").is_file()
        audio, rate, channels = _read_wav(record.audio_path(out))
        assert (rate, channels, audio.size) == (16000, 1, 160000)
        with Image.open(record.frame_path(out, 0)) as image:
            assert image.format == "JPEG"
            width, height = image.size
        assert min(width, height) == 224
        if record.id in ("stereo", "short4"):  # testsrc is 320x240: the aspect ratio is kept
            assert (width, height) in {(298, 224), (299, 224)}
        else:
            assert (width, height) == (224, 224)


def test_stereo_is_downmixed_as_the_channel_average(mixed):
    _, out, _ = mixed
    audio, _, _ = _read_wav(out / "clips/stereo/audio.wav")
    left_rms = 0.5 / np.sqrt(2)  # left: 0.5 sin, right: silence
    assert _rms(audio[16000:-16000]) / left_rms == pytest.approx(0.5, abs=0.05)  # not the first channel only


def test_rerun_skips_finished_clips_and_writes_the_same_manifest(mixed):
    src, out, _ = mixed
    before_manifest = (out / "manifest.jsonl").read_text()
    before_failures = (out / "failures.jsonl").read_text()
    files = sorted((out / "clips").rglob("*"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = pp.preprocess(src, out, DATA, jobs=2)
    assert (again.n_done, again.n_skipped) == (0, 4)
    assert again.failures == {reason: n for reason, n in _count(EXPECTED).items() if reason != "ok"}
    assert (out / "manifest.jsonl").read_text() == before_manifest
    assert (out / "failures.jsonl").read_text() == before_failures
    assert sorted((out / "clips").rglob("*")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps


def _count(expected: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    return counts


def test_changed_settings_or_a_fixed_source_are_redone(demo_corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(sorted(demo_corpus.videos.glob("*.mp4"))[0], src / "a.mp4")
    (src / "b.mp4").write_bytes(b"")
    out = tmp_path / "out"
    first = pp.preprocess(src, out, DATA, jobs=1)
    assert (first.n_done, dict(first.failures)) == (1, {"empty_file": 1})
    fewer = config.load_recipe("base", ["data.video.n_frames=3"]).data
    redone = pp.preprocess(src, out, fewer, jobs=1)
    assert (redone.n_done, redone.n_skipped) == (1, 0)
    assert sorted(p.name for p in (out / "clips/a").glob("*.jpg")) == ["frame_0.jpg", "frame_1.jpg", "frame_2.jpg"]
    shutil.copy(src / "a.mp4", src / "b.mp4")  # the user replaces the broken file: retried
    fixed = pp.preprocess(src, out, fewer, jobs=1)
    assert (fixed.n_done, fixed.n_skipped, fixed.n_failed) == (1, 1, 0)
    assert [r.id for r in manifest.read_manifest(out / "manifest.jsonl")] == ["a", "b"]


AUDIOSET_HEADER = "# Segments csv\n# num_ytids=3\n# YTID, start_seconds, end_seconds, positive_labels\n"


def test_audioset_csv_takes_labels_and_reports_missing_videos(demo_corpus, tmp_path):
    # The corpus's own CSV: videos found in the default <csv folder>/videos.
    report = pp.preprocess(demo_corpus.segment_csvs["eval"], tmp_path / "eval", DATA, jobs=2)
    records = manifest.read_manifest(report.manifest)
    assert [(r.id, r.labels) for r in records] == [
        ("demo0002_0", ["/pcav/demo/tone_circle"]),
        ("demo0003_0", ["/pcav/demo/harmonic_square"]),
    ]
    assert report.label_csv is None

    csv = tmp_path / "segments.csv"
    csv.write_text(
        AUDIOSET_HEADER
        + 'demo0000, 0.000, 10.000, "/m/a,/m/b"\n'
        + 'gone0000000, 30.000, 40.000, "/m/a"\n'
        + 'demo0000, 0.000, 10.000, "/m/a"\n'
    )
    report = pp.preprocess(csv, tmp_path / "listed", DATA, videos=demo_corpus.videos, jobs=2)
    (record,) = manifest.read_manifest(report.manifest)
    assert (record.id, record.labels) == ("demo0000_0", ["/m/a", "/m/b"])
    failures = [json.loads(line) for line in report.failures_path.read_text().splitlines()]
    assert [(f["id"], f["reason"]) for f in failures] == [
        ("gone0000000_30", "missing_video"),
        ("demo0000_0", "duplicate_id"),
    ]
    assert "gone0000000_30.* or gone0000000.*" in failures[0]["detail"]


def test_vggsound_csv_split_label_csv_and_whole_video_seek(demo_corpus, tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for f in sorted(demo_corpus.videos.glob("*.mp4"))[:2]:
        shutil.copy(f, videos / f.name)
    # A whole 15 s video named by its YouTube id, whose loudness grows with time: 0.06 * t.
    make_mp4(videos / "wholeVideo1.mp4", 15, tone="0.06*t*sin(2*PI*440*t)")
    csv = tmp_path / "vggsound.csv"
    csv.write_text(
        "demo0000,0,tone circle,train\n"
        "demo0001,0,harmonic square,test\n"
        "wholeVideo1,3,rising tone,train\n"
        "missing0000,0,tone circle,train\n"
    )
    report = pp.preprocess(csv, tmp_path / "train", DATA, split="train", jobs=2)
    records = {r.id: r for r in manifest.read_manifest(report.manifest)}
    assert sorted(records) == ["demo0000_0", "wholeVideo1_3"]
    assert records["demo0000_0"].labels == ["tone circle"]
    whole = records["wholeVideo1_3"]
    assert whole.duration == pytest.approx(10.0, abs=0.05) and not whole.padded
    audio, _, _ = _read_wav(whole.audio_path(tmp_path / "train"))
    start_rms = _rms(audio[:1600]) * np.sqrt(2) / 0.06  # ~ the time of the first 0.1 s
    assert start_rms == pytest.approx(3.05, abs=0.3)  # cut from 3 s, not from 0 s
    assert report.failures == {"missing_video": 1}
    labels = manifest.read_label_csv(report.label_csv)
    assert labels.mids == labels.names == ["harmonic square", "rising tone", "tone circle"]  # whole CSV, sorted

    with pytest.raises(UserError, match="no rows of split 'val'"):
        pp.preprocess(csv, tmp_path / "val", DATA, split="val")
    with pytest.raises(UserError, match="VGGSound CSVs only"):
        pp.preprocess(demo_corpus.segment_csvs["train"], tmp_path / "x", DATA, split="train")


def _write_wav(path: Path, seconds: float, rate: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(rate)
        fh.writeframes(b"\0\0" * int(seconds * rate))


def test_cavmae_json_import_points_at_the_existing_files(tmp_path):
    root = tmp_path / "cavmae"
    frames = root / "frames"
    for vid, n in (("vid{a}", 10), ("short", 3), ("noframes", 0)):
        for k in range(n):
            (frames / f"frame_{k}").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 8), (k * 20, 0, 0)).save(frames / f"frame_{k}" / f"{vid}.jpg")
    _write_wav(root / "audio" / "vid{a}.wav", 10.0)
    _write_wav(root / "audio" / "short.wav", 2.5, rate=8000)
    _write_wav(root / "audio" / "noframes.wav", 10.0)
    (root / "audio" / "bad.wav").write_text("not a wav")
    data = {
        "data": [
            {"video_id": "vid{a}", "wav": str(root / "audio/vid{a}.wav"), "video_path": str(frames),
             "labels": "/m/a,/m/b"},
            {"video_id": "short", "wav": "audio/short.wav", "video_path": "frames", "labels": "/m/c"},  # relative
            {"video_id": "nowav", "wav": str(root / "audio/nowav.wav"), "video_path": str(frames), "labels": "/m/a"},
            {"video_id": "noframes", "wav": str(root / "audio/noframes.wav"), "video_path": str(frames), "labels": ""},
            {"video_id": "badwav", "wav": str(root / "audio/bad.wav"), "video_path": str(frames), "labels": "/m/a"},
            {"video_id": "nopath", "wav": str(root / "audio/short.wav"), "labels": "/m/a"},
            "not an object",
            {"video_id": "short", "wav": "audio/short.wav", "video_path": "frames", "labels": "/m/c"},
        ]
    }
    src = root / "train.json"
    src.write_text(json.dumps(data))
    report = pp.preprocess(src, tmp_path / "out", DATA)
    records = manifest.read_manifest(tmp_path / "out/manifest.jsonl")
    assert [(r.id, r.n_frames, r.labels, r.duration) for r in records] == [
        ("vid{a}", 10, ["/m/a", "/m/b"], 10.0),
        ("short", 3, ["/m/c"], 2.5),
    ]
    for r in records:
        assert Path(r.video) == frames and Path(r.audio).is_file() and Path(r.audio).is_absolute()
        assert all(r.frame_path(tmp_path / "out", k).is_file() for k in range(r.n_frames))
    assert records[0].frame_pattern == "frame_{k}/vid{{a}}.jpg"
    assert records[0].frame_path(tmp_path, 4) == frames / "frame_4" / "vid{a}.jpg"
    failures = [json.loads(line) for line in report.failures_path.read_text().splitlines()]
    assert [f["reason"] for f in failures] == [
        "missing_audio", "no_frames", "undecodable", "malformed_entry", "malformed_entry", "duplicate_id"
    ]
    assert (report.n_inputs, report.n_ok, report.n_failed) == (8, 2, 6)
    assert not (tmp_path / "out/clips").exists()  # nothing copied


@pytest.mark.parametrize(
    "make_src, message",
    [
        (lambda tmp: tmp / "nope", "input not found: {tmp}/nope"),
        (lambda tmp: (tmp / "x.csv").write_text("a,b\n") and tmp / "x.csv", "{tmp}/x.csv: not an AudioSet or VGGSound"),
        (lambda tmp: (tmp / "x.json").write_text("[1]") and tmp / "x.json", "{tmp}/x.json: expected a CAV-MAE"),
        (lambda tmp: (tmp / "x.yaml").write_text("a") and tmp / "x.yaml", "{tmp}/x.yaml: expected a folder of videos"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "no input files in {tmp}/empty"),
    ],
)
def test_user_mistakes_name_the_path(tmp_path, make_src, message):
    src = make_src(tmp_path)
    with pytest.raises(UserError) as info:
        pp.preprocess(src, tmp_path / "out", DATA)
    assert str(info.value).startswith(message.format(tmp=tmp_path))


def test_output_that_is_a_file_is_a_user_error(demo_corpus, tmp_path):
    blocker = tmp_path / "out"
    blocker.write_text("x")
    with pytest.raises(UserError, match=f"output {blocker} exists and is not a folder"):
        pp.preprocess(demo_corpus.videos, blocker, DATA)


def test_cli_preprocesses_a_csv_and_reports_bad_input(demo_corpus, tmp_path):
    out = tmp_path / "out"
    train_csv = str(demo_corpus.segment_csvs["train"])
    result = pcav("preprocess", train_csv, str(out), "--jobs", "2", "data.video.n_frames=4")
    assert result.returncode == 0, result.stderr
    assert "processed now" in result.stdout and str(out / "manifest.jsonl") in result.stdout
    records = manifest.read_manifest(out / "manifest.jsonl")
    assert [r.n_frames for r in records] == [4, 4]
    assert len(list((out / "clips/demo0000_0").glob("*.jpg"))) == 4

    missing = pcav("preprocess", str(tmp_path / "nope"), str(out))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"error: input not found: {tmp_path / 'nope'}"]

    all_bad = tmp_path / "bad"
    all_bad.mkdir()
    (all_bad / "x.mp4").write_bytes(b"")
    failed = pcav("preprocess", str(all_bad), str(tmp_path / "bad_out"))
    assert failed.returncode == 1
    assert "empty_file" in failed.stdout
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: no clip of {all_bad} could be preprocessed")


def test_zero_duration_and_ffmpeg_errors_become_failures(tmp_path, monkeypatch):
    video = tmp_path / "v.mp4"
    video.write_bytes(b"\0" * 100)
    settings = pp.ClipSettings.from_config(DATA)
    item = pp.ClipInput("v", video)
    info = media.MediaInfo(0.0, True, True, "h264", "aac", 320, 240, 25.0)
    monkeypatch.setattr(media, "probe", lambda path: info)
    status, failure = pp.process_clip(item, tmp_path / "out", settings)
    assert (status, failure.reason) == ("failed", "zero_duration")

    monkeypatch.setattr(media, "probe", lambda path: media.MediaInfo(10.0, True, True, "h264", "aac", 320, 240, 25.0))

    def broken(*args, **kwargs):
        raise ffmpeg.Error("ffmpeg", b"", b"Input #0 ...\n[h264 @ 0x1] decode_slice_header error\nConversion failed!\n")

    monkeypatch.setattr(pp, "_run_ffmpeg", broken)
    status, failure = pp.process_clip(item, tmp_path / "out", settings)
    assert (status, failure.reason, failure.detail) == ("failed", "ffmpeg_failed", "Conversion failed!")
    assert not list((tmp_path / "out" / "clips").iterdir())  # the temporary folder is gone
