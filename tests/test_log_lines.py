"""Training progress that reads well in a log file: plain step lines, a whole-run ETA, rates
with two significant digits."""

from __future__ import annotations

import json
import subprocess

import pytest

from pcavmae_cli.engine.train.log_lines import RunClock, duration, log_line, significant
from tests.cli_helpers import PCAV
from tests.tiny_corpus import TINY_MODEL, write_corpus


def test_rates_keep_two_significant_digits_and_durations_read_naturally():
    assert [significant(x) for x in (28.3, 0.4137, 0.004137, 5.0, 1234.5)] == ["28", "0.41", "0.0041", "5.0", "1234"]
    assert [duration(s) for s in (42, 425, 11520, 190000)] == ["42s", "7m05s", "3h12m", "2d04h"]


def test_the_eta_is_for_the_whole_run_from_this_process_pace():
    clock = RunClock(total_steps=100, start_step=40, now=0.0)  # resumed at step 40
    assert clock.eta(40, now=5.0) is None  # no step done here yet
    assert clock.eta(50, now=20.0) == pytest.approx(2.0 * 50)  # 2 s a step, 50 steps left


def test_a_line_names_every_part_and_the_epoch_as_written():
    record = {"kind": "step", "step": 7, "epoch": 1, "stage": "joint", "lr": 2.5e-4, "loss_total": 5.25,
              "loss_infonce": 2.1, "loss_r": 3.15, "loss_pje": None, "samples_per_s": 0.413}  # fmt: skip
    line = log_line(record, total_epochs=34, total_steps=200, eta=3725.0)
    assert line == ("step 7/200  epoch 1/34  stage joint  loss 5.25  nce 2.1  r 3.15  lr 0.00025  0.41 samples/s  "
                    "ETA run 1h02m")  # fmt: skip
    epoch = log_line({**record, "kind": "epoch", "val_top1": 0.5, "peak_memory_gb": 19.9}, 34, 200, None)
    assert epoch.startswith("epoch 1/34 done  step 7/200") and "val_top1 0.5" in epoch and epoch.endswith("ETA run -")
    assert "0.41 samples/s  mem 19.9 GB  ETA" in epoch
    averaged = {"kind": "averaged", "step": 9, "epoch": 3, "stage": "finetune", "lr": 0.0, "loss": None,
                "samples_per_s": 0.0, "val_mAP": 0.4187, "averaged_epochs": [2, 3]}  # fmt: skip
    assert log_line(averaged, 3, 9, None) == "averaged weights of epochs 2-3  val_mAP 0.4187"


def test_pretrain_writes_step_lines_to_a_log_file_before_the_first_epoch_ends(tmp_path):
    manifest = write_corpus(tmp_path / "data", 2, 4)
    log = tmp_path / "pretrain.log"
    with log.open("w") as fh:  # stdout is a file, as under nohup or SLURM
        done = subprocess.run(
            [str(PCAV), "pretrain", "--recipe", "demo", *TINY_MODEL, f"data.train_manifest={manifest}",
             f"train.run_dir={tmp_path / 'run'}", "data.label_csv=null", "prototypes.num_clusters=[2]",
             "prototypes.warmup_epochs=1", "optim.effective_batch=2", "stages.0.epochs=2", "stages.1.epochs=1",
             "train.log_every=1"],
            stdout=fh, stderr=subprocess.STDOUT, timeout=600,
        )  # fmt: skip
    text = log.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    steps = [i for i, line in enumerate(lines) if line.startswith("step ")]
    first_epoch = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/3 done"))
    assert steps and steps[0] < first_epoch  # progress shows while the epoch runs
    assert lines[steps[0]].startswith("step 1/12  epoch 1/3  stage joint  loss ")
    assert "samples/s" in lines[steps[0]] and " lr " in lines[steps[0]] and "ETA run " in lines[steps[0]]
    assert sum(line.startswith("epoch ") and " done " in line for line in lines) == 3
    assert "\x1b[" not in text and "━" not in text.split("pcav pretrain")[0]  # no bars, no escapes before the summary
    # the TensorBoard event files mirror metrics.jsonl: every loss part, lr, throughput, health, prototypes
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for part in ("total", "infonce", "r", "r_a", "r_v", "pje", "pcpe"):
        assert f"epoch/loss_{part}" in tags and f"step/loss_{part}" in tags, part
    assert {"step/lr", "epoch/samples_per_s", "epoch/num_prototypes/g0", "epoch/health_cos_a", "epoch/epoch"} <= tags
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if r["kind"] == "epoch"]
    logged = [(e.step, e.value) for e in events.Scalars("epoch/loss_total")]
    assert logged == [(r["step"], pytest.approx(r["loss_total"])) for r in epochs]


