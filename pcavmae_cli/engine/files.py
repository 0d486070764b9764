"""How pcav writes a file: whole or not at all, with the user's umask, and no leftovers.

- ``atomic_write(path, write)``: ``write`` fills a temporary sibling, which then replaces
  ``path`` by a rename, so a reader (or a crash) never sees half a file.
- Modes: every output gets ``0666 & ~umask``, as ``open`` and ffmpeg give. Two writers do not:
  safetensors (0.8 and later) and ``tempfile.mkstemp`` create owner-only (0600) files, so on a
  shared cluster colleagues could read a run's ``config.yaml`` but not its weights. The
  temporary is chmodded before the rename, so the file appears with its final mode.
- Leftovers: a kill -9 (or a power cut) during a write leaves its temporary behind. Temporaries
  are named ``.NAME.tmp-PID.N@HOST`` (N tells one process's writes apart); the next write of
  the same target, and ``remove_stale_temps`` on a folder, delete those whose writer is gone.

Why PID *and* host: a run folder often lives on a file system shared by several machines
(NFS, Lustre), and a PID means nothing on another host: ``os.kill(pid, 0)`` there would call a
live writer on node A dead on node B and delete its temporary mid-write. So a temporary is
removed only when it was made on this host and its PID is not running here; another host's
temporaries are left alone (at worst a leftover stays, never a live write lost). Containers on
one host normally have their own host names, which keeps their PID namespaces apart too.
A PID reused by an unrelated process keeps a leftover alive (the safe direction). Names without
``@HOST`` (written before hosts were recorded) count as this host's.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

TEMP_MARK = ".tmp-"
HOST = socket.gethostname().replace("/", "_") or "localhost"
_OWNER = re.compile(r"\.tmp-(\d+)(?:\.\d+)?(?:@(.+))?$")
_serial = itertools.count()
_swept: set[Path] = set()  # targets whose old temporaries this process has looked for


def _umask_at_import() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Only a fallback where /proc is missing: os.umask can read the mask only by setting it, which
# races with threads creating files in between (at import, pcav has no such threads yet).
_IMPORT_UMASK = _umask_at_import()


def current_umask() -> int:
    """The process's umask, read without changing it (``Umask:`` of /proc/self/status, Linux 4.7+)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def file_mode() -> int:
    """The mode a new file gets from ``open``: ``0666 & ~umask``."""
    return 0o666 & ~current_umask()


def honour_umask(path: str | Path) -> None:
    """Give ``path`` the mode ``open`` would have given it (for writers that make 0600 files)."""
    os.chmod(path, file_mode())


def temp_path(path: Path) -> Path:
    """``.NAME.tmp-PID.N@HOST`` next to ``path``: a new temporary of this process for it."""
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}.{next(_serial)}@{HOST}")


def writer_alive(name: str) -> bool:
    """Whether the writer of temporary ``name`` may still be running (see the module docstring)."""
    match = _OWNER.search(name)
    if match is None:
        return True  # not one of ours: never touch it
    pid, host = int(match.group(1)), match.group(2)
    if host is not None and host != HOST:
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return True
    return True


def remove_stale_temps(folder: Path, target: str | None = None) -> list[Path]:
    """Delete the temporaries in ``folder`` (of ``target`` only, if given) left by dead writers."""
    prefix = f".{target}{TEMP_MARK}" if target is not None else "."
    removed = []
    try:
        entries = [e for e in Path(folder).iterdir() if e.name.startswith(prefix) and TEMP_MARK in e.name]
    except FileNotFoundError:
        return removed
    for entry in entries:
        if writer_alive(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """``write(tmp)`` then rename ``tmp`` over ``path`` with the umask's mode; returns ``path``.

    On any error (a full disk, Ctrl-C) the temporary is removed and ``path`` is as it was.
    """
    path = Path(path)
    if path not in _swept:  # once per target and process: a folder of a million clips is listed once
        remove_stale_temps(path.parent, path.name)
        _swept.add(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        honour_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its folder; never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


# Errors of the machine rather than of pcav: the CLI prints them as one line (cli/app.py).
STORAGE_ERRNOS = frozenset(
    code
    for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES)
    if code is not None
)


def storage_error_in_text(text: str, filename: str | Path) -> OSError | None:
    """The storage ``OSError`` a tool's message reports (ffmpeg: "No space left on device"), if any.

    A full disk under a subprocess is the machine's problem, not the input's: it must stop the
    run rather than fail every remaining clip one by one."""
    for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS):
        if code is not None and os.strerror(code) in text:
            return OSError(code, os.strerror(code), str(filename))
    return None


def storage_error_line(exc: BaseException) -> str | None:
    """``FILE: No space left on device`` for an ``OSError`` the user's storage caused, else ``None``."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return None
    what = exc.strerror or os.strerror(exc.errno)
    where = exc.filename if exc.filename is not None else None
    line = f"{where}: {what}" if where is not None else what
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        line += " (free some space and run the command again)"
    return line
