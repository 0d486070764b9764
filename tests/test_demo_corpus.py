"""The demo corpus: real H.264 + AAC files, deterministic, class-dependent sound and picture."""

from __future__ import annotations

import hashlib
import subprocess

import numpy as np
import pytest

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import demo_corpus as demo
from pcavmae_cli.engine.data import manifest, segments
from pcavmae_cli.engine.errors import UserError
from tests.cli_helpers import pcav


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _decode(path) -> tuple[bytes, bytes]:
    """Decoded RGB frames and 16-bit PCM samples of a video file."""
    def run(*args: str) -> bytes:
        cmd = [media.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", str(path), *args, "pipe:1"]
        return subprocess.run(cmd, check=True, capture_output=True).stdout

    return run("-map", "0:v", "-f", "rawvideo", "-pix_fmt", "rgb24"), run("-map", "0:a", "-f", "s16le")


def _videos(report: demo.DemoCorpusReport) -> list:
    return sorted(report.videos.glob("*.mp4"))


def test_files_are_h264_aac_clips_of_the_asked_length(demo_corpus):
    files = _videos(demo_corpus)
    assert [f.name for f in files] == [f"demo{i:04d}_0.mp4" for i in range(4)]
    for f in files:
        info = media.probe(f)
        assert (info.video_codec, info.audio_codec) == ("h264", "aac")
        assert (info.width, info.height, info.fps) == (demo.WIDTH, demo.HEIGHT, demo.FPS)
        assert info.duration == pytest.approx(10.0, abs=0.1)
        assert f.read_bytes()[4:8] == b"ftyp" and f.read_bytes().find(b"moov") < f.read_bytes().find(b"mdat")


def test_csvs_use_audioset_formats_and_parse(demo_corpus):
    labels = manifest.read_label_csv(demo_corpus.label_csv)
    assert labels.names == ["tone circle", "harmonic square"]
    assert labels.mids == ["/pcav/demo/tone_circle", "/pcav/demo/harmonic_square"]

    train_text = demo_corpus.segment_csvs["train"].read_text().splitlines()
    assert train_text[0].startswith("# Segments csv created")
    assert train_text[1] == "# num_ytids=2, num_segs=2, num_unique_labels=2, num_positive_labels=2"
    assert train_text[2] == "# YTID, start_seconds, end_seconds, positive_labels"
    assert train_text[3] == 'demo0000, 0.000, 10.000, "/pcav/demo/tone_circle"'

    train = segments.read_segments(demo_corpus.segment_csvs["train"])
    held_out = segments.read_segments(demo_corpus.segment_csvs["eval"])
    assert segments.detect_corpus(demo_corpus.segment_csvs["eval"]) == "audioset"
    assert [(s.clip_id, s.labels) for s in train] == [
        ("demo0000_0", ("/pcav/demo/tone_circle",)),
        ("demo0001_0", ("/pcav/demo/harmonic_square",)),
    ]
    assert [s.clip_id for s in held_out] == ["demo0002_0", "demo0003_0"]
    assert all((s.start, s.end) == (0.0, 10.0) for s in train + held_out)
    assert {f"{s.clip_id}.mp4" for s in train + held_out} == {f.name for f in _videos(demo_corpus)}


def test_same_seed_same_files_and_decoded_content(demo_corpus, tmp_path):
    again = demo.make_demo_corpus(tmp_path / "again", classes=2, clips_per_class=2, eval_per_class=1, seed=0)
    for a, b in zip(_videos(demo_corpus), _videos(again), strict=True):
        assert _decode(a) == _decode(b)
        assert _sha(a) == _sha(b)  # bit-exact flags: even the bytes match
    other = demo.make_demo_corpus(tmp_path / "other", classes=1, clips_per_class=1, eval_per_class=0, seed=1)
    first_other, first = _videos(other)[0], _videos(demo_corpus)[0]
    assert first_other.name == first.name
    frames, audio = _decode(first_other)
    frames0, audio0 = _decode(first)
    assert frames != frames0 and audio != audio0


def test_rendering_is_a_pure_function_of_seed_and_clip():
    clip = demo.demo_clips(demo.demo_classes(3), 2, 0)[4]
    a, b = demo.render_clip(clip, 7, 2.0), demo.render_clip(clip, 7, 2.0)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    c = demo.render_clip(clip, 8, 2.0)
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.audio, c.audio)
    assert a.frames.shape == (2 * demo.FPS, demo.HEIGHT, demo.WIDTH, 3) and a.frames.dtype == np.uint8
    assert a.audio.shape == (2 * demo.SAMPLE_RATE,) and np.abs(a.audio).max() <= 1.0


