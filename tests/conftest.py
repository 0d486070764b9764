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


@pytest.fixture(scope="session")
def trained_demo_run(tmp_path_factory):
    """A small demo corpus (3 classes x 6 clips, one per class held out) pre-trained with the
    ``demo`` recipe for 12 + 2 epochs of 3-4 steps, laid out as ``pcav demo`` lays it out; made
    once per session and shared by the tests that need a trained run (~40 s on 2 CPU cores)."""
    from types import SimpleNamespace

    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.data.preprocess import preprocess
    from pcavmae_cli.engine.data.stats import fbank_stats
    from pcavmae_cli.engine.train.pretrain import pretrain

    out = tmp_path_factory.mktemp("demo_run")
    corpus = demo.make_demo_corpus(out / "corpus", classes=3, clips_per_class=6, eval_per_class=1, seed=0, jobs=2)
    cfg = config.load_recipe("demo")
    manifests = {
        split: preprocess(corpus.segment_csvs[split], out / "data" / split, cfg.data, videos=corpus.videos, jobs=2).manifest
        for split in ("train", "eval")
    }
    stats = fbank_stats(manifests["train"], cfg.data)
    run_dir = out / "runs" / "pretrain"
    overrides = [
        f"train.run_dir={run_dir}", f"data.train_manifest={manifests['train']}",
        f"data.eval_manifest={manifests['eval']}", f"data.label_csv={corpus.label_csv}",
        f"data.audio.fbank.mean={stats.mean:.6f}", f"data.audio.fbank.std={stats.std:.6f}",
        "prototypes.num_clusters=[3, 6]", "prototypes.warmup_epochs=2", "stages.0.epochs=12", "stages.1.epochs=2",
        "data.loader.batch_size=4", "optim.effective_batch=4",
    ]  # fmt: skip
    cfg = config.load_recipe("demo", overrides)
    pretrain(cfg)
    return SimpleNamespace(out=out, run_dir=run_dir, train_manifest=manifests["train"],
                           eval_manifest=manifests["eval"], label_csv=corpus.label_csv, overrides=overrides)  # fmt: skip


# ---------------------------------------------------------------- skips

GPU_SKIP_REASON = "needs a CUDA GPU"  # the one reason a test may skip (tests/test_cuda.py)
_other_skips: list[str] = []


def pytest_runtest_logreport(report):
    """Note every skip (and xfail) whose reason is not a missing GPU."""
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if GPU_SKIP_REASON not in reason or hasattr(report, "wasxfail"):
            _other_skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session, exitstatus):
    """A skip for any reason but a missing GPU fails the run: a skipped test is a test not run."""
    if _other_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter):
    for line in _other_skips:
        terminalreporter.write_line(f"skipped, which fails the run (only '{GPU_SKIP_REASON}' may skip): {line}", red=True)
