"""A labelled audio-visual corpus built from real media that package registries ship.

Why: the demo corpus is synthetic and easy; a claim about audio-visual representations needs
real sounds and real pictures, and one where **both** matter. A class here is a pair
(sound category, picture category) from 3 sound and 3 picture categories, paired in a cycle:
sound category i goes with picture categories i and i+1 (mod 3), so 6 classes. Audio alone can
tell the sound category, which leaves 2 classes (ceiling 1/2); video alone likewise (ceiling
1/2); only both together can reach 100 %.

Why a cycle and not all 9 pairs (or 2 x 3): audio-visual self-supervision learns what the two
modalities share. With every sound category paired with every picture category, the sound says
nothing about the picture, the cross-modal objectives have nothing to align, and InfoNCE is best
served by audio embeddings that are all alike (docs/method.md, "Why the audio side collapsed").
In the cycle, a sound category rules out one picture category in three: the modalities share
information, as real audio-visual data does, without either one giving the class away.

Sounds (all band-limited to 8 kHz sampling, the telephone band of the Asterisk recordings, so
that no category is recognisable by its bandwidth alone):

- ``speech``: recorded voice prompts of six speakers: Asterisk's English, French and Italian
  prompts (``asterisk-core-sounds-{en,fr,it}-gsm``) for training; the Russian prompts, the
  ALSA test voice (``alsa-utils``) and the freedesktop sound theme's voice
  (``sound-theme-freedesktop``) held out. A clip is a random sequence of one speaker's prompts.
- ``music``: Asterisk's music-on-hold recordings (``asterisk-moh-opsound-wav``) and the game
  music of Pingus (``pingus-data``, tracker modules decoded by ffmpeg's libopenmpt); a clip is a
  random 10-s stretch of one track. Tracks are split between training and held-out.
- ``effects``: short event sounds (bells, alerts, clicks, game effects) in random order with
  pauses: the freedesktop sound theme's effects (``sound-theme-freedesktop``, not its voice) and
  LBreakout2's game sounds (``lbreakout2-data``) for training; KDE's Oxygen sounds
  (``oxygen-sounds``) and Pingus's game sounds (``pingus-data``) held out.

Behind its own sound, every clip has one of another category (3-12 dB quieter, RMS): speech
over music, music over murmured speech, and so on. Without it a random encoder already tells the
categories apart, and the audio side would have nothing to learn.

Pictures (each clip: one picture, a random square crop slowly zooming and panning to another,
random mirror and brightness):

- ``nature``: the photographs of MATE's ``nature`` wallpapers (``mate-backgrounds``);
- ``lab and sky``: scikit-image's microscopy, retina, astronomy and moon images (its wheel's
  ``skimage/data``);
- ``people and things``: scikit-image's astronaut, cameraman, coffee, cat, rocket, motorcycle
  and coins photographs, and matplotlib's photograph of Grace Hopper.

Every source recording and picture (a *unit*) belongs to one split, so held-out clips come
from speakers, tracks and pictures that training never saw: the benchmark measures
generalisation, not recall. The plan of clips (``plan_clips``) is a pure function of the
sizes; a clip's content is a pure function of (plan, seed), so a rebuild gives the same files.

Layout written under OUT (as ``pcav demo-data``'s, so ``pcav preprocess`` reads it)::

    videos/{clip_id}.mp4          H.264 + AAC, 224x224, 5 fps
    class_labels_indices.csv      index,mid,display_name
    train_segments.csv            AudioSet segment format
    eval_segments.csv
    clips.csv                     clip_id, split, class, sound/picture category and unit, background
    real_media_corpus.json        settings and the package versions the clips were made from
"""

from __future__ import annotations

import csv
import io
import os
import random
import subprocess
import sys
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import demo_corpus, manifest

SOUND_CATEGORIES = ("speech", "music", "effects")
PICTURE_CATEGORIES = ("nature", "lab and sky", "people and things")
BAND_RATE = 8000  # Hz: every sound passes through this rate (the Asterisk recordings' own)
PICTURE_SIDE = 448  # pictures are cached with this shorter side: room to zoom 2x at 224 px
SETTINGS_FILE = "real_media_corpus.json"
BACKGROUND_DB = (3.0, 12.0)  # how far (dB RMS) a clip's background sits below its own sound
CORPUS_VERSION = 6  # bump when the rendering changes, so old clips are rebuilt


