"""Run folders work wherever they are moved: paths rebased, labels kept inside, overrides win."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pcavmae_cli.engine import config
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.run_folder import LABELS_COPY, keep_labels, portable_recipe, read_run_recipe

LABELS = "index,mid,display_name\n0,/t/c0,dog\n1,/t/c1,cat\n"


def _project(root: Path) -> Path:
    """A project folder as training leaves it: corpus files and a run whose config.yaml names
    them (absolute, as ``portable_recipe`` writes) and holds its own labels.csv."""
    (root / "corpus").mkdir(parents=True)
    (root / "corpus" / "labels.csv").write_text(LABELS)
    (root / "data").mkdir()
    (root / "data" / "train.jsonl").write_text("")
    run = root / "runs" / "ft"
    run.mkdir(parents=True)
    cfg = config.load_recipe("demo", [f"train.run_dir={run}", f"data.train_manifest={root / 'data' / 'train.jsonl'}",
                                      f"data.label_csv={root / 'corpus' / 'labels.csv'}", "data.eval_manifest=null"])  # fmt: skip
    (run / "config.yaml").write_text(config.dump_yaml(portable_recipe(cfg)))
    keep_labels(cfg, run)
    return run


def test_portable_recipe_makes_every_path_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load_recipe("demo", ["train.run_dir=runs/x", "data.train_manifest=data/train.jsonl",
                                      "data.label_csv=corpus/labels.csv"])  # fmt: skip
    out = portable_recipe(cfg)
    assert out.train.run_dir == str(tmp_path / "runs" / "x")
    assert out.data.train_manifest == str(tmp_path / "data" / "train.jsonl")
    assert out.data.label_csv == str(tmp_path / "corpus" / "labels.csv")
    assert out.data.eval_manifest == str(tmp_path / "pcav-demo" / "data" / "eval" / "manifest.jsonl")
    assert out.model == cfg.model  # nothing else changes


def test_a_project_moved_whole_finds_its_files_at_the_new_place(tmp_path, monkeypatch):
    run = _project(tmp_path / "old" / "proj")
    shutil.move(tmp_path / "old" / "proj", tmp_path / "new")
    moved = tmp_path / "new" / "runs" / "ft"
    monkeypatch.chdir(tmp_path)  # anywhere else
    cfg = read_run_recipe(moved / "config.yaml")
    assert cfg.data.train_manifest == str(tmp_path / "new" / "data" / "train.jsonl")
    assert cfg.data.label_csv == str(tmp_path / "new" / "corpus" / "labels.csv")
    assert cfg.train.run_dir == str(moved)
    assert not run.exists()


def test_a_run_copied_alone_reads_its_own_labels(tmp_path, monkeypatch):
    run = _project(tmp_path / "proj")
    lone = tmp_path / "elsewhere" / "ft"
    shutil.copytree(run, lone)
    shutil.rmtree(tmp_path / "proj")
    monkeypatch.chdir(tmp_path / "elsewhere")
    cfg = read_run_recipe(lone / "config.yaml")
    assert cfg.data.label_csv == str(lone / LABELS_COPY)
    assert (lone / LABELS_COPY).read_text() == LABELS
    # what cannot be found stays as written, for the command that needs it to name
    assert cfg.data.train_manifest == str(tmp_path / "proj" / "data" / "train.jsonl")


def test_overrides_win_over_the_rebased_paths(tmp_path):
    run = _project(tmp_path / "proj")
    other = tmp_path / "mine.csv"
    other.write_text(LABELS)
    cfg = read_run_recipe(run / "config.yaml", [f"data.label_csv={other}", "data.train_manifest=/data/x.jsonl"])
    assert cfg.data.label_csv == str(other)
    assert cfg.data.train_manifest == "/data/x.jsonl"


def test_a_path_that_exists_as_written_is_kept(tmp_path, monkeypatch):
    """Runs written before paths were made absolute (cwd-relative) still read from where they were trained."""
    run = _project(tmp_path / "proj")
    raw = yaml.safe_load((run / "config.yaml").read_text())
    raw["data"]["label_csv"] = "corpus/labels.csv"
    raw["train"]["run_dir"] = "runs/ft"
    (run / "config.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path / "proj")
    assert read_run_recipe(run / "config.yaml").data.label_csv == "corpus/labels.csv"
    monkeypatch.chdir(tmp_path)  # elsewhere: the run's own copy
    assert read_run_recipe(run / "config.yaml").data.label_csv == str(run / LABELS_COPY)


def test_an_unreadable_recipe_is_one_clear_error(tmp_path):
    (tmp_path / "config.yaml").write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="not a recipe"):
        read_run_recipe(tmp_path / "config.yaml")
    with pytest.raises(UserError, match="cannot read"):
        read_run_recipe(tmp_path / "missing" / "config.yaml")


def test_a_resumed_lone_run_keeps_its_labels(tmp_path):
    """Resumed where only the run folder is, the recipe's label CSV *is* the run's copy: copying
    it onto itself must neither fail nor empty it."""
    run = _project(tmp_path / "proj")
    shutil.rmtree(tmp_path / "proj" / "corpus")
    cfg = read_run_recipe(run / "config.yaml")
    assert cfg.data.label_csv == str(run / LABELS_COPY)
    assert keep_labels(cfg, run) == run / LABELS_COPY
    assert (run / LABELS_COPY).read_text() == LABELS
