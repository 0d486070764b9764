"""``pcav pretrain`` end to end through the real entry point: the demo recipe on a small corpus."""

from __future__ import annotations

import pytest
import torch

from pcavmae_cli.engine.data import demo_corpus as demo
from pcavmae_cli.engine.train.data import loader_workers
from pcavmae_cli.engine.train.metrics import LOSS_PARTS, read_metrics
from tests.cli_helpers import pcav

pytestmark = pytest.mark.e2e


def test_pretrain_demo_recipe_end_to_end(tmp_path):
    corpus = demo.make_demo_corpus(tmp_path / "corpus", classes=2, clips_per_class=5, eval_per_class=1, seed=0, jobs=2)
    data = tmp_path / "data"
    prep = pcav("preprocess", str(corpus.segment_csvs["train"]), str(data), "--videos", str(corpus.videos), "-j", "2")
    assert prep.returncode == 0, prep.stderr
    held_out = tmp_path / "eval"
    prep = pcav("preprocess", str(corpus.segment_csvs["eval"]), str(held_out), "--videos", str(corpus.videos), "-j", "2")
    assert prep.returncode == 0, prep.stderr

    run = tmp_path / "runs" / "demo"
    overrides = [
        f"data.train_manifest={data / 'manifest.jsonl'}", f"data.eval_manifest={held_out / 'manifest.jsonl'}",
        f"data.label_csv={corpus.label_csv}", f"train.run_dir={run}",
        "data.loader.batch_size=4", "optim.effective_batch=4", "prototypes.num_clusters=[2, 4]",
        "prototypes.warmup_epochs=2", "stages.0.epochs=5", "stages.1.epochs=2",
        "data.loader.num_workers=512",  # more than any machine here: capped at the CPUs (data.loader_workers)
    ]  # fmt: skip
    result = pcav("pretrain", "--recipe", "demo", *overrides)
    assert result.returncode == 0, result.stderr
    assert "pcav pretrain" in result.stdout and f"run folder: {run}" in result.stdout
    assert "runtime: cpu, fp32 (auto: " in result.stdout and " compute thread" in result.stdout  # the run header
    workers = loader_workers(512)
    assert f"loader: {workers} worker process{'es' * (workers != 1)} per loader (data.loader.num_workers 512" in result.stdout
    assert "DataLoader will create" not in result.stderr  # torch's warning about more workers than CPUs

    assert sorted(p.name for p in run.iterdir()) == ["README.md", "checkpoints", "config.yaml", "labels.csv",
                                                    "metrics.jsonl", "prototypes", "tensorboard"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best", "last"]
    last = run / "checkpoints" / "last"
    assert {"model.safetensors", "momentum.safetensors", "state.pt", "config.yaml"} <= {p.name for p in last.iterdir()}
    assert torch.load(last / "state.pt", weights_only=True)["train"]["epoch"] == 7
    # Prototypes exist for every epoch after the 2 warm-up epochs, and only for those.
    expected = [f"prototypes-epoch{e:04d}.safetensors" for e in range(3, 8)]  # numbers, from 1
    assert sorted(p.name for p in (run / "prototypes").iterdir()) == expected

    lines = read_metrics(run / "metrics.jsonl")
    assert all({f"loss_{p}" for p in LOSS_PARTS} <= set(line) for line in lines)
    epochs = [line for line in lines if line["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, 8))
    assert [e["stage"] for e in epochs] == ["joint"] * 5 + ["encoders"] * 2
    assert [e["prototypes"] for e in epochs] == [False, False] + [True] * 5
    # validated on the held-out clips every 4th epoch (the demo recipe) and after the last; best
    # holds the (last) epoch at the best kNN
    assert all(e["metric"] == "knn_joint" for e in epochs)
    validated = [e for e in epochs if "val_knn_joint" in e]
    assert [e["epoch"] for e in validated] == [4, 7] and all(e["val_knn_joint"] is not None for e in validated)
    best_value = max(e["val_knn_joint"] for e in validated)
    best_epoch = [e["epoch"] for e in validated if e["val_knn_joint"] == best_value][-1]
    assert torch.load(run / "checkpoints/best/state.pt", weights_only=True)["train"]["best_epoch"] + 1 == best_epoch
    first, last_joint, final = epochs[0], epochs[4], epochs[-1]
    assert final["loss_total"] < first["loss_total"]
    # Within the first stage, the parts that train from the start fall too.
    assert last_joint["loss_r"] < first["loss_r"] and last_joint["loss_infonce"] < first["loss_infonce"]

    again = pcav("pretrain", "--recipe", "demo", *overrides)
    assert again.returncode == 1
    assert "already holds a run" in again.stderr and "train.resume=true" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