@dataclass(frozen=True)
class Unit:
    """One source recording or picture set of a category: what a split holds whole."""

    modality: str  # "sound" or "picture"
    category: str
    name: str
    package: str  # where it comes from (a Debian package, "scikit-image" or "matplotlib")
    pattern: str  # glob of its files inside the unpacked package
    split: str  # "train" or "eval"


@dataclass(frozen=True)
class RealClass:
    index: int
    sound: str
    picture: str

    @property
    def name(self) -> str:
        return f"{self.sound} + {self.picture}"

    @property
    def mid(self) -> str:
        return "/pcav/real/" + f"{self.sound}_{self.picture}".replace(" ", "_")


@dataclass(frozen=True)
class ClipPlan:
    index: int  # global clip number: seeds the clip's random generator
    split: str
    cls: RealClass
    sound: Unit
    picture: Unit
    background: Unit  # a quieter sound of the other category, from the same split

    @property
    def ytid(self) -> str:
        return f"real{self.index:04d}"

    @property
    def clip_id(self) -> str:
        return f"{self.ytid}_0"  # segments.Segment(ytid, 0, ...).clip_id


def _asterisk(lang: str, speaker: str, split: str) -> Unit:
    return Unit("sound", "speech", speaker, f"asterisk-core-sounds-{lang}-gsm",
                f"usr/share/asterisk/sounds/{speaker}/**/*.gsm", split)  # fmt: skip


def _moh(track: str, split: str) -> Unit:
    return Unit("sound", "music", track, "asterisk-moh-opsound-wav", f"usr/share/asterisk/moh/{track}.wav", split)


def _pingus(module: str, split: str) -> Unit:
    return Unit("sound", "music", module, "pingus-data", f"usr/share/games/pingus/data/music/{module}", split)


def _effects(name: str, package: str, pattern: str, split: str) -> Unit:
    return Unit("sound", "effects", name, package, pattern, split)


def _mate(photo: str, split: str) -> Unit:
    return Unit("picture", "nature", photo, "mate-backgrounds", f"usr/share/backgrounds/mate/nature/{photo}.jpg", split)


def _skimage(category: str, image: str, split: str) -> Unit:
    return Unit("picture", category, image.split(".")[0], "scikit-image", f"skimage/data/{image}", split)


# Pingus's modules of at least 23 s, less pingus-3, pingus-5 and sorcerer: libopenmpt plays
# their instruments' random variations from an unseeded generator, so they never decode twice
# alike and a rebuilt corpus would differ.
_PINGUS_EVAL = {"gd-ite.it", "gd-myla.it", "pingus-7.it", "the_big_march_in_space.it"}
_PINGUS = ("gd-cancn.it", "gd-giirm.s3m", "gd-ite.it", "gd-matth.it", "gd-myla.it", "goin_march.it", "pingus-1.it",
           "pingus-2.it", "pingus-4.it", "pingus-6.it", "pingus-7.it", "pingus-8.it", "pingus-9.it",
           "rough_journey.it", "the_big_march_in_space.it")  # fmt: skip
_NATURE_EVAL = {"Dune", "LadyBird", "YellowFlower"}
_NATURE = ("Aqua", "Blinds", "Dune", "FreshFlower", "Garden", "GreenMeadow", "LadyBird", "RainDrops", "Storm",
           "TwoWings", "Wood", "YellowFlower")  # fmt: skip

