"""Import a CAV-MAE data file: a manifest that points at CAV-MAE's already extracted files.

CAV-MAE's data file (its ``--data-train`` argument)::

    {"data": [{"video_id": "abc", "wav": "/data/audio/abc.wav", "video_path": "/data/frames",
               "labels": "/m/09x0r,/m/05zppz"}, ...]}

with the frames stored as ``{video_path}/frame_{k}/{video_id}.jpg`` (k = 0..9). Nothing is
copied: each manifest record holds the absolute paths, ``frame_pattern`` =
``frame_{k}/{video_id}.jpg``, ``n_frames`` = the frames found (frame_0, frame_1, ... without a
gap) and ``duration`` read from the WAV header. Relative paths in the JSON are taken relative
to the JSON file's folder. Entries with a missing or unreadable WAV, no frames, missing keys
or a ``video_id`` that is not one plain file name (``unsafe_id``: ``../x`` would reach outside
the frame folders, and later outside pcav's output folders) go to ``failures.jsonl``.
``pcav preprocess data.json OUT`` writes both files.
"""

from __future__ import annotations

import json
import wave
from collections.abc import Callable
from pathlib import Path

from pcavmae_cli.engine.data.manifest import ClipRecord, Failure
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.path_names import unsafe_reason

REQUIRED = ("video_id", "wav", "video_path")
MAX_FRAMES = 1000  # stop looking for frame_k folders here


def read_entries(path: Path) -> list:
    """The ``data`` list of a CAV-MAE JSON file; a file of another shape is a ``UserError``."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise UserError(f"{path}: expected a CAV-MAE data file, a JSON object with a 'data' list")
    if not data["data"]:
        raise UserError(f"{path}: the 'data' list is empty")
    return data["data"]


def _labels(value: object) -> list[str] | None:
    """CAV-MAE writes labels as one comma-separated string; a list of strings is accepted too."""
    if value is None:
        return []
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    if isinstance(value, list) and all(isinstance(x, str) for x in value):
        return [x.strip() for x in value if x.strip()]
    return None


def _wav_seconds(path: Path) -> float:
    with wave.open(str(path), "rb") as fh:
        return fh.getnframes() / fh.getframerate()


def import_entry(entry: object, where: str, base: Path) -> ClipRecord | Failure:
    """One ``data`` item as a record, or a failure saying what is wrong with it."""
    if not isinstance(entry, dict):
        return Failure(where, "malformed_entry", f"expected an object, got {type(entry).__name__}")
    missing = [k for k in REQUIRED if not isinstance(entry.get(k), str) or not entry.get(k)]
    if missing:
        return Failure(where, "malformed_entry", f"missing or non-text key '{missing[0]}'", entry.get("video_id"))
    video_id = entry["video_id"]
    why = unsafe_reason(video_id)
    if why is not None:  # it names frame files here, and output folders later (pcav explain)
        detail = f"video_id {video_id!r} {why}; a clip id must be one plain file name"
        return Failure(where, "unsafe_id", detail, video_id)
    labels = _labels(entry.get("labels"))
    if labels is None:
        return Failure(where, "malformed_entry", "'labels' must be a comma-separated string", video_id)
    wav = (base / entry["wav"]).resolve()
    frames = (base / entry["video_path"]).resolve()
    if not wav.is_file():
        return Failure(str(wav), "missing_audio", "the 'wav' file does not exist", video_id)
    try:
        duration = _wav_seconds(wav)
    except (OSError, wave.Error, EOFError) as exc:
        return Failure(str(wav), "undecodable", f"not a PCM WAV file ({exc})", video_id)
    n = 0
    while n < MAX_FRAMES and (frames / f"frame_{n}" / f"{video_id}.jpg").is_file():
        n += 1
    if n == 0:
        first = frames / "frame_0" / f"{video_id}.jpg"
        return Failure(str(first), "no_frames", "no frame_0 image for this video", video_id)
    escaped = video_id.replace("{", "{{").replace("}", "}}")  # frame_pattern goes through str.format
    return ClipRecord(
        id=video_id,
        video=str(frames),
        audio=str(wav),
        labels=labels,
        duration=round(duration, 3),
        n_frames=n,
        frame_pattern=f"frame_{{k}}/{escaped}.jpg",
    )


def import_entries(
    entries: list, path: Path, progress: Callable[..., None] | None = None
) -> tuple[list[ClipRecord], list[Failure]]:
    """Records and failures for the ``data`` items of the JSON file at ``path``, in order."""
    records: list[ClipRecord] = []
    failures: list[Failure] = []
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        row = import_entry(entry, f"{path}#data[{i}]", path.parent)
        if isinstance(row, ClipRecord) and row.id in seen:
            row = Failure(f"{path}#data[{i}]", "duplicate_id", f"video_id '{row.id}' appears earlier", row.id)
        if isinstance(row, ClipRecord):
            seen.add(row.id)
            records.append(row)
        else:
            failures.append(row)
        if progress:
            progress(1, row.id or "")
    return records, failures
