"""Shared fixtures: small real media files made with the bundled ffmpeg.

``make_mp4`` writes a clip from ffmpeg's test sources; ``demo_corpus`` is a tiny demo corpus
(2 classes x 2 clips of 10 s, one of them held out) made once per test session.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pcavmae_cli.engine import media
from pcavmae_cli.engine.data import demo_corpus as demo

TONE = "0.5*sin(2*PI*440*t)"


def make_mp4(
    path: str | Path,
    seconds: float,
    *,
    with_audio: bool = True,
    with_video: bool = True,
    stereo: bool = False,
    faststart: bool = True,
    size: str = "320x240",
    fps: int = 5,
    tone: str = TONE,
) -> Path:
    """An H.264 + AAC file of ``seconds``: testsrc picture, and ``tone`` (an aevalsrc expression
    in ``t``) as sound. ``stereo``: the tone on the left channel, silence on the right.
    ``faststart=False`` leaves the MP4 index (moov) at the end, as an interrupted download would.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [media.ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    if with_video:
        cmd += ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={fps}:duration={seconds}"]
    if with_audio:
        expr = f"{tone}|0" if stereo else tone
        cmd += ["-f", "lavfi", "-i", f"aevalsrc={expr}:s=44100:d={seconds}"]
    if with_video:
        cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p"]
    if with_audio:
        cmd += ["-c:a", "aac", "-b:a", "128k"]
    if faststart:
        cmd += ["-movflags", "+faststart"]
    cmd += ["-f", "mp4", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)
    return path


@pytest.fixture(scope="session")
def mp4_factory():
    """``make_mp4`` as a fixture, for test modules that prefer not to import conftest."""
    return make_mp4


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory) -> demo.DemoCorpusReport:
    """2 classes x 2 clips of 10 s (one train + one eval clip per class), seed 0."""
    out = tmp_path_factory.mktemp("demo_corpus")
    return demo.make_demo_corpus(out, classes=2, clips_per_class=2, eval_per_class=1, seed=0, seconds=10.0, jobs=2)
