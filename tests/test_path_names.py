"""Clip ids from files pcav did not write never become paths outside their folder."""

from __future__ import annotations

import json
import wave

import pytest
from PIL import Image

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data import manifest
from pcavmae_cli.engine.data import preprocess as pp
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.path_names import child, is_safe_name, unsafe_reason

HOSTILE = ["../../evil", "..", ".", "a/b", "/etc/passwd", "..\\x", ".hidden", "a\x00b", "line\nbreak", "x" * 201, ""]
FINE = ["--4gqARaEJE", "KlsG1EnBEjc_000361", "00W1lcxW-WU_40.000", "vid{a}", "clip 01", "été..ok", "x" * 200]


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_ids_are_not_names(tmp_path, text):
    assert not is_safe_name(text) and unsafe_reason(text)
    with pytest.raises(UserError, match="cannot name a file or folder in"):
        child(tmp_path, text)


@pytest.mark.parametrize("text", FINE)
def test_ids_of_real_corpora_are_names(tmp_path, text):
    assert is_safe_name(text) and child(tmp_path, text).parent == tmp_path


def _wav(path, seconds=2.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as fh:
        fh.setnchannels(1)
        fh.setsampwidth(2)
        fh.setframerate(16000)
        fh.writeframes(b"\1\0" * int(seconds * 16000))


def test_cavmae_json_refuses_an_id_that_climbs_out(tmp_path):
    """``../../evil`` would find ``frames/frame_0/../../evil.jpg`` = ``evil.jpg`` next to the JSON
    and import it; it is a failure ``unsafe_id`` instead, and the good entry still imports."""
    root = tmp_path / "cavmae"
    (root / "frames" / "frame_0").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "frames" / "frame_0" / "good.jpg")
    Image.new("RGB", (8, 8)).save(root / "evil.jpg")  # where the hostile id leads
    _wav(root / "audio" / "good.wav")
    entries = [
        {"video_id": "good", "wav": "audio/good.wav", "video_path": "frames", "labels": "/m/a"},
        {"video_id": "../../evil", "wav": "audio/good.wav", "video_path": "frames", "labels": "/m/a"},
        {"video_id": "sub/dir", "wav": "audio/good.wav", "video_path": "frames", "labels": "/m/a"},
    ]
    (root / "data.json").write_text(json.dumps({"data": entries}))
    report = pp.preprocess(root / "data.json", tmp_path / "out", config.load_recipe("base").data)
    assert [r.id for r in manifest.read_manifest(report.manifest)] == ["good"]
    failures = [json.loads(line) for line in report.failures_path.read_text().splitlines()]
    assert [(f["reason"], f["id"]) for f in failures] == [("unsafe_id", "../../evil"), ("unsafe_id", "sub/dir")]
    assert "path separator" in failures[0]["detail"]
