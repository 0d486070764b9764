"""One Ctrl-C stops the batch commands within seconds, keeps what is finished, records it, exits 130.

The CLI is run as a user runs it, in a session of its own, and the SIGINT goes to its whole
process group as a terminal's Ctrl-C does: ffmpeg children die with it, and a clip they were
making must be neither recorded as done nor as failed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import pack
from pcavmae_cli.engine.interrupt import Stopped
from tests.cli_helpers import PCAV
from tests.conftest import make_mp4
from tests.test_download import SERVED, _audioset_csv, _jsonl
from tests.test_download import server  # noqa: F401 - the local HTTP server fixture
from tests.test_embed import setup  # noqa: F401 - a converted tiny checkpoint and 3 preprocessed clips

N_CLIPS = 6
FAST = ["data.clip_seconds=2", "data.video.n_frames=2", "data.preprocess.min_seconds=1"]


def start(*args: str) -> subprocess.Popen:
    """``pcav ARGS`` in a new session (its own process group, as a terminal job)."""
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    return subprocess.Popen([str(PCAV), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # fmt: skip


def ctrl_c_when(proc: subprocess.Popen, ready, timeout: float = 60) -> tuple[int, str, float]:
    """Send SIGINT to ``proc``'s process group once ``ready()``; (exit status, stderr, seconds it took)."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"ended before the Ctrl-C: {proc.communicate()}"
        assert time.monotonic() < deadline, "never got ready"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    _, err = proc.communicate(timeout=30)
    return proc.returncode, err, time.monotonic() - sent


def finished_clips(out: Path) -> set[str]:
    return {p.parent.name for p in (out / "clips").glob("*/clip.json")}


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("videos")
    make_mp4(folder / "v0.mp4", 2.0, size="160x120")
    for i in range(1, N_CLIPS):
        shutil.copy(folder / "v0.mp4", folder / f"v{i}.mp4")
    return folder


def test_ctrl_c_stops_preprocess_and_records_what_is_done(videos, tmp_path):
    out = tmp_path / "out"
    proc = start("preprocess", str(videos), str(out), *FAST, "--jobs", "1")
    code, err, took = ctrl_c_when(proc, lambda: bool(finished_clips(out)))

    assert code == 130, err
    assert took < 10
    done = finished_clips(out)
    ids = {json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert ids == done and 1 <= len(done) < N_CLIPS  # the clips not reached were not started
    assert (out / "failures.jsonl").read_text() == ""  # the clip ffmpeg was making is not a failure
    assert not list((out / "clips").glob(".tmp-*"))
    assert f"interrupted (Ctrl-C): {len(done)} of {N_CLIPS} inputs done; rerun the same command to continue" in err
    assert "Traceback" not in err

    rerun = subprocess.run([str(PCAV), "preprocess", str(videos), str(out), *FAST, "--jobs", "1"],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert rerun.returncode == 0, rerun.stderr
    assert len((out / "manifest.jsonl").read_text().splitlines()) == N_CLIPS
    assert finished_clips(out) == {f"v{i}" for i in range(N_CLIPS)}


def test_ctrl_c_stops_download_and_logs_what_is_done(server, tmp_path):  # noqa: F811 - the fixture
    rows = [f'{ytid}, {start}.000, {start + 3}.000, "/m/09x0r"' for ytid in SERVED for start in (0, 3)]
    csv = _audioset_csv(tmp_path / "segments.csv", rows)
    out = tmp_path / "out"
    args = ("download", "audioset", "--csv", str(csv), "--out", str(out), "--url-template", server.template,
            "--jobs", "1")  # fmt: skip
    code, err, took = ctrl_c_when(start(*args), lambda: any((out / "videos").glob("*.mp4")))

    assert code == 130, err
    assert took < 10
    videos = {p.stem for p in (out / "videos").glob("*.mp4")}
    assert {d["id"] for d in _jsonl(out / "downloaded.jsonl")} == videos and 1 <= len(videos) < len(rows)
    assert _jsonl(out / "failures.jsonl") == []  # the clip in flight is not a failure
    assert not (out / ".tmp").exists()
    assert f"interrupted (Ctrl-C): {len(videos)} of {len(rows)} clips done; rerun the same command" in err

    rerun = subprocess.run([str(PCAV), *args], capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert len(_jsonl(out / "downloaded.jsonl")) == len(list((out / "videos").glob("*.mp4"))) == len(rows)


def ctrl_c_to_self(*_args, **_kwargs) -> None:
    """A Ctrl-C arriving now (the handler runs in the main thread, as from a terminal)."""
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_stops_pack_and_a_rerun_keeps_the_finished_shards(tmp_path):
    from tests.tiny_corpus import write_corpus

    manifest = write_corpus(tmp_path, classes=2, per_class=3)
    data = config.load_recipe("base", ["data.pack.clips_per_shard=1"]).data
    calls = []

    def first_shard_then_ctrl_c(n=1, note=""):
        calls.append(note)
        ctrl_c_to_self()

    with pytest.raises(Stopped) as stopped:
        pack.pack_manifest(manifest, tmp_path / "pack", data, jobs=1, progress=first_shard_then_ctrl_c)
    assert (stopped.value.done, stopped.value.total) == (1, 6) and calls == ["shard-00000"]
    assert not (tmp_path / "pack" / pack.INDEX).exists()  # an index means a complete pack

    again = pack.pack_manifest(manifest, tmp_path / "pack", data, jobs=1)
    assert (again.n_kept, again.n_written, again.n_clips) == (1, 5, 6)
    assert not (tmp_path / "pack" / pack.PARTIAL).exists()


def test_ctrl_c_stops_embed_after_the_chunk_it_is_in(setup, tmp_path):  # noqa: F811 - the fixture
    from pcavmae_cli.engine.embed import embed, work_folder

    _, run, _, manifest = setup
    with pytest.raises(Stopped) as stopped:
        embed(run, tmp_path / "out", data=manifest, chunk=1, on_chunk=lambda number: number == 0 and ctrl_c_to_self())
    assert (stopped.value.done, stopped.value.total, stopped.value.unit) == (1, 3, "clips")
    assert len(list((work_folder(tmp_path / "out") / "chunks").glob("chunk-*.safetensors"))) == 1
    assert not (tmp_path / "out").exists()

    resumed = embed(run, tmp_path / "out", data=manifest, chunk=1)
    assert (resumed.chunks_skipped, resumed.chunks_done, resumed.n_clips) == (1, 2, 3)
