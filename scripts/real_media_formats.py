"""One recording in many containers, preprocessed as a folder: which reach the manifest, and why not.

    .venv/bin/python scripts/real_media_formats.py [--source MEDIA] [--work DIR] [--seconds S]

Why: ``pcav preprocess`` decides by probing a file's content, not its name, so every
container/codec pair that ffmpeg reads and that carries a picture and a sound should reach the
manifest, and every other file should fail with its true reason. This script makes the same
10-s (``--seconds``) recording in ~20 containers with the bundled ffmpeg (codecs each container takes in that
build), adds a few files that must fail (picture only, sound only, text), preprocesses the
folder with the ``base`` recipe and prints, per file, ``manifest`` or the failure reason and
whether that is what the file holds. ``--corrupt`` also damages the middle of every two-stream
file (40 kB of random bytes) and checks that each one fails as damaged. Exit status 1 when any
file's outcome is not the expected.

The source (``--source``, any media file ffmpeg reads with both streams) defaults to real
media from package registries, so anyone can rebuild it: the spoken recordings of Debian's
``sound-theme-freedesktop`` package ("front left", "rear right", ...; fetched with
``apt-get download`` and unpacked with ``dpkg-deb``, no root needed) one after another, over
the photograph of Grace Hopper that matplotlib ships as sample data, slowly zoomed. Where
``apt-get`` is missing it falls back to a clip of pcav's own demo corpus generator (synthetic)
and says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pcavmae_cli.engine import config, media
from pcavmae_cli.engine.data import demo_corpus as demo
from pcavmae_cli.engine.data import preprocess as pp

SIZE = "320x240"

# name -> (ffmpeg output options, expected outcome). The video/audio codecs are ones the
# container accepts in the bundled build; "manifest" means both streams are there.
_H264 = ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
FORMATS: dict[str, tuple[list[str], str]] = {
    "mp4": ([*_H264, "-c:a", "aac", "-f", "mp4"], "manifest"),
    "mkv": ([*_H264, "-c:a", "flac", "-f", "matroska"], "manifest"),
    "webm": (["-c:v", "libvpx", "-deadline", "realtime", "-cpu-used", "8", "-b:v", "500k",
              "-c:a", "libopus", "-f", "webm"], "manifest"),  # fmt: skip
    "mov": ([*_H264, "-c:a", "alac", "-f", "mov"], "manifest"),
    "avi": (["-c:v", "mpeg4", "-q:v", "5", "-c:a", "libmp3lame", "-f", "avi"], "manifest"),
    "flv": (["-c:v", "flv", "-q:v", "5", "-c:a", "libmp3lame", "-ar", "44100", "-f", "flv"], "manifest"),
    "ogg": (["-c:v", "libtheora", "-q:v", "6", "-c:a", "libvorbis", "-f", "ogg"], "manifest"),
    "ogv": (["-c:v", "libtheora", "-q:v", "6", "-c:a", "libopus", "-f", "ogg"], "manifest"),
    "asf": (["-c:v", "wmv2", "-q:v", "5", "-c:a", "wmav2", "-f", "asf"], "manifest"),
    "wmv": (["-c:v", "wmv1", "-q:v", "5", "-c:a", "wmav1", "-f", "asf"], "manifest"),
    "vob": (["-c:v", "mpeg2video", "-q:v", "4", "-c:a", "ac3", "-ar", "48000", "-f", "vob"], "manifest"),
    "mpg": (["-c:v", "mpeg1video", "-q:v", "4", "-c:a", "mp2", "-f", "mpeg"], "manifest"),
    "ts": ([*_H264, "-c:a", "aac", "-f", "mpegts"], "manifest"),
    "3gp": (["-c:v", "h263", "-s", "176x144", "-c:a", "libopencore_amrnb", "-ar", "8000", "-ac", "1",
             "-b:a", "12.2k", "-f", "3gp"], "manifest"),  # fmt: skip
    "3g2": (["-c:v", "mpeg4", "-q:v", "5", "-c:a", "aac", "-f", "3g2"], "manifest"),
    "f4v": ([*_H264, "-c:a", "aac", "-f", "f4v"], "manifest"),
    "rm": (["-c:v", "rv20", "-q:v", "5", "-c:a", "ac3", "-f", "rm"], "manifest"),
    "swf": (["-c:v", "flv", "-q:v", "5", "-c:a", "libmp3lame", "-ar", "44100", "-f", "swf"], "manifest"),
    "nut": (["-c:v", "ffv1", "-c:a", "pcm_s16le", "-f", "nut"], "manifest"),
    "mxf": (["-c:v", "mpeg2video", "-q:v", "4", "-c:a", "pcm_s16le", "-ar", "48000", "-f", "mxf"], "manifest"),
    "m1v": (["-an", "-c:v", "mpeg1video", "-q:v", "4", "-f", "mpeg1video"], "no_audio_stream"),
    "gif": (["-an", "-r", "5", "-f", "gif"], "no_audio_stream"),
    "mp3": (["-vn", "-c:a", "libmp3lame", "-f", "mp3"], "no_video_stream"),
    "wav": (["-vn", "-c:a", "pcm_s16le", "-f", "wav"], "no_video_stream"),
}

SOUND_PACKAGE = "sound-theme-freedesktop"  # Debian/Ubuntu: real recorded voices and sounds
SOUNDS = "usr/share/sounds/freedesktop/stereo/audio-channel-*.oga"


def real_voices(work: Path) -> list[Path]:
    """The spoken channel names of ``SOUND_PACKAGE`` (about 1 s each), fetched from the
    distribution's archive into ``work``; [] when apt-get or dpkg-deb is not there."""
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        return []
    debs = sorted(work.glob(f"{SOUND_PACKAGE}_*.deb"))
    if not debs:
        fetched = subprocess.run(["apt-get", "download", SOUND_PACKAGE], cwd=work, capture_output=True, text=True)
        debs = sorted(work.glob(f"{SOUND_PACKAGE}_*.deb"))
        if fetched.returncode != 0 or not debs:
            print(f"apt-get download {SOUND_PACKAGE} failed: {fetched.stderr.strip()[-200:]}", file=sys.stderr)
            return []
    unpacked = work / SOUND_PACKAGE
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(unpacked)], check=True)
    return sorted(unpacked.glob(SOUNDS))