UNITS: tuple[Unit, ...] = (
    _asterisk("en", "en_US_f_Allison", "train"),
    _asterisk("fr", "fr_CA_f_June", "train"),
    _asterisk("it", "it_IT_m_Carlo", "train"),
    _asterisk("ru", "ru_RU_f_IvrvoiceRU", "eval"),
    Unit("sound", "speech", "alsa test voice", "alsa-utils", "usr/share/sounds/alsa/[FRS]*_*.wav", "eval"),
    Unit("sound", "speech", "freedesktop voice", "sound-theme-freedesktop",
         "usr/share/sounds/freedesktop/stereo/audio-channel-*.oga", "eval"),  # fmt: skip
    _moh("macroform-cold_day", "train"),
    _moh("macroform-the_simplicity", "train"),
    _moh("manolo_camp-morning_coffee", "train"),
    _moh("macroform-robot_dity", "eval"),
    _moh("reno_project-system", "eval"),
    *(_pingus(m, "eval" if m in _PINGUS_EVAL else "train") for m in _PINGUS),
    # [!a]: the theme's effects without its voice (audio-channel-*) and test tones (audio-*, alarm-*)
    _effects("freedesktop effects", "sound-theme-freedesktop", "usr/share/sounds/freedesktop/stereo/[!a]*.oga", "train"),
    _effects("lbreakout2 effects", "lbreakout2-data", "usr/share/games/lbreakout2/sounds/*.wav", "train"),
    _effects("oxygen effects", "oxygen-sounds", "usr/share/sounds/Oxygen-*.ogg", "eval"),
    _effects("pingus effects", "pingus-data", "usr/share/games/pingus/data/sounds/*.wav", "eval"),
    *(_mate(p, "eval" if p in _NATURE_EVAL else "train") for p in _NATURE),
    _skimage("lab and sky", "cell.png", "train"),
    _skimage("lab and sky", "ihc.png", "train"),
    _skimage("lab and sky", "hubble_deep_field.jpg", "train"),
    _skimage("lab and sky", "microaneurysms.png", "train"),
    _skimage("lab and sky", "retina.jpg", "eval"),
    _skimage("lab and sky", "moon.png", "eval"),
    _skimage("people and things", "astronaut.png", "train"),
    _skimage("people and things", "camera.png", "train"),
    _skimage("people and things", "coffee.png", "train"),
    _skimage("people and things", "rocket.jpg", "train"),
    _skimage("people and things", "motorcycle_left.png", "train"),
    _skimage("people and things", "chelsea.png", "eval"),
    _skimage("people and things", "coins.png", "eval"),
    Unit("picture", "people and things", "grace_hopper", "matplotlib", "sample_data/grace_hopper.jpg", "eval"),
)

APT_PACKAGES = tuple(sorted({u.package for u in UNITS} - {"scikit-image", "matplotlib"}))


def real_classes() -> list[RealClass]:
    """The cycle of (sound category, picture category) pairs (module docstring), sound-major:
    sound category i with picture categories i and i+1 (mod 3)."""
    n = len(PICTURE_CATEGORIES)
    pairs = [(sound, PICTURE_CATEGORIES[(i + shift) % n]) for i, sound in enumerate(SOUND_CATEGORIES) for shift in (0, 1)]
    return [RealClass(k, sound, picture) for k, (sound, picture) in enumerate(pairs)]


def units_of(modality: str, category: str, split: str) -> list[Unit]:
    return [u for u in UNITS if (u.modality, u.category, u.split) == (modality, category, split)]


def unit_pairs(split: str, cls: RealClass, sounds: list[Unit], pictures: list[Unit]) -> list[tuple[Unit, Unit]]:
    """Every (sound unit, picture unit) pair of a class, in an order shuffled per split and class.

    Why every pair: if units were dealt out in step (clip j gets sound j mod 3 and picture
    j mod 9), a speaker would always come with the same pictures, and a model could match audio
    to video by who speaks rather than by what kind of sound it is. Measured on such a build:
    pre-training taught the audio features the picture category (kNN 53 % vs 19 % at random
    init) but not the sound category (59 % vs 62 %). Cycling through all pairs leaves the
    category as the only thing the two modalities share.
    """
    pairs = [(s, p) for s in sounds for p in pictures]
    random.Random(f"{split}/{cls.index}").shuffle(pairs)
    return pairs


