"""One recording in many containers, preprocessed as a folder: which reach the manifest, and why not.

    .venv/bin/python scripts/real_media_formats.py [--source MEDIA] [--work DIR] [--seconds S]

Why: ``pcav preprocess`` decides by probing a file's content, not its name, so every
container/codec pair that ffmpeg reads and that carries a picture and a sound should reach the
manifest, and every other file should fail with its true reason. This script makes the same
10-s (``--seconds``) recording in ~20 containers with the bundled ffmpeg (codecs each container takes in that
build), adds a few files that must fail (picture only, sound only, text), preprocesses the
folder with the ``base`` recipe and prints, per file, ``manifest`` or the failure reason and
whether that is what the file holds. Exit status 1 when any file's outcome is not the expected.

The source (``--source``, any media file ffmpeg reads with both streams) defaults to a real
recording when one is found on this machine (the plucked-string WAV that CPython's test suite
ships, over a real photograph found in the local Rust docs, slowly panned), else to a clip of
pcav's own demo corpus generator, and the script says which it used.
"""

from __future__ import annotations

import argparse
import glob
import json
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

REAL_AUDIO = "/root/.pyenv/versions/*/lib/python3*/test/audiodata/pluck-pcm16.wav"
REAL_PHOTO = "/root/.rustup/toolchains/*/share/doc/rust/html/embedded-book/assets/f3.jpg"


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
    audio, photo = sorted(glob.glob(REAL_AUDIO)), sorted(glob.glob(REAL_PHOTO))
    if audio and photo:
        # The 0.3-s pluck played every 0.7 s (a real sound), over the photograph slowly zoomed.
        pan = f"zoompan=z='1+0.002*on':d={round(seconds * 25)}:s={SIZE}:fps=25"
        _ffmpeg("-loop", "1", "-i", photo[0], "-stream_loop", "-1", "-i", audio[0],
                "-filter_complex", f"[0:v]{pan}[v];[1:a]apad=pad_dur=0.4,aloop=loop=-1:size=2e9[a]",
                "-map", "[v]", "-map", "[a]", *encode)  # fmt: skip
        return master, f"real recording {audio[0]} over real photograph {photo[0]}"
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
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
