"""One writer per output folder: an exclusive lock that a second pcav process is refused.

Two runs writing into one folder destroy each other's work without an error: two pre-trainings
interleave ``metrics.jsonl`` and overwrite each other's checkpoints, two ``preprocess`` runs
delete each other's temporary clips. So every command that writes into a folder for a long
time (``pretrain``, ``finetune``, ``preprocess``, ``pack``, ``download``) holds
``FOLDER/.pcav.lock`` while it writes, and a second one fails at once, naming the holder.

``flock`` is released by the kernel when the holder dies, ``kill -9`` included, so there is no
stale lock to clean up (the file a killed holder leaves is simply locked anew); the holder's
description in the file (pid, host, command, start time) is only read to say who holds it.
A clean exit removes the file, so a finished folder holds only what the command wrote.
Where there is no ``fcntl`` (Windows) folders are not guarded. Scripts that start several
processes on purpose on one folder (a benchmark's per-seed processes preparing a shared corpus)
pass ``on_busy`` to wait their turn instead of being refused.

Commands that only read a folder, or write a few files atomically into it in seconds, take no
lock: ``evaluate`` reads and writes into a run folder that may still be training (evaluating
its ``best`` meanwhile is a normal thing to do), ``convert`` refuses a folder that holds
checkpoints already.

Under torchrun every rank writes into the same run folder but only rank 0 takes the lock (the
others could never get it). ``pcav pretrain --nproc N`` takes it in the launching process, before
torchrun starts, and tells rank 0 through ``HELD_ENV`` that its parent holds it.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pcavmae_cli.engine.errors import UserError

LOCK_FILE = ".pcav.lock"
HELD_ENV = "PCAV_LOCKED_FOLDER"  # set by the --nproc launcher for its torchrun workers


def _command() -> str:
    """How this process was started, as a user would type it."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "pcavmae_cli":
        argv[:1] = ["python", "-m", "pcavmae_cli"]
    elif argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def _holder(text: str) -> str:
    """The lock file's description of its holder, in words."""
    try:
        info = json.loads(text)
        who = "this process" if info["pid"] == os.getpid() else f"pid {info['pid']}"
        return f"{who} on {info['host']} since {info['started']} ({info['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (it has not said which yet)"


@contextmanager
def folder_lock(folder: str | Path, on_busy: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold ``folder``'s lock (creating the folder) for the ``with`` block.

    If another process holds it: with no ``on_busy``, ``UserError`` naming the holder; with
    ``on_busy``, it is called once with the holder's description and the call waits its turn.
    A folder this call created is removed again on leaving if nothing but the lock was put in
    it, so a command that fails its checks leaves no empty output folder behind.
    """
    try:
        import fcntl
    except ImportError:  # Windows: not guarded
        yield
        return
    folder = Path(folder)
    created = not folder.exists()
    path = folder / LOCK_FILE
    told = False  # on_busy is called once, however many holders come and go
    while True:
        try:  # in the loop: a holder we waited for removes the folder it made if it left it empty
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create {folder}: {exc.strerror or exc}") from None
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            text = os.pread(fd, 4096, 0).decode("utf-8", errors="replace")
            if on_busy is None:
                os.close(fd)
                raise UserError(
                    f"{folder} is in use by {_holder(text)}; wait for it to end or choose another folder"
                ) from None
            if not told:
                on_busy(_holder(text))
                told = True
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed the file as we opened it: lock the new one
    info = {
        "pid": os.getpid(), "host": socket.gethostname(), "command": _command(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(info) + "\n").encode())
    try:
        yield
    finally:
        try:  # removed while still held: a process that opened it meanwhile sees it gone and retries
            path.unlink()
            if created and not any(folder.iterdir()):
                folder.rmdir()
        except OSError:
            pass  # the folder is gone or holds more: nothing to tidy
        os.close(fd)  # releases the flock


@contextmanager
def run_folder_lock(folder: str | Path | None, rank: int) -> Iterator[None]:
    """``folder_lock`` of a training run folder, taken by rank 0 only (module docstring).

    ``None`` (a recipe without a ``train`` section) locks nothing: the recipe checks refuse it.
    """
    held = os.environ.get(HELD_ENV)
    launcher_holds = held is not None and "WORLD_SIZE" in os.environ and Path(held) == Path(folder or "").absolute()
    if folder is None or rank != 0 or launcher_holds:
        yield
        return
    with folder_lock(folder):
        yield
