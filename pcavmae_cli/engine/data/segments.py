"""Official segment lists: AudioSet's and VGGSound's CSV formats, and clip naming.

AudioSet (``balanced_train_segments.csv`` ...)::

    # Segments csv created Sun Mar  5 10:54:31 2017
    # num_ytids=22160, num_segs=22160, num_unique_labels=527, num_positive_labels=52882
    # YTID, start_seconds, end_seconds, positive_labels
    --PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"

VGGSound (``vggsound.csv``, no header)::

    ---g-f_I2yQ,1,people marching,test
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pcavmae_cli.engine.errors import UserError

Corpus = Literal["audioset", "vggsound"]

# YouTube IDs are 11 characters of [A-Za-z0-9_-]; allowing up to 64 of the same characters
# keeps other sources possible while making path tricks ('../', '/') impossible.
_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VGGSOUND_SECONDS = 10.0


@dataclass(frozen=True)
class Segment:
    ytid: str
    start: float
    end: float
    labels: tuple[str, ...] = field(default_factory=tuple)
    split: str | None = None

    @property
    def clip_id(self) -> str:
        """File stem of the cut clip: ``{ytid}_{start}`` with the start in seconds (``30``, ``2.5``)."""
        return f"{self.ytid}_{self.start:g}"


def is_safe_id(text: str) -> bool:
    """True for IDs that can be used as a file name component without escaping its folder."""
    return bool(_SAFE_ID.match(text))


def detect_corpus(path: Path) -> Corpus:
    """Tell AudioSet's format from VGGSound's by the first data row."""
    for row in _rows(path):
        if len(row) == 4 and row[3].strip() in ("train", "test", "val", "valid"):
            return "vggsound"
        if len(row) >= 4 and row[3].strip().startswith("/"):
            return "audioset"
        break
    raise UserError(f"{path}: not an AudioSet or VGGSound segments CSV (first data row not recognised)")


def _rows(path: Path):
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot read segments CSV {path}: {exc.strerror}") from None
    with fh:
        for row in csv.reader(fh, skipinitialspace=True):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            yield row


def read_segments(path: str | Path, corpus: Corpus | None = None) -> list[Segment]:
    """Every segment of an AudioSet or VGGSound CSV; ``corpus=None`` detects the format.

    A malformed row is an error naming the file and the row; IDs are *not* checked here
    (``is_safe_id``), so that a download can record an unsafe ID as a failure and go on.
    """
    path = Path(path)
    corpus = corpus or detect_corpus(path)
    out = []
    for n, row in enumerate(_rows(path), 1):
        try:
            if corpus == "audioset":
                if len(row) < 4:
                    raise ValueError("expected YTID, start_seconds, end_seconds, positive_labels")
                start, end = float(row[1]), float(row[2])
                labels = tuple(x.strip() for x in ",".join(row[3:]).split(",") if x.strip())
                out.append(Segment(row[0].strip(), start, end, labels))
            else:
                if len(row) != 4:
                    raise ValueError("expected ytid,start,label,split")
                start = float(row[1])
                out.append(Segment(row[0].strip(), start, start + VGGSOUND_SECONDS, (row[2].strip(),), row[3].strip()))
        except ValueError as exc:
            raise UserError(f"{path}: data row {n} ({','.join(row)!r}): {exc}") from None
    if not out:
        raise UserError(f"{path}: no segments")
    return out
