"""One writer per folder: a second pcav process writing into a locked folder fails at once, naming
the holder; the lock dies with its holder (kill -9 included), so no stale lock is ever left."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.folder_lock import HELD_ENV, LOCK_FILE, folder_lock, run_folder_lock
from tests.cli_helpers import pcav
from tests.conftest import make_mp4

HOLD = """
import sys, time
from pcavmae_cli.engine.folder_lock import folder_lock
with folder_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds ``folder``'s lock; it is killed (SIGKILL) at the end."""
    procs = []

    def hold(folder: Path) -> subprocess.Popen:
        command = [sys.executable, "-c", HOLD, str(folder), "hold-marker"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.kill()
        proc.wait()


def test_a_held_folder_is_refused_naming_the_holder_until_it_is_killed(holder, tmp_path):
    folder = tmp_path / "out"
    proc = holder(folder)
    with pytest.raises(UserError) as err:
        with folder_lock(folder):
            pass
    message = str(err.value)
    assert message.startswith(f"{folder} is in use by pid {proc.pid} on {socket.gethostname()} since ")
    assert "hold-marker" in message and "\n" not in message  # the holder's command line

    proc.send_signal(signal.SIGKILL)  # no clean-up runs: the kernel releases the lock
    proc.wait()
    with folder_lock(folder):
        assert (folder / LOCK_FILE).is_file()


def test_a_folder_the_lock_made_is_removed_if_nothing_was_written(tmp_path):
    with folder_lock(tmp_path / "empty"):
        pass
    assert not (tmp_path / "empty").exists()  # a command that failed its checks leaves nothing
    with folder_lock(tmp_path / "used"):
        (tmp_path / "used" / "result.txt").write_text("x")
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["result.txt"]  # the lock file goes too


def test_a_caller_that_asks_to_wait_is_told_the_holder_once_and_enters_when_it_dies(holder, tmp_path):
    import threading

    folder = tmp_path / "out"
    proc = holder(folder)
    told: list[str] = []
    inside = threading.Event()

    def waiter():
        with folder_lock(folder, on_busy=told.append):
            inside.set()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert not inside.wait(0.5)  # still waiting while the holder lives
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    thread.join(10)
    assert inside.is_set()
    assert len(told) == 1 and told[0].startswith(f"pid {proc.pid} on {socket.gethostname()} since ")


def test_a_waiter_gets_the_lock_when_the_holder_removes_the_empty_folder_it_made(tmp_path):
    # The holder made the folder and wrote nothing, so it removes it on leaving: the waiter must
    # make it again rather than fail on a lock file in a folder that is gone.
    import threading

    folder = tmp_path / "made-by-the-first"
    first_inside, waiting, second_inside = threading.Event(), threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first():
        with folder_lock(folder):
            first_inside.set()
            waiting.wait(5)
            time.sleep(0.2)  # the second is blocked in flock now

    def second():
        first_inside.wait(5)
        try:
            with folder_lock(folder, on_busy=lambda _who: waiting.set()):
                second_inside.set()
                (folder / "result.txt").write_text("x")
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and second_inside.is_set()
    assert [p.name for p in folder.iterdir()] == ["result.txt"]


def test_under_torchrun_only_rank_0_locks_unless_its_launcher_holds_the_lock(holder, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    holder(run_dir)
    with run_folder_lock(run_dir, rank=1):  # the other ranks never take it
        pass
    with pytest.raises(UserError, match="is in use by pid"):
        with run_folder_lock(run_dir, rank=0):
            pass
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(HELD_ENV, str(run_dir.absolute()))  # what `pcav pretrain --nproc` tells its workers
    with run_folder_lock(run_dir, rank=0):
        pass


def _refused(result: subprocess.CompletedProcess, folder: Path, proc: subprocess.Popen) -> None:
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {folder} is in use by pid {proc.pid} on ")


def test_cli_pretrain_into_a_run_folder_in_use_fails_at_once(holder, tmp_path):
    run_dir = tmp_path / "run"
    proc = holder(run_dir)
    for nproc in ([], ["--nproc", "2"]):  # the --nproc launcher refuses before torchrun starts
        started = time.monotonic()
        result = pcav("pretrain", "--recipe", "demo", f"train.run_dir={run_dir}", *nproc, timeout=120)
        _refused(result, run_dir, proc)
        assert time.monotonic() - started < 30
    assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_FILE]  # nothing written into it


def test_cli_preprocess_into_an_output_in_use_fails_at_once(holder, tmp_path):
    make_mp4(tmp_path / "videos" / "a.mp4", 1.0, size="64x48")
    out = tmp_path / "out"
    proc = holder(out)
    result = pcav("preprocess", str(tmp_path / "videos"), str(out), timeout=120)
    _refused(result, out, proc)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