def real_photo() -> Path:
    """A real photograph that matplotlib (a pcav dependency) ships as sample data."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def _ffmpeg(*args: str) -> None:
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-y", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"ffmpeg failed: {' '.join(args)}\n{proc.stderr.strip()}")


def make_source(work: Path, source: Path | None, seconds: float = 10) -> tuple[Path, str]:
    """A master of ``seconds`` (FFV1 + PCM in MKV, 320x240, 25 fps, 44.1 kHz stereo); returns
    (path, what it is)."""
    master = work / "master.mkv"
    encode = ["-t", str(seconds), "-s", SIZE, "-r", "25", "-c:v", "ffv1", "-c:a", "pcm_s16le",
              "-ar", "44100", "-ac", "2", str(master)]  # fmt: skip
    if source is not None:
        _ffmpeg("-i", str(source), *encode)
        return master, f"the given source {source}"
    voices, photo = real_voices(work), real_photo()
    if voices and photo.is_file():
        # The voices one after another (0.3 s apart), looped to the length, over the photograph
        # slowly zoomed.
        inputs = [a for v in voices for a in ("-i", str(v))]
        chain = "".join(f"[{k + 1}:a]aresample=44100,aformat=channel_layouts=stereo,apad=pad_dur=0.3[a{k}];"
                        for k in range(len(voices)))  # fmt: skip
        joined = "".join(f"[a{k}]" for k in range(len(voices)))
        pan = f"zoompan=z='1+0.002*on':d={round(seconds * 25)}:s={SIZE}:fps=25"
        graph = f"{chain}{joined}concat=n={len(voices)}:v=0:a=1,aloop=loop=-1:size=2e9[a];[0:v]{pan}[v]"
        _ffmpeg("-loop", "1", "-i", str(photo), *inputs, "-filter_complex", graph,
                "-map", "[v]", "-map", "[a]", *encode)  # fmt: skip
        names = ", ".join(v.stem for v in voices)
        return master, f"real recordings ({SOUND_PACKAGE}: {names}) over a real photograph ({photo})"
    rendered = demo.render_clip(demo.demo_clips(demo.demo_classes(1), 1, 0)[0], seed=0, seconds=seconds)
    demo.encode_clip(rendered, work / "demo.mp4", seconds)
    _ffmpeg("-i", str(work / "demo.mp4"), *encode)
    return master, "no real recording found: a clip of pcav's demo corpus generator (synthetic)"


def make_folder(master: Path, folder: Path) -> dict[str, str]:
    """Every format of FORMATS written from ``master`` into ``folder``; name -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    for ext, (options, outcome) in FORMATS.items():
        name = f"recording_{ext}.{ext}"  # one stem per file: the stem is the clip id
        _ffmpeg("-i", str(master), *options, str(folder / name))
        expected[name] = outcome
    (folder / "notes.txt").write_text("a text file is not media\n")
    expected["notes.txt"] = "undecodable"
    return expected


