"""Which strings from outside (clip ids, names in a manifest or a CAV-MAE JSON) may name a file.

A clip id becomes a folder or file name in several places (``clips/ID``, ``plots/explain/ID``,
``frame_k/ID.jpg``). An id read from a file pcav did not write can hold ``../`` or a slash, and
then the path it makes leaves the folder it was meant for. Every such join checks the id here
first: a safe id is exactly one plain path component.
"""

from __future__ import annotations

from pathlib import Path

from pcavmae_cli.engine.errors import UserError

MAX_BYTES = 200  # a file name is at most 255 bytes; leave room for suffixes and temporary prefixes


def unsafe_reason(text: str) -> str | None:
    """Why ``text`` cannot be one file or folder name, or ``None`` when it can.

    Refused: empty, ``.``/``..`` or any leading dot (hidden, and one step from ``..``), a
    ``/`` or ``\\`` (a path, not a name), control characters (NUL ends a C string early),
    and more than ``MAX_BYTES`` bytes of UTF-8.
    """
    if not text:
        return "is empty"
    if "/" in text or "\\" in text:
        return "contains a path separator"
    if text.startswith("."):
        return "starts with '.'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
        return "contains a control character"
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        return f"is longer than {MAX_BYTES} bytes"
    return None


def is_safe_name(text: str) -> bool:
    """True when ``text`` is one plain path component (``unsafe_reason`` is None)."""
    return unsafe_reason(text) is None


def child(folder: str | Path, name: str, what: str = "clip id", hint: str = "") -> Path:
    """``folder / name``, refused as a one-line ``UserError`` when ``name`` is not one plain
    component, so that nothing is written outside ``folder``; ``hint`` ends the message."""
    why = unsafe_reason(name)
    if why is not None:
        raise UserError(f"{what} {name!r} {why}: it cannot name a file or folder in {folder}{hint}")
    return Path(folder) / name