def plan_clips(train_per_class: int = 15, eval_per_class: int = 5) -> list[ClipPlan]:
    """The clips of each split, classes taking turns; a clip's (sound unit, picture unit) pair
    cycles through ``unit_pairs``, and its background sound through the units of the other
    sound categories (taking turns)."""
    if train_per_class < 1 or eval_per_class < 1:
        raise ValueError(f"need at least one clip per class in each split, got {train_per_class}, {eval_per_class}")
    clips: list[ClipPlan] = []
    for split, per_class in (("train", train_per_class), ("eval", eval_per_class)):
        for j in range(per_class):
            for cls in real_classes():
                sounds = units_of("sound", cls.sound, split)
                pictures = units_of("picture", cls.picture, split)
                others = [s for s in SOUND_CATEGORIES if s != cls.sound]
                behind = units_of("sound", others[(j + cls.index) % len(others)], split)
                pairs = unit_pairs(split, cls, sounds, pictures)
                sound, picture = pairs[j % len(pairs)]
                background = behind[(j + 2 * cls.index) % len(behind)]
                clips.append(ClipPlan(len(clips), split, cls, sound, picture, background))
    return clips


# --- sources -------------------------------------------------------------------------------


def _run(cmd: list[str], cwd: Path | None = None) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, errors="replace")
    except FileNotFoundError:
        missing = f"{cmd[0]} not found: the corpus is fetched with apt-get and dpkg-deb (Debian, Ubuntu)"
        raise SystemExit(missing) from None
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-400:]}")


def fetch_sources(work: Path) -> dict[str, tuple[Path, str]]:
    """Each package's unpacked root and version (``apt-get download`` + ``dpkg-deb -x``, no
    root needed; ``pip download --no-deps scikit-image``); what is already under ``work`` is
    reused, so a rerun downloads nothing."""
    work.mkdir(parents=True, exist_ok=True)
    found: dict[str, tuple[Path, str]] = {}
    for package in APT_PACKAGES:
        debs = sorted(work.glob(f"{package}_*.deb"))
        if not debs:
            _run(["apt-get", "download", package], cwd=work)
            debs = sorted(work.glob(f"{package}_*.deb"))
        root = work / package
        if not (root / ".unpacked").is_file():
            _run(["dpkg-deb", "-x", str(debs[-1]), str(root)])
            (root / ".unpacked").touch()
        found[package] = (root, debs[-1].name.split("_")[1])
    wheels = sorted(work.glob("scikit_image-*.whl"))
    if not wheels:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "scikit-image", "-d", str(work)])
        wheels = sorted(work.glob("scikit_image-*.whl"))
    root = work / "scikit-image"
    if not (root / ".unpacked").is_file():
        with zipfile.ZipFile(wheels[-1]) as whl:
            whl.extractall(root, [n for n in whl.namelist() if n.startswith("skimage/data/")])
        (root / ".unpacked").touch()
    found["scikit-image"] = (root, wheels[-1].name.split("-")[1])
    import matplotlib

    found["matplotlib"] = (Path(matplotlib.get_data_path()), matplotlib.__version__)
    return found


def unit_files(unit: Unit, roots: dict[str, tuple[Path, str]]) -> list[Path]:
    """The unit's files, sorted; a speaker's ``silence`` prompts are left out."""
    files = sorted(p for p in roots[unit.package][0].glob(unit.pattern) if "silence" not in p.parts)
    if not files:
        raise SystemExit(f"no file matches {unit.pattern} in {unit.package} ({roots[unit.package][0]})")
    return files


@lru_cache(maxsize=None)
def decode_sound(path: Path) -> np.ndarray:
    """Mono float32 at ``BAND_RATE`` (ffmpeg reads gsm, wav, ogg and tracker modules). Raw GSM
    has no header, so ffmpeg is told the format: probing mistakes some prompts for MPEG-TS."""
    raw = ["-f", "gsm"] if path.suffix == ".gsm" else []
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", *raw, "-i", str(path),
           "-ac", "1", "-ar", str(BAND_RATE), "-f", "f32le", "-"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True)
    if proc.returncode != 0:
        raise SystemExit(f"ffmpeg cannot decode {path}: {proc.stderr.decode(errors='replace').strip()[-300:]}")
    return np.frombuffer(proc.stdout, np.float32)


