"""The built-in demo corpus: small, deterministic, labelled audio-visual MP4 clips.

Each class pairs a sound with a picture, so a model has something real to learn and the two
modalities agree. Class ``k`` has a sound type (``SOUNDS[k % 6]``) at its own pitch, and an
object of its own shape or texture and colour that moves across a noisy background. Every clip
varies the pitch (+-3 %), phases, noise level, position, speed and size, and the object pulses
in step with the sound's envelope. Classes 6..35 pair each sound with the other shapes at a
different pitch; beyond 36 classes the pairs repeat with new pitches and colours.

Frames and the waveform are made with numpy from a random generator seeded by
``(seed, clip index)``, then encoded by one ffmpeg call per clip (raw RGB frames on stdin, a
WAV as second input; H.264 + AAC, ``+faststart``, bit-exact flags), so the same seed gives the
same files. Layout written under OUT::

    videos/{clip_id}.mp4            clip_id = demo0003_0 (segments.Segment.clip_id)
    class_labels_indices.csv        AudioSet index,mid,display_name
    train_segments.csv              AudioSet segment format
    eval_segments.csv
    demo_corpus.json                the settings the videos were made with
"""

from __future__ import annotations

import json
import math
import os
import uuid
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import ffmpeg
import numpy as np

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import manifest
from pcavmae_cli.engine.data.segments import Segment
from pcavmae_cli.engine.errors import UserError

WIDTH = HEIGHT = 224
FPS = 5  # a low frame rate keeps encoding quick; preprocessing samples 1 fps anyway
SAMPLE_RATE = 44100  # like most real uploads, so preprocessing really resamples
SHAPES = ("circle", "square", "triangle", "horizontal stripes", "vertical stripes", "checker")
SOUNDS = ("tone", "harmonic", "chirp", "tremolo", "noise", "click")
# Base frequency (Hz) of each sound type; noise: centre of its band, click: its resonance.
BASE_HZ = {"tone": 440.0, "harmonic": 220.0, "chirp": 300.0, "tremolo": 660.0, "noise": 3000.0, "click": 1500.0}
SETTINGS_FILE = "demo_corpus.json"
LABEL_CSV = "class_labels_indices.csv"
SEGMENT_CSVS = {"train": "train_segments.csv", "eval": "eval_segments.csv"}
CORPUS_VERSION = 1  # bump when the rendering changes, so old corpora are regenerated

Progress = Callable[..., None]


@dataclass(frozen=True)
class DemoClass:
    index: int
    name: str  # human readable, e.g. "tone circle"
    mid: str  # e.g. /pcav/demo/tone_circle
    sound: str
    shape: str
    f0: float  # Hz, before the per-clip jitter
    colour: tuple[int, int, int]


@dataclass(frozen=True)
class DemoClip:
    index: int  # global clip number: seeds the clip's random generator
    ytid: str
    split: str  # "train" or "eval"
    cls: DemoClass

    @property
    def clip_id(self) -> str:
        return Segment(self.ytid, 0.0, 0.0).clip_id  # every demo clip starts at 0 s


@dataclass
class RenderedClip:
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB, T = seconds * FPS
    audio: np.ndarray  # (N,) float32 in [-1, 1], N = seconds * SAMPLE_RATE
    envelope: np.ndarray  # (T,) the sound's envelope at the frame times, drives the pulsing


@dataclass
class DemoCorpusReport:
    out: Path
    videos: Path
    label_csv: Path
    segment_csvs: dict[str, Path]
    n_classes: int
    n_written: int
    n_skipped: int  # already there from an earlier run with the same settings


