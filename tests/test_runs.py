"""Comparing runs: ``pcav runs`` lists run folders with their status; ``visualize curves`` overlays runs."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

from pcavmae_cli.engine.runs_table import describe, find_runs
from tests.cli_helpers import pcav


def _run(folder: Path, cfg: dict, epochs: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in epochs) + '{"kind": "ep')  # torn line
    (folder / "checkpoints" / "last").mkdir(parents=True)
    (folder / "checkpoints" / "last" / "config.yaml").write_text(yaml.safe_dump(cfg))  # not a run of its own
    return folder


def _epoch(e: int, stage: str, **values) -> dict:
    return {"kind": "epoch", "step": 4 * (e + 1), "epoch": e, "stage": stage, "lr": 1e-3, "samples_per_s": 10.0,
            "seconds": 360.0, **values}  # fmt: skip


def _project(root: Path) -> None:
    stages = {"description": "pcav-like", "stages": [{"name": "joint", "epochs": 2}, {"name": "encoders", "epochs": 1}]}
    _run(root / "runs" / "pcav", stages, [_epoch(0, "joint", loss_total=3.0, loss_pje=1.0),
                                          _epoch(1, "joint", loss_total=2.5, loss_pje=0.8),
                                          _epoch(2, "encoders", loss_total=2.0, loss_pje=0.7)])  # fmt: skip
    _run(root / "runs" / "cav", {"description": "cav-like", "stages": [{"name": "cavmae", "epochs": 3}]},
         [_epoch(0, "cavmae", loss_total=1.5, loss_r=1.2)])  # fmt: skip
    ft = {"description": "a fine-tuning", "finetune": {"epochs": 2}}
    _run(root / "runs" / "group" / "ft", ft, [_epoch(0, "finetune", loss=1.0, metric="top1", val_top1=0.5),
                                              _epoch(1, "finetune", loss=0.8, metric="top1", val_top1=0.75)])  # fmt: skip


def test_runs_lists_each_run_with_its_status_and_best_metric(tmp_path):
    _project(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in find_runs(tmp_path)] == ["runs/cav", "runs/group/ft", "runs/pcav"]
    pcav_row, cav_row = describe(tmp_path / "runs" / "pcav"), describe(tmp_path / "runs" / "cav")
    assert (pcav_row.kind, pcav_row.status, pcav_row.best) == ("pretrain", "finished", "loss 2 (last)")
    assert cav_row.status == "stopped at step 4 (epoch 1/3)" and abs(pcav_row.hours - 0.3) < 1e-9
    ft = describe(tmp_path / "runs" / "group" / "ft")
    assert (ft.kind, ft.status, ft.best) == ("finetune", "finished", "val top1 0.75 (epoch 2)")
    result = pcav("runs", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr
    for text in ("group/ft", "finetune", "val top1 0.75 (epoch 2)", "stopped at step 4 (epoch 1/3)", "cav-like"):
        assert text in result.stdout, text
    assert "checkpoints" not in result.stdout


def test_curves_of_several_runs_share_one_figure(tmp_path):
    _project(tmp_path)
    out = tmp_path / "compare.png"
    result = pcav("visualize", "curves", str(tmp_path / "runs" / "pcav"), str(tmp_path / "runs" / "cav"), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert Image.open(out).size[0] > 1000
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text("")
    bad = pcav("visualize", "curves", str(tmp_path / "runs" / "pcav"), str(empty), "-o", str(tmp_path / "x.png"))
    assert bad.returncode == 1 and "no epoch lines" in bad.stderr


def test_a_torn_last_metrics_line_is_skipped_and_a_bad_middle_line_named(tmp_path):
    import pytest

    from pcavmae_cli.engine.errors import UserError
    from pcavmae_cli.engine.train.metrics import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "epoch", "step": 1}\n{"kind": "ep')  # killed mid-write
    assert read_metrics(path) == [{"kind": "epoch", "step": 1}]
    path.write_text('{"kind": "epoch", "step": 1}\nnot json\n{"kind": "epoch", "step": 2}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_metrics(path)
