"""``pcav demo`` end to end through the real entry point, on a small corpus."""

from __future__ import annotations

import json

import yaml

from pcavmae_cli.engine.data.manifest import read_manifest
from tests.cli_helpers import pcav


def test_demo_runs_every_available_stage(tmp_path):
    out = tmp_path / "demo"
    args = ["demo", str(out), "--classes", "2", "--clips-per-class", "3", "--eval-per-class", "1",
            "stages.0.epochs=3", "stages.1.epochs=1", "prototypes.warmup_epochs=1"]  # fmt: skip
    result = pcav(*args)
    assert result.returncode == 0, result.stderr
    for stage in ("demo data", "preprocess train", "preprocess eval", "fbank stats", "pretrain"):
        assert f"done {stage}" in result.stdout
    assert "not in this version yet" in result.stdout
    assert not [line for line in result.stdout.splitlines() if "pretrain" in line and "not in this version" in line]

    run = out / "runs" / "pretrain"
    assert (run / "checkpoints/last/model.safetensors").is_file() and (run / "config.yaml").is_file()
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [e for e in epochs if e["kind"] == "epoch"]
    assert [e["prototypes"] for e in epochs] == [False, True, True, True]
    assert epochs[1]["num_prototypes"] == [2, 4]  # the demo's clusters follow its 2 classes
    assert f"loss {epochs[0]['loss_total']:.3f} (epoch 1) -> {epochs[-1]['loss_total']:.3f} (epoch 4)" in result.stdout

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

    # A second run reuses the corpus and the preprocessed clips, and resumes the finished run.
    lines = (run / "metrics.jsonl").read_text()
    again = pcav(*args)
    assert again.returncode == 0, again.stderr
    assert read_manifest(out / "data/train/manifest.jsonl") == train
    assert "done pretrain" in again.stdout and (run / "metrics.jsonl").read_text() == lines


def test_demo_with_a_bad_override_fails_before_any_work(tmp_path):
    result = pcav("demo", str(tmp_path / "d"), "data.loader.batch_size=many")
    assert result.returncode == 1
    assert "error: key 'data.loader.batch_size' expects int" in result.stderr
    assert not (tmp_path / "d").exists()