def _audio_feature(audio: np.ndarray) -> np.ndarray:
    """Normalised log-spaced band energies of the whole clip."""
    spec = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(audio.size, 1 / demo.SAMPLE_RATE)
    edges = np.geomspace(100, 12000, 41)
    bands = np.array([spec[(freqs >= lo) & (freqs < hi)].sum() for lo, hi in zip(edges[:-1], edges[1:])])
    bands = np.log(bands + 1e-6)
    return (bands - bands.mean()) / bands.std()


def _object_pixels(frames: np.ndarray) -> np.ndarray:
    """Mask of coloured (object) pixels: the background is grey."""
    f = frames.astype(np.int16)
    return (f.max(-1) - f.min(-1)) > 50


def _image_feature(frames: np.ndarray) -> np.ndarray:
    """Mean colour (chromaticity) of the object pixels."""
    pixels = frames[_object_pixels(frames)].astype(np.float64)
    return pixels.mean(0) / pixels.mean(0).sum()


def _nearest_neighbour_accuracy(features: np.ndarray, labels: list[int]) -> float:
    dist = np.linalg.norm(features[:, None] - features[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    return float(np.mean([labels[j] == labels[i] for i, j in enumerate(dist.argmin(1))]))


def test_classes_differ_in_sound_and_picture_and_the_object_pulses_with_the_sound():
    clips = demo.demo_clips(demo.demo_classes(6), 3, 0)  # 3 clips of each of 6 classes
    rendered = [demo.render_clip(c, 0, 3.0) for c in clips]
    labels = [c.cls.index for c in clips]
    audio = np.stack([_audio_feature(r.audio) for r in rendered])
    image = np.stack([_image_feature(r.frames) for r in rendered])
    assert _nearest_neighbour_accuracy(audio, labels) == 1.0
    assert _nearest_neighbour_accuracy(image, labels) == 1.0
    # Between classes the sounds are far apart, within a class close (per-clip jitter only).
    same = [np.linalg.norm(audio[i] - audio[j]) for i in range(18) for j in range(i) if labels[i] == labels[j]]
    diff = [np.linalg.norm(audio[i] - audio[j]) for i in range(18) for j in range(i) if labels[i] != labels[j]]
    assert max(same) < min(diff)
    for r in rendered:
        area = _object_pixels(r.frames).reshape(len(r.frames), -1).sum(1)
        assert np.corrcoef(area, r.envelope)[0, 1] > 0.9


def test_more_than_six_classes_have_unique_names_and_render():
    classes = demo.demo_classes(40)
    assert len({c.name for c in classes}) == 40 and len({c.mid for c in classes}) == 40
    assert classes[0].name == "tone circle" and classes[6].name == "tone square"
    assert classes[36].name == "tone circle 2" and classes[36].f0 != classes[0].f0
    assert all(" " not in c.mid for c in classes)
    clip = demo.demo_clips(classes, 1, 0)[39]
    assert demo.render_clip(clip, 0, 1.0).frames.shape[0] == demo.FPS


def test_rerun_keeps_finished_files_and_a_new_seed_replaces_them(tmp_path):
    calls = []
    kw = dict(classes=1, clips_per_class=2, eval_per_class=1, seconds=2.0)
    first = demo.make_demo_corpus(tmp_path, seed=0, progress=lambda n=1, note="": calls.append(n), **kw)
    assert (first.n_written, first.n_skipped, sum(calls)) == (2, 0, 2)
    files = _videos(first)
    stamps = [f.stat().st_mtime_ns for f in files]
    hashes = [_sha(f) for f in files]
    (first.videos / ".demo0000.abc.tmp.mp4").write_bytes(b"half")  # an interrupted run's leftover
    again = demo.make_demo_corpus(tmp_path, seed=0, **kw)
    assert (again.n_written, again.n_skipped) == (0, 2)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert not list(first.videos.glob(".*"))
    reseeded = demo.make_demo_corpus(tmp_path, seed=1, **kw)
    assert (reseeded.n_written, reseeded.n_skipped) == (2, 0)
    assert [_sha(f) for f in _videos(reseeded)] != hashes


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(classes=0), "--classes >= 1"),
        (dict(clips_per_class=2, eval_per_class=2), "--eval-per-class < --clips-per-class"),
        (dict(seconds=0.5), "--seconds must be between 1 and 600"),
    ],
)
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message):
        demo.make_demo_corpus(tmp_path / "out", **kwargs)


def test_cli_writes_a_corpus_and_reports_bad_output(tmp_path):
    out = tmp_path / "corpus"
    result = pcav("demo-data", str(out), "--classes", "2", "--clips-per-class", "1", "--eval-per-class", "0",
                  "--seconds", "2", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "2 clips written" in result.stdout
    assert [f.name for f in sorted((out / "videos").iterdir())] == ["demo0000_0.mp4", "demo0001_0.mp4"]
    assert len(segments.read_segments(out / "train_segments.csv")) == 2
    assert not (out / "eval_segments.csv").exists()

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad = pcav("demo-data", str(blocker))
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines() == [f"error: output {blocker} exists and is not a folder"]