@lru_cache(maxsize=None)
def load_picture(path: Path) -> np.ndarray:
    """RGB uint8 with the shorter side ``PICTURE_SIDE`` (larger wallpapers are scaled down once)."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = PICTURE_SIDE / min(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        return np.asarray(im)


# --- one clip ------------------------------------------------------------------------------


# Sequenced categories: pauses between sounds (s) and the longest stretch of one sound (s).
SEQUENCES = {"speech": {"pause": (0.1, 0.6), "longest": None}, "effects": {"pause": (0.2, 1.0), "longest": 2.5}}


def _sequence(
    files: list[Path], n: int, rng: np.random.Generator, pause: tuple[float, float], longest: float | None
) -> np.ndarray:
    """Sounds of ``files`` in random order with random pauses, from a random lead-in: one
    speaker's prompts, or event sounds (each cut to ``longest`` seconds, so that the few long
    jingles do not fill a clip)."""
    out, at = np.zeros(n, np.float32), int(rng.uniform(0, 0.5) * BAND_RATE)
    while at < n:
        sound = decode_sound(files[rng.integers(len(files))])
        if len(sound) < BAND_RATE // 20:  # a few prompts are empty files
            continue
        if longest is not None:
            sound = sound[: int(longest * BAND_RATE)]
        take = min(len(sound), n - at)
        out[at : at + take] = sound[:take] / (np.abs(sound).max() + 1e-6)
        at += take + int(rng.uniform(*pause) * BAND_RATE)
    return out


def _music(files: list[Path], n: int, rng: np.random.Generator) -> np.ndarray:
    """A random ``n``-sample stretch of the track (looped if shorter)."""
    track = decode_sound(files[0])
    if len(track) < n:
        track = np.tile(track, n // max(1, len(track)) + 1)
    start = int(rng.integers(0, len(track) - n + 1))
    return track[start : start + n].copy()


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def _frames(picture: np.ndarray, n_frames: int, rng: np.random.Generator) -> np.ndarray:
    """``n_frames`` square crops of ``picture`` moving from one random crop (zoom 1-2x) to another."""
    from PIL import Image

    h, w = picture.shape[:2]
    boxes = []
    for _ in range(2):
        side = min(h, w) / rng.uniform(1.0, 2.0)
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        boxes.append(np.array([x0, y0, x0 + side, y0 + side]))
    mirror, brightness = rng.random() < 0.5, rng.uniform(0.85, 1.15)
    image = Image.fromarray(picture)
    size = (demo_corpus.WIDTH, demo_corpus.HEIGHT)
    frames = np.empty((n_frames, size[1], size[0], 3), np.uint8)
    for i in range(n_frames):
        u = i / max(1, n_frames - 1)
        box = tuple(float(v) for v in (1 - u) * boxes[0] + u * boxes[1])
        frame = np.asarray(image.transform(size, Image.EXTENT, box, Image.BILINEAR), np.float32)
        frame = frame[:, ::-1] if mirror else frame
        frames[i] = np.clip(frame * brightness, 0, 255).astype(np.uint8)
    return frames


def render_clip(
    plan: ClipPlan, roots: dict[str, tuple[Path, str]], seed: int, seconds: float
) -> demo_corpus.RenderedClip:
    """Frames and waveform of one clip: a pure function of (plan, sources, seed, seconds)."""
    from scipy.signal import resample_poly

    rng = np.random.default_rng([seed, plan.index])
    n = int(round(seconds * BAND_RATE))
    layers = []
    for unit in (plan.sound, plan.background):
        files = unit_files(unit, roots)
        if unit.category == "music":
            layers.append(_music(files, n, rng))
        else:
            layers.append(_sequence(files, n, rng, **SEQUENCES[unit.category]))
    front, back = layers
    # The background sits BACKGROUND_DB below the clip's own sound (RMS): speech over music or
    # music over murmured speech, as in real recordings; without it, the two categories are
    # told apart even by a random encoder, and the audio side would have nothing to learn.
    level = 10 ** (-rng.uniform(*BACKGROUND_DB) / 20) * _rms(front) / (_rms(back) + 1e-9)
    band = front + level * back
    band *= rng.uniform(0.25, 0.9) / (np.abs(band).max() + 1e-6)  # peak level varies per clip
    audio = resample_poly(band, demo_corpus.SAMPLE_RATE, BAND_RATE).astype(np.float32)
    n_frames = int(round(seconds * demo_corpus.FPS))
    frames = _frames(load_picture(unit_files(plan.picture, roots)[0]), n_frames, rng)
    return demo_corpus.RenderedClip(frames=frames, audio=np.clip(audio, -1, 1), envelope=np.zeros(n_frames, np.float32))


# --- the corpus ----------------------------------------------------------------------------


def segments_csv(clips: list[ClipPlan], seconds: float) -> str:
    lines = [
        "# Segments csv written by benchmarks/real_media_corpus.py",
        f"# num_ytids={len(clips)}, num_segs={len(clips)}, num_unique_labels={len({c.cls.mid for c in clips})}, "
        f"num_positive_labels={len(clips)}",
        "# YTID, start_seconds, end_seconds, positive_labels",
    ]  # fmt: skip
    lines += [f'{c.ytid}, 0.000, {seconds:.3f}, "{c.cls.mid}"' for c in clips]
    return "\n".join(lines) + "\n"


def clips_table(clips: list[ClipPlan]) -> str:
    """One row per clip with both factors: what per-factor analyses (sound / picture) read."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["clip_id", "split", "class", "sound_category", "sound_unit", "picture_category", "picture_unit",
                     "background_unit"])  # fmt: skip
    for c in clips:
        writer.writerow([c.clip_id, c.split, c.cls.name, c.sound.category, c.sound.name, c.picture.category,
                         c.picture.name, c.background.name])  # fmt: skip
    return buffer.getvalue()