def make_corrupt(folder: Path, expected: dict[str, str], into: Path, size: int = 40_000) -> dict[str, str]:
    """Copies of the two-stream files with ``size`` random bytes (seeded) in their middle: each must
    fail as damaged (``decode_errors`` or ``length_mismatch``), never reach the manifest silently."""
    import random

    rng = random.Random(0)
    into.mkdir(parents=True, exist_ok=True)
    damaged = {}
    for name, outcome in expected.items():
        if outcome != "manifest":
            continue
        data = bytearray((folder / name).read_bytes())
        n = min(size, len(data) // 8)
        at = len(data) // 2
        data[at : at + n] = rng.randbytes(n)
        (into / f"damaged_{name}").write_bytes(bytes(data))
        damaged[f"damaged_{name}"] = "damaged"
    return damaged


def outcomes(out: Path) -> dict[str, tuple[str, str]]:
    """Input file name -> ('manifest', duration) or (reason, detail), read from OUT's files."""
    found = {}
    for line in (out / pp.MANIFEST).read_text().splitlines():
        record = json.loads(line)
        flag = f", flagged: {record['decode_issue']}" if record.get("decode_issue") else ""
        found[Path(record["source"]).name] = ("manifest", f"{record['duration']} s{flag}")
    for line in (out / pp.FAILURES).read_text().splitlines():
        failure = json.loads(line)
        found[Path(failure["input"]).name] = (failure["reason"], failure.get("detail", ""))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, help="media file with picture and sound to use as the recording")
    parser.add_argument("--work", type=Path, help="folder for the files (default: a temporary one)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the recording (default 10)")
    parser.add_argument("--corrupt", action="store_true",
                        help="also preprocess copies with 40 kB of random bytes in the middle: each must fail as damaged")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pcav-formats-"))
    work.mkdir(parents=True, exist_ok=True)
    master, what = make_source(work, args.source, args.seconds)
    print(f"source: {what}")
    expected = make_folder(master, work / "formats")
    report = pp.preprocess(work / "formats", work / "out", config.load_recipe("base").data, jobs=2)
    found = outcomes(work / "out")
    bad = 0
    for name in sorted(expected):
        outcome, detail = found.get(name, ("missing", "in neither manifest nor failures"))
        ok = outcome == expected[name]
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {name:18} {outcome:16} {detail}")
    print(f"{report.n_ok} in the manifest, {report.n_failed} failures; {bad} unexpected; files in {work}")
    if args.corrupt:
        damaged = make_corrupt(work / "formats", expected, work / "damaged")
        pp.preprocess(work / "damaged", work / "out-damaged", config.load_recipe("base").data, jobs=2)
        found = outcomes(work / "out-damaged")
        for name in sorted(damaged):
            outcome, detail = found.get(name, ("missing", "in neither manifest nor failures"))
            ok = outcome in ("decode_errors", "length_mismatch")
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {name:26} {outcome:16} {detail[:90]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
