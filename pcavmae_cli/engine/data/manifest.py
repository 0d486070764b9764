"""Manifests (one JSON object per clip per line) and AudioSet-style label CSVs.

A manifest line, as PRODUCT.md defines it::

    {"id": "abc_30", "video": "clips/abc_30", "audio": "clips/abc_30/audio.wav",
     "labels": ["/m/09x0r"], "duration": 10.0, "n_frames": 10}

Paths are relative to the manifest's folder (absolute paths are kept as they are), so a
preprocessed corpus can be moved as a whole. Optional keys: ``padded`` (the source was
shorter than a clip and was padded), ``source`` (the input video), ``frame_pattern`` (frame
file names inside ``video``; default ``frame_{k}.jpg``, k from 0).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pcavmae_cli.engine import files
from pcavmae_cli.engine.errors import UserError

DEFAULT_FRAME_PATTERN = "frame_{k}.jpg"


@dataclass
class ClipRecord:
    id: str
    video: str  # folder of frames
    audio: str  # mono WAV
    labels: list[str]
    duration: float  # seconds of the source before padding
    n_frames: int
    padded: bool = False
    source: str | None = None
    frame_pattern: str = DEFAULT_FRAME_PATTERN
    # Kept although damaged (data.preprocess.on_decode_error: flag): what ffmpeg reported.
    decode_issue: str | None = None

    def to_json(self) -> str:
        data = asdict(self)
        if not self.padded:
            del data["padded"]
        if self.decode_issue is None:
            del data["decode_issue"]
        if self.source is None:
            del data["source"]
        if self.frame_pattern == DEFAULT_FRAME_PATTERN:
            del data["frame_pattern"]
        return json.dumps(data, ensure_ascii=False)

    def frame_path(self, root: Path, k: int) -> Path:
        """Absolute path of frame ``k`` for a manifest that lives in folder ``root``."""
        return root / self.video / self.frame_pattern.format(k=k)

    def audio_path(self, root: Path) -> Path:
        return root / self.audio


@dataclass
class Failure:
    """A clip that did not make it into the manifest, and why."""

    input: str
    reason: str  # short code: empty_file, no_audio_stream, truncated, ...
    detail: str = ""
    id: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


REQUIRED_KEYS = ("id", "video", "audio", "labels", "duration", "n_frames")


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and a rename: never half a file
    (``engine/files.py``, which also gives it the umask's mode); returns ``path``."""
    return files.atomic_write_text(path, text)


def write_lines(path: Path, rows: Iterable[ClipRecord | Failure]) -> None:
    atomic_write_text(path, "".join(row.to_json() + "\n" for row in rows))


def read_manifest(path: str | Path) -> list[ClipRecord]:
    """All clips of a manifest; a bad line is an error naming the file and line number.

    A pack's ``index.json`` (``engine/data/pack.py``) reads as the manifest of the packed clips.
    """
    path = Path(path)
    from pcavmae_cli.engine.data import pack  # here: pack imports this module

    if pack.is_pack_index(path):
        path = pack.PackIndex.read(path).folder / pack.MANIFEST
    if not path.is_file():
        raise UserError(f"manifest not found: {path}")
    records = []
    known = set(ClipRecord.__dataclass_fields__)
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
            if not isinstance(data, dict):
                raise UserError(f"{path}:{lineno}: expected a JSON object")
            missing = [k for k in REQUIRED_KEYS if k not in data]
            if missing:
                raise UserError(f"{path}:{lineno}: missing key '{missing[0]}'")
            unknown = sorted(set(data) - known)
            if unknown:
                raise UserError(f"{path}:{lineno}: unknown key '{unknown[0]}'")
            if not isinstance(data["labels"], list):
                raise UserError(f"{path}:{lineno}: key 'labels' must be a list")
            records.append(ClipRecord(**data))
    if not records:
        raise UserError(f"manifest {path} lists no clips")
    return records


@dataclass
class LabelSet:
    """Labels of a corpus in AudioSet's ``index,mid,display_name`` form."""

    mids: list[str]
    names: list[str] = field(default_factory=list)

    def index(self) -> dict[str, int]:
        return {mid: i for i, mid in enumerate(self.mids)}


def read_label_csv(path: str | Path) -> LabelSet:
    """Read ``index,mid,display_name`` rows (header required, indices 0..N-1 in order)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"label CSV not found: {path}")
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"index", "mid", "display_name"} <= set(reader.fieldnames):
            raise UserError(f"{path}: expected a header 'index,mid,display_name'")
        mids, names = [], []
        for row in reader:
            lineno = reader.line_num  # the row's last line: a quoted label may hold newlines
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                raise UserError(f"{path}:{lineno}: index {row['index']!r} is not an integer") from None
            if index != len(mids):
                raise UserError(f"{path}:{lineno}: index {index} out of order (expected {len(mids)})")
            if row["mid"] is None or row["display_name"] is None:
                raise UserError(f"{path}:{lineno}: expected 3 fields 'index,mid,display_name'")
            mids.append(row["mid"])
            names.append(row["display_name"])
    if not mids:
        raise UserError(f"{path}: no labels")
    return LabelSet(mids=mids, names=names)


def write_label_csv(path: Path, labels: LabelSet) -> None:
    """Write ``index,mid,display_name`` rows with the csv module, so that any label (quotes,
    commas, newlines: VGGSound labels are free text) reads back as it was written."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["index", "mid", "display_name"])
    writer.writerows([i, mid, name] for i, (mid, name) in enumerate(zip(labels.mids, labels.names)))
    atomic_write_text(path, buffer.getvalue())
