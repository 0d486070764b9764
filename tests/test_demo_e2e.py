"""``pcav demo`` end to end through the real entry point, on a small corpus."""

from __future__ import annotations

import json

import yaml

from pcavmae_cli.engine.data.manifest import read_manifest
from tests.cli_helpers import pcav


def test_demo_runs_every_available_stage(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", str(out), "--classes", "2", "--clips-per-class", "3", "--eval-per-class", "1"]
    result = pcav(*args)
    assert result.returncode == 0, result.stderr
    for stage in ("demo data", "preprocess train", "preprocess eval", "fbank stats", "loader pass"):
        assert f"done {stage}" in result.stdout
    assert "not in this version yet" in result.stdout

    train = read_manifest(out / "data/train/manifest.jsonl")
    held_out = read_manifest(out / "data/eval/manifest.jsonl")
    assert (len(train), len(held_out)) == (4, 2)
    assert not {r.id for r in train} & {r.id for r in held_out}
    assert (out / "data/train/failures.jsonl").read_text() == ""

    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["data"]["train_manifest"] == str(out / "data/train/manifest.jsonl")
    assert recipe["data"]["label_csv"] == str(out / "corpus/class_labels_indices.csv")
    # The demo's fbank statistics are the corpus's own, not the recipe's AudioSet numbers.
    assert recipe["data"]["audio"]["fbank"]["mean"] != -5.081

    # A second run reuses the corpus and the preprocessed clips.
    again = pcav(*args)
    assert again.returncode == 0, again.stderr
    assert read_manifest(out / "data/train/manifest.jsonl") == train


def test_demo_with_a_bad_override_fails_before_any_work(tmp_path):
    result = pcav("demo", str(tmp_path / "d"), "data.loader.batch_size=many")
    assert result.returncode == 1
    assert "error: key 'data.loader.batch_size' expects int" in result.stderr
    assert not (tmp_path / "d").exists()
