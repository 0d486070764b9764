"""``pcav finetune`` and ``pcav evaluate`` through the real entry point, on the tiny corpus."""

from __future__ import annotations

import json

import pytest

from pcavmae_cli.engine import config
from pcavmae_cli.engine.train.pretrain import pretrain
from tests.cli_helpers import pcav
from tests.tiny_corpus import TINY_FINETUNE, TINY_MODEL, write_corpus

pytestmark = pytest.mark.e2e


def test_finetune_then_evaluate_from_the_command_line(tmp_path):
    train, held_out = write_corpus(tmp_path, 3, 4, name="train"), write_corpus(tmp_path, 3, 2, seed=1, name="eval")
    labels = tmp_path / "labels.csv"
    pre = tmp_path / "runs" / "pre"
    pretrain(config.load_recipe("demo", [
        *TINY_MODEL, f"data.train_manifest={train}", f"train.run_dir={pre}", "data.label_csv=null",
        "prototypes.num_clusters=[2, 3]", "prototypes.warmup_epochs=1", "optim.effective_batch=4",
        "stages.0.epochs=2", "stages.1.epochs=1",
    ]))  # fmt: skip

    ft = tmp_path / "runs" / "ft"
    data = [f"data.train_manifest={train}", f"data.eval_manifest={held_out}", f"data.label_csv={labels}"]
    args = ["finetune", "--recipe", "finetune_demo", "--init-from", str(pre), *TINY_FINETUNE, *data,
            f"train.run_dir={ft}", "finetune.epochs=2"]  # fmt: skip
    result = pcav(*args)
    assert result.returncode == 0, result.stderr
    assert f"initialised from {pre / 'checkpoints/last/model.safetensors'}" in result.stdout
    assert "tensors loaded strictly, dropped on purpose: backbone.proj_a, backbone.proj_v, decoder, dproj_a, dproj_v" in result.stdout
    assert "pcav finetune" in result.stdout and "val top1" in result.stdout and f"run folder: {ft}" in result.stdout
    assert (ft / "checkpoints" / "last" / "model.safetensors").is_file()
    again = pcav(*args)
    assert again.returncode == 1 and "already holds a run" in again.stderr and len(again.stderr.strip().splitlines()) == 1

    shown = pcav("evaluate", "--checkpoint", str(ft), "--data", str(held_out))
    assert shown.returncode == 0, shown.stderr
    assert "pcav evaluate: classification" in shown.stdout and "per class (best first)" in shown.stdout
    assert "6 clips, frames: all" in shown.stdout
    out = ft / "eval" / "classification-eval"
    record = json.loads((out / "metrics.json").read_text())
    assert record["checkpoint"] == str(ft / "checkpoints" / "last") and f"{100 * record['metrics']['top1']:.2f} %" in shown.stdout
    assert (out / "per_class.csv").is_file()

    probe = pcav("evaluate", "-c", str(pre), "-d", str(held_out), "--task", "knn", f"data.label_csv={labels}",
                 "evaluate.knn_k=5", "--random-init", "--frames", "all")  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert "model: random init" in probe.stdout and "6 clips, frames: all" in probe.stdout
    assert json.loads((pre / "eval" / "knn-eval-random-init" / "metrics.json").read_text())["n_train_clips"] == 12


@pytest.mark.parametrize(
    "args, message",
    [
        (["evaluate", "-c", "{tmp}", "-d", "m.jsonl", "--task", "nope"], "error: --task: unknown task 'nope'; choose one of"),
        (["finetune", "init_from={tmp}/none"], "error: key 'finetune.init_from': {tmp}/none is neither"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    result = pcav(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(message.replace("{tmp}", str(tmp_path)))
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
