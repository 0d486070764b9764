"""Label CSVs: hostile labels (quotes, commas, newlines, non-ASCII) survive a write and a read.

VGGSound labels are free text that pcav turns into ``class_labels_indices.csv``; a label that
comes back different names another class, or none.
"""

from __future__ import annotations

import csv

import pytest

from pcavmae_cli.engine.data import preprocess
from pcavmae_cli.engine.data.manifest import LabelSet, read_label_csv, write_label_csv
from pcavmae_cli.engine.errors import UserError

HOSTILE = [
    'say "hello"',
    "dog, barking",
    "line one\nline two",
    "cr\r\nlf",
    '"quoted, with comma"',
    " leading and trailing ",
    "café – naïve",
    "plain",
]


def test_hostile_labels_round_trip(tmp_path):
    path = tmp_path / "labels.csv"
    labels = LabelSet(mids=[f"/m/{i}" for i in range(len(HOSTILE))], names=HOSTILE)
    write_label_csv(path, labels)
    back = read_label_csv(path)
    assert back.mids == labels.mids and back.names == HOSTILE
    with path.open(newline="", encoding="utf-8") as fh:  # any CSV reader agrees
        rows = list(csv.reader(fh))
    assert rows[0] == ["index", "mid", "display_name"]
    assert [r[2] for r in rows[1:]] == HOSTILE


def test_vggsound_csv_with_hostile_labels_writes_a_label_csv_that_reads_back(tmp_path):
    """The labels of a VGGSound CSV reach class_labels_indices.csv unchanged (no video needed:
    the label CSV lists the whole CSV's labels even when every clip is missing)."""
    src = tmp_path / "vggsound.csv"
    with src.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        for k, label in enumerate(HOSTILE[:5]):
            writer.writerow([f"vid{k:08d}xx", 0, label, "train"])
    (tmp_path / "videos").mkdir()
    report = preprocess.preprocess(src, tmp_path / "out", preprocess.ClipSettings(10, 1, 10, 224, 2, 16000, 5))
    assert report.failures == {"missing_video": 5}
    labels = read_label_csv(report.label_csv)
    # segments.read_segments strips the label's outer spaces, as it strips every field
    assert labels.mids == labels.names == sorted(label.strip() for label in HOSTILE[:5])


def test_a_short_row_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text('index,mid,display_name\n0,/m/a,"two\nlines"\n1,/m/b\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"labels\.csv:4: expected 3 fields"):
        read_label_csv(path)