def test_the_summary_shows_each_stage_last_epoch_and_only_parts_that_ran():
    from types import SimpleNamespace

    from pcavmae_cli.cli.pretrain_cmd import summary_rows, summary_table

    def row(epoch, stage, **losses):
        parts = {f"loss_{p}": losses.get(p) for p in ("total", "infonce", "r", "pje", "pcpe")}
        return {"epoch": epoch, "stage": stage, "samples_per_s": 10.0, **parts}

    epochs = [row(e, "joint", total=5.0, infonce=2.0, r=3.0, pje=1.0 if e > 1 else None, pcpe=0.5 if e > 1 else None)
              for e in range(4)] + [row(4, "encoders", total=2.0, infonce=1.0, pje=1.0)]  # fmt: skip
    assert [r["epoch"] for r in summary_rows(epochs)] == [0, 3, 4]
    table = summary_table(SimpleNamespace(epochs=epochs))
    assert [c.header for c in table.columns] == ["epoch", "stage", "total", "infonce", "r", "pje", "pcpe", "samples/s"]
    only_nce = [row(e, "cavmae", total=1.0, infonce=0.5, r=0.5) for e in range(3)]
    assert [c.header for c in summary_table(SimpleNamespace(epochs=only_nce)).columns] == \
        ["epoch", "stage", "total", "infonce", "r", "samples/s"]


def test_tensorboard_is_one_switch_and_its_absence_one_warning(tmp_path, monkeypatch):
    import sys

    from pcavmae_cli.engine.train.tensorboard_log import TensorBoardLog, scalars

    assert scalars({"kind": "epoch", "step": 4, "epoch": 1, "stage": "joint", "loss_r": None, "loss_total": 2.0,
                    "num_prototypes": [2, 4], "prototypes": True}) == \
        {"epoch/loss_total": 2.0, "epoch/num_prototypes/g0": 2.0, "epoch/num_prototypes/g1": 4.0, "epoch/epoch": 1.0}
    off = TensorBoardLog(tmp_path / "off", enabled=False)
    off.write({"kind": "epoch", "step": 1, "loss_total": 1.0})
    assert not (tmp_path / "off").exists()
    said = []
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    missing = TensorBoardLog(tmp_path / "missing", enabled=True, warn=said.append)
    missing.write({"kind": "epoch", "step": 1, "loss_total": 1.0})
    assert len(said) == 1 and "pcavmae-cli[tensorboard]" in said[0] and not (tmp_path / "missing").exists()


def test_weights_and_biases_offline_gets_every_loss_part_and_a_resume_keeps_its_run(tmp_path, monkeypatch):
    """``train.wandb=true`` with ``WANDB_MODE=offline``: the run's .wandb file holds each line's
    scalars (their names are stored as written), and a resumed pcav run continues the same W&B
    run id. (The offline file is wandb's binary log; its names are what can be checked here.)"""
    import wandb  # noqa: F401 - the test extra installs it; without it this test fails, never skips
    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.train.pretrain import pretrain
    from pcavmae_cli.engine.train.stop import Interrupted
    from tests.test_pretrain import TINY, stop_at

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = write_corpus(tmp_path, classes=2, per_class=3)
    run = tmp_path / "run"
    base = [*TINY, f"data.train_manifest={train}", f"train.run_dir={run}", "train.wandb=true"]
    with pytest.raises(Interrupted):
        pretrain(config.load_recipe("demo", base), on_step=stop_at(4))  # in the 2nd epoch
    pretrain(config.load_recipe("demo", [*base, "train.resume=true"]))
    run_id = (run / "wandb" / "run_id").read_text().strip()
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(p.name == f"run-{run_id}.wandb" for p in logs)  # one W&B run, resumed
    written = b"".join(p.read_bytes() for p in logs)
    for part in ("total", "infonce", "r", "pje", "pcpe"):
        assert f"epoch/loss_{part}".encode() in written and f"step/loss_{part}".encode() in written, part
    assert b"step/lr" in written and b"epoch/health_cos_a" in written
