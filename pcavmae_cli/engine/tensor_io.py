"""Tensor files (safetensors, ``torch.save``) written and read with errors a user can act on.

The libraries report what the user's disk did in their own words: a full disk is a
``SafetensorError("... No space left on device (os error 28)")`` from safetensors and a
``RuntimeError("[enforce fail at inline_container.cc] ...")`` from ``torch.save``, and a
truncated file a ``SafetensorError`` about its header. Here a failed write becomes the
``OSError`` it was (errno and file name, which the CLI prints as one line) and an unreadable
file a ``UserError`` naming it. Written files get the umask's mode (``files.honour_umask``):
safetensors alone would make them owner-only.

``torch.save`` files are read with ``weights_only=True`` only (``load_tensors_only``): no pickled
code ever runs. torch's own refusal carries terminal colour codes and advises loading with
``weights_only=False``, which would run that code; here it says plainly what the file holds.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch as st
import torch

from pcavmae_cli.engine import files
from pcavmae_cli.engine.errors import UserError

_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# torch's weights-only unpickler names the object it refused: a global (a function, a class).
_REFUSED_GLOBAL = re.compile(r"Unsupported (global|class)")


def _as_os_error(exc: Exception, path: Path) -> OSError | None:
    """The ``OSError`` a safetensors error reports (Rust's ``(os error N)``), naming ``path``."""
    match = _OS_ERROR.search(str(exc))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), str(path))


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the umask's mode; a failed write is its ``OSError``."""
    try:
        st.save_file(tensors, str(path), metadata=metadata)
    except safetensors.SafetensorError as exc:
        raise (_as_os_error(exc, path) or exc) from None
    files.honour_umask(path)


class _Sink:
    """A file object for ``torch.save`` that keeps the ``OSError`` of a failed write (which torch
    turns into a RuntimeError without errno or file name)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.error = fh, None

    def write(self, data: bytes) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def write_torch(obj: Any, path: Path) -> None:
    """``torch.save(obj, path)``; a failed write (a full disk) is its ``OSError`` naming ``path``."""
    with open(path, "wb") as fh:
        sink = _Sink(fh)
        try:
            torch.save(obj, sink)
        except (RuntimeError, OSError):  # torch wraps the error, or passes it on without the file
            if sink.error is None:
                raise
            error = sink.error
            raise OSError(error.errno, error.strerror, str(path)) from None


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """``write_safetensors`` through a temporary and a rename (``files.atomic_write``)."""
    return files.atomic_write(path, lambda tmp: write_safetensors(tensors, tmp, metadata))


def _unreadable(path: Path, exc: Exception) -> UserError:
    if isinstance(exc, OSError):
        return UserError(f"{path}: cannot read ({exc.strerror or exc})")
    detail = str(exc).removeprefix("Error while deserializing header: ")
    return UserError(f"{path}: not a complete safetensors file ({detail}); it may be truncated or damaged")


def read_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; a missing, truncated or foreign file is a ``UserError``."""
    path = Path(path)
    try:
        return st.load_file(str(path), device=str(device))
    except (safetensors.SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None


@contextlib.contextmanager
def open_safetensors(path: str | Path) -> Iterator[Any]:
    """``safetensors.safe_open`` (lazy reads: keys, shapes, metadata), failing like ``read_safetensors``."""
    path = Path(path)
    try:
        handle = safetensors.safe_open(str(path), framework="pt")
    except (safetensors.SafetensorError, OSError) as exc:
        raise _unreadable(path, exc) from None
    with handle as fh:
        yield fh


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in _ANSI.sub("", str(exc)).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_tensors_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers; any failure is a
    ``UserError`` naming the file, and a file that pickles code says so without running it."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if _REFUSED_GLOBAL.search(str(exc)):
            raise UserError(
                f"{path}: the file holds pickled Python code, not only tensors; pcav will not run it "
                "(it loads tensors only)"
            ) from None
        raise UserError(f"{path}: not a readable torch file of tensors ({_first_line(exc)})") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except Exception as exc:  # a truncated file (zip central directory missing), not a torch file
        raise UserError(f"{path}: not a readable torch file of tensors ({_first_line(exc)})") from None