def demo_classes(n: int) -> list[DemoClass]:
    """The first ``n`` demo classes; their names and mids are unique."""
    out = []
    for k in range(n):
        sound = SOUNDS[k % 6]
        shape = SHAPES[(k % 6 + k // 6) % 6]  # 36 distinct (sound, shape) pairs, then repeats
        name = f"{sound} {shape}" + (f" {k // 36 + 1}" if k >= 36 else "")
        f0 = BASE_HZ[sound] * 2.0 ** (0.25 * ((k // 6) % 8))  # quarter-octave steps per round
        hue = (k * 0.618034) % 1.0
        colour = _hsv_to_rgb(hue, 0.85, 1.0 if k < 36 else 0.75)
        out.append(DemoClass(k, name, "/pcav/demo/" + name.replace(" ", "_"), sound, shape, f0, colour))
    return out


def demo_clips(classes: list[DemoClass], clips_per_class: int, eval_per_class: int) -> list[DemoClip]:
    """``clips_per_class`` clips per class, the last ``eval_per_class`` of them for evaluation.

    Train clips come first, then eval clips; within a split the classes take turns.
    """
    clips = []
    for split, per_class in (("train", clips_per_class - eval_per_class), ("eval", eval_per_class)):
        for j in range(per_class):
            for cls in classes:
                i = len(clips)
                clips.append(DemoClip(i, f"demo{i:04d}", split, cls))
    return clips


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


# --- sound ---------------------------------------------------------------------------------


def _smooth_gate(t: np.ndarray, starts: np.ndarray, length: float, ramp: float = 0.02) -> np.ndarray:
    """1 inside [start, start + length) of any start, 0 elsewhere, with linear ramps."""
    env = np.zeros_like(t)
    for s in starts:
        rise = np.clip((t - s) / ramp, 0.0, 1.0)
        fall = np.clip((s + length - t) / ramp, 0.0, 1.0)
        env = np.maximum(env, np.minimum(rise, fall))
    return env


def _envelope(sound: str, t: np.ndarray, p: dict[str, float], bursts: np.ndarray) -> np.ndarray:
    """The sound's loudness at times ``t`` (s), in [0, 1]; the same function drives the picture."""
    if sound == "tone":  # slow swell
        return 0.65 + 0.35 * np.sin(2 * np.pi * p["rate"] * 0.25 * t + p["phase"])
    if sound == "harmonic":  # notes on for 60 % of each period
        period = 1.0 / (p["rate"] * 0.5)
        starts = np.arange(-1, t.max() / period + 1) * period + p["offset"] * period
        return _smooth_gate(t, starts, 0.6 * period, ramp=0.05)
    if sound == "chirp":  # each sweep fades in and out
        phase = (t * p["rate"] * 0.5 + p["offset"]) % 1.0
        return np.sin(np.pi * phase) ** 0.5
    if sound == "tremolo":  # deep amplitude modulation at ~2 Hz
        return 0.5 + 0.5 * np.sin(2 * np.pi * p["rate"] * t + p["phase"])
    if sound == "noise":  # random bursts
        return _smooth_gate(t, bursts, p["burst"], ramp=0.01)
    if sound == "click":  # decays after each click (slower than the click itself, to be visible)
        period = 1.0 / (p["rate"] * 1.5)
        since = (t - p["offset"] * period) % period
        return np.exp(-since / 0.12)
    raise ValueError(f"unknown sound {sound!r}")


def _signal(sound: str, t: np.ndarray, f0: float, p: dict[str, float], rng: np.random.Generator) -> np.ndarray:
    """The raw (unit-amplitude) waveform of a sound type at times ``t``."""
    if sound == "tone":
        return np.sin(2 * np.pi * f0 * t + p["phase"])
    if sound == "harmonic":
        return sum(np.sin(2 * np.pi * n * f0 * t + n * p["phase"]) / n for n in range(1, 6)) / 2.3
    if sound == "chirp":  # exponential sweep f0 -> 4 f0, restarting every sweep period
        period = 1.0 / (p["rate"] * 0.5)
        u = ((t / period + p["offset"]) % 1.0) * period
        k = math.log(4.0) / period
        return np.sin(2 * np.pi * f0 * (np.exp(k * u) - 1.0) / k + p["phase"])
    if sound == "tremolo":
        return np.sin(2 * np.pi * f0 * t + p["phase"])
    if sound == "noise":  # band-pass noise around f0 (an octave wide)
        spec = np.fft.rfft(rng.standard_normal(t.size))
        freqs = np.fft.rfftfreq(t.size, 1.0 / SAMPLE_RATE)
        spec[(freqs < f0 / math.sqrt(2)) | (freqs > f0 * math.sqrt(2))] = 0.0
        x = np.fft.irfft(spec, n=t.size)
        return x / (np.abs(x).max() + 1e-9)
    if sound == "click":  # a short ringing at f0 after each click
        period = 1.0 / (p["rate"] * 1.5)
        since = (t - p["offset"] * period) % period
        return np.sin(2 * np.pi * f0 * since) * np.exp(-since / 0.015)
    raise ValueError(f"unknown sound {sound!r}")


# --- picture -------------------------------------------------------------------------------


def _bounce(p0: float, v: float, t: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Position of a point moving at speed ``v`` from ``p0`` and bouncing between lo and hi."""
    span = hi - lo
    x = (p0 - lo + v * t) % (2 * span)
    return lo + np.where(x > span, 2 * span - x, x)


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, phase: float) -> np.ndarray:
    """Pixels covered by the object; ``dx, dy`` are offsets from its centre, ``r`` its radius."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    if shape == "triangle":
        v = (dy + r) / (1.8 * r)  # 0 at the apex, 1 at the base
        return (v >= 0) & (v <= 1) & (np.abs(dx) <= v * r)
    patch = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "horizontal stripes":
        return patch & (np.sin(2 * np.pi * dy / 12.0 + phase) > 0)
    if shape == "vertical stripes":
        return patch & (np.sin(2 * np.pi * dx / 12.0 + phase) > 0)
    if shape == "checker":
        return patch & ((np.floor((dx + 1000) / 10.0) + np.floor((dy + 1000) / 10.0)) % 2 == 0)
    raise ValueError(f"unknown shape {shape!r}")


def render_clip(clip: DemoClip, seed: int, seconds: float) -> RenderedClip:
    """Frames and waveform of one clip; a pure function of (clip, seed, seconds)."""
    rng = np.random.default_rng([seed, clip.index])
    cls = clip.cls
    p = {
        "phase": rng.uniform(0, 2 * np.pi),
        "rate": rng.uniform(1.8, 2.2),  # Hz; each sound scales it to its own tempo
        "offset": rng.uniform(0, 1),
        "burst": rng.uniform(0.15, 0.3),
    }
    f0 = cls.f0 * (1.0 + rng.uniform(-0.03, 0.03))
    noise_level = rng.uniform(0.005, 0.03)
    bursts = np.sort(rng.uniform(-0.3, seconds, size=max(1, int(round(1.5 * seconds)))))

    t_audio = np.arange(int(round(seconds * SAMPLE_RATE))) / SAMPLE_RATE
    signal = _signal(cls.sound, t_audio, f0, p, rng) * _envelope(cls.sound, t_audio, p, bursts)
    audio = 0.5 * signal + noise_level * rng.standard_normal(t_audio.size)
    audio = np.clip(audio, -1.0, 1.0).astype(np.float32)

    n_frames = int(round(seconds * FPS))
    t_frames = np.arange(n_frames) / FPS
    env = _envelope(cls.sound, t_frames, p, bursts).astype(np.float32)

    radius = rng.uniform(28, 40)
    margin = 1.5 * radius
    speed = rng.uniform(15, 45)  # pixels per second
    angle = rng.uniform(0, 2 * np.pi)
    cx = _bounce(rng.uniform(margin, WIDTH - margin), speed * np.cos(angle), t_frames, margin, WIDTH - margin)
    cy = _bounce(rng.uniform(margin, HEIGHT - margin), speed * np.sin(angle), t_frames, margin, HEIGHT - margin)
    colour = np.clip(np.array(cls.colour, np.float32) + rng.uniform(-15, 15, 3), 0, 255)
    grey = rng.uniform(30, 80)
    gradient = np.linspace(-12, 12, WIDTH, dtype=np.float32)[None, :, None] * rng.choice([-1.0, 1.0])
    # A fixed grain plus a little fresh noise per frame: realistic, and cheap to encode.
    background = grey + gradient + rng.standard_normal((HEIGHT, WIDTH, 3), dtype=np.float32) * 5.0
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)

    frames = np.empty((n_frames, HEIGHT, WIDTH, 3), np.uint8)
    for i in range(n_frames):
        img = background + rng.standard_normal((HEIGHT, WIDTH, 3), dtype=np.float32) * 2.0
        r = radius * (0.75 + 0.5 * env[i])  # the object pulses with the sound
        mask = _shape_mask(cls.shape, xx - cx[i], yy - cy[i], r, p["phase"] + 2.0 * t_frames[i])
        img[mask] = colour * (0.55 + 0.45 * env[i])
        frames[i] = np.clip(img, 0, 255).astype(np.uint8)
    return RenderedClip(frames=frames, audio=audio, envelope=env)


# --- files ---------------------------------------------------------------------------------


def _write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(sample_rate)
        fh.writeframes(pcm.tobytes())


def encode_clip(rendered: RenderedClip, path: Path, seconds: float) -> None:
    """Encode frames + waveform to an MP4 at ``path`` atomically (temporary file, then rename)."""
    token = uuid.uuid4().hex[:12]  # ffmpeg creates the files, so they get the usual permissions
    tmp_wav = path.with_name(f".{path.stem}.{token}.wav")
    tmp_mp4 = path.with_name(f".{path.stem}.{token}.tmp.mp4")
    try:
        _write_wav(tmp_wav, rendered.audio, SAMPLE_RATE)
        video = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{WIDTH}x{HEIGHT}", framerate=FPS)
        audio = ffmpeg.input(str(tmp_wav))
        out = ffmpeg.output(
            video,
            audio,
            str(tmp_mp4),
            t=seconds,
            vcodec="libx264",
            preset="veryfast",
            crf=23,
            pix_fmt="yuv420p",
            g=2 * FPS,
            acodec="aac",
            audio_bitrate="96k",
            movflags="+faststart",
            map_metadata=-1,
            fflags="+bitexact",
            **{"flags:v": "+bitexact", "flags:a": "+bitexact", "threads:v": 1, "f": "mp4"},
        )
        cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error"]
        try:
            ffmpeg.run(
                out, cmd=cmd, input=rendered.frames.tobytes(), capture_stdout=True, capture_stderr=True,
                overwrite_output=True,
            )
        except ffmpeg.Error as exc:
            lines = exc.stderr.decode(errors="replace").strip().splitlines()
            raise RuntimeError(f"ffmpeg failed writing {path}: {lines[-1] if lines else 'no message'}") from None
        os.replace(tmp_mp4, path)
    finally:
        tmp_wav.unlink(missing_ok=True)
        tmp_mp4.unlink(missing_ok=True)


def _segments_csv(clips: list[DemoClip], seconds: float, seed: int) -> str:
    labels = {c.cls.mid for c in clips}
    lines = [
        f"# Segments csv created by pcav demo-data (seed {seed})",
        f"# num_ytids={len(clips)}, num_segs={len(clips)}, num_unique_labels={len(labels)}, "
        f"num_positive_labels={len(clips)}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]
    for c in clips:
        lines.append(f'{c.ytid}, 0.000, {seconds:.3f}, "{c.cls.mid}"')
    return "\n".join(lines) + "\n"


def start_build(videos: Path, settings_path: Path, settings: dict, prefix: str) -> None:
    """Make ``videos`` ready for a (re)build with ``settings``: clips ``{prefix}*.mp4`` made with
    other settings (as ``settings_path`` records them) are removed, since a rebuild would
    silently reuse them, and so are the temporaries of an interrupted build (``.{prefix}*``);
    then ``settings`` is recorded. An unreadable record counts as other settings."""
    previous = None
    if settings_path.is_file():
        try:
            previous = json.loads(settings_path.read_text())
        except (OSError, json.JSONDecodeError):
            previous = None
    if previous != settings:
        for old in videos.glob(f"{prefix}*.mp4"):
            old.unlink()
    for stale in videos.glob(f".{prefix}*"):
        stale.unlink()
    manifest.atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")


def make_demo_corpus(
    out: str | Path,
    *,
    classes: int = 6,
    clips_per_class: int = 10,
    eval_per_class: int = 2,
    seed: int = 0,
    seconds: float = 10.0,
    jobs: int = 0,
    progress: Progress | None = None,
) -> DemoCorpusReport:
    """Write the demo corpus under ``out``; finished videos of an identical earlier run are kept.

    Args:
        clips_per_class: clips of each class in all, ``eval_per_class`` of them for evaluation.
        jobs: clips encoded at once; 0 means one per CPU core.
        progress: called as ``progress(n=1, note=clip_id)`` after each clip.
    """
    out = Path(out)
    if classes < 1 or eval_per_class < 0 or clips_per_class <= eval_per_class:
        raise UserError(
            f"demo-data needs --classes >= 1 and 0 <= --eval-per-class < --clips-per-class "
            f"(got {classes}, {eval_per_class}, {clips_per_class})"
        )
    if not 1.0 <= seconds <= 600.0:
        raise UserError(f"--seconds must be between 1 and 600, got {seconds:g}")
    if jobs < 0:
        raise UserError(f"--jobs must be >= 0, got {jobs}")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    videos = out / "videos"
    try:
        videos.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {videos}: {exc.strerror}") from None

    # Videos made with other settings would be silently reused: remove them first.
    settings = {"version": CORPUS_VERSION, "seed": seed, "classes": classes, "clips_per_class": clips_per_class,
                "eval_per_class": eval_per_class, "seconds": seconds, "width": WIDTH, "height": HEIGHT, "fps": FPS}
    start_build(videos, out / SETTINGS_FILE, settings, prefix="demo")

    class_list = demo_classes(classes)
    clips = demo_clips(class_list, clips_per_class, eval_per_class)
    todo = [c for c in clips if not (videos / f"{c.clip_id}.mp4").is_file()]
    n_skipped = len(clips) - len(todo)
    if progress and n_skipped:
        progress(n_skipped, "already there")

    def work(clip: DemoClip) -> str:
        encode_clip(render_clip(clip, seed, seconds), videos / f"{clip.clip_id}.mp4", seconds)
        return clip.clip_id

    workers = jobs or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(work, c) for c in todo]
        for fut in as_completed(futures):
            clip_id = fut.result()
            if progress:
                progress(1, clip_id)

    label_csv = out / LABEL_CSV
    manifest.write_label_csv(label_csv, manifest.LabelSet([c.mid for c in class_list], [c.name for c in class_list]))
    segment_csvs = {}
    for split, name in SEGMENT_CSVS.items():
        chosen = [c for c in clips if c.split == split]
        if chosen:
            segment_csvs[split] = out / name
            manifest.atomic_write_text(out / name, _segments_csv(chosen, seconds, seed))
        else:
            (out / name).unlink(missing_ok=True)
    return DemoCorpusReport(
        out=out,
        videos=videos,
        label_csv=label_csv,
        segment_csvs=segment_csvs,
        n_classes=classes,
        n_written=len(todo),
        n_skipped=n_skipped,
    )