@dataclass
class RealCorpus:
    out: Path
    videos: Path
    label_csv: Path
    segment_csvs: dict[str, Path]
    clips: list[ClipPlan]
    n_written: int


def build_corpus(
    out: Path,
    sources: Path,
    *,
    train_per_class: int = 15,
    eval_per_class: int = 5,
    seed: int = 0,
    seconds: float = 10.0,
    jobs: int = 2,
    progress: Callable[[str], None] | None = None,
) -> RealCorpus:
    """Fetch the sources into ``sources`` and write the corpus under ``out``; clips of an
    identical earlier build are kept (a build with other settings starts over)."""
    roots = fetch_sources(sources)
    videos = out / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    settings = {"version": CORPUS_VERSION, "seed": seed, "train_per_class": train_per_class,
                "eval_per_class": eval_per_class, "seconds": seconds,
                "packages": {name: version for name, (_, version) in sorted(roots.items())}}  # fmt: skip
    demo_corpus.start_build(videos, out / SETTINGS_FILE, settings, prefix="real")

    clips = plan_clips(train_per_class, eval_per_class)
    todo = [c for c in clips if not (videos / f"{c.clip_id}.mp4").is_file()]

    def work(clip: ClipPlan) -> str:
        demo_corpus.encode_clip(render_clip(clip, roots, seed, seconds), videos / f"{clip.clip_id}.mp4", seconds)
        return clip.clip_id

    with ThreadPoolExecutor(max_workers=max(1, jobs or os.cpu_count() or 1)) as pool:
        for done in as_completed([pool.submit(work, c) for c in todo]):
            clip_id = done.result()
            if progress:
                progress(clip_id)

    classes = real_classes()
    label_csv = out / demo_corpus.LABEL_CSV
    manifest.write_label_csv(label_csv, manifest.LabelSet([c.mid for c in classes], [c.name for c in classes]))
    segment_csvs = {}
    for split, name in demo_corpus.SEGMENT_CSVS.items():
        segment_csvs[split] = out / name
        manifest.atomic_write_text(out / name, segments_csv([c for c in clips if c.split == split], seconds))
    manifest.atomic_write_text(out / "clips.csv", clips_table(clips))
    return RealCorpus(out, videos, label_csv, segment_csvs, clips, len(todo))
