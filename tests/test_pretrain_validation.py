"""Validation during pre-training: the figures on hand-made features, and a run whose
``checkpoints/best`` is chosen by the validation metric that ``pcav evaluate`` reproduces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pcavmae_cli.engine import config
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.evaluate.probes import knn
from pcavmae_cli.engine.evaluate.runner import evaluate
from pcavmae_cli.engine.prototypes.step import Prototypes
from pcavmae_cli.engine.train.metrics import best_validated, read_metrics
from pcavmae_cli.engine.train.pretrain import pretrain
from pcavmae_cli.engine.train.pretrain_validation import label_lists, validation_metrics
from tests.tiny_corpus import TINY_MODEL, write_corpus


def test_leave_one_out_knn_never_takes_a_clip_as_its_own_neighbour():
    # 1-D points 0, 0.1 (class 0) and 5, 5.2, 9 (class 1, 1, 0); as 2-D unit vectors by angle.
    angles = torch.tensor([0.0, 0.1, 1.2, 1.3, 0.05])
    x = torch.stack([angles.cos(), angles.sin()], dim=1)
    y = torch.tensor([0, 0, 1, 1, 1])
    # k = 1: each clip takes its nearest *other* clip: 0 -> 4 (angle 0.05, class 1): a miss;
    # 1 -> 4: miss; 2 -> 3: hit; 3 -> 2: hit; 4 -> 0 (0.05 away, nearer than 0.1): miss.
    result = knn(x, y, x, y, "single", k=1, weighting="uniform", leave_one_out=True)
    assert result.metrics["top1"] == pytest.approx(2 / 5)
    # without leave-one-out every clip finds itself: 100 %
    assert knn(x, y, x, y, "single", k=1, weighting="uniform").metrics["top1"] == 1.0
    with pytest.raises(ValueError, match="training clips"):
        knn(x, y, x[:3], y[:3], "single", leave_one_out=True)


def test_validation_figures_on_hand_made_features():
    # 4 clips, 2 classes (0, 0, 1, 1). Joint and video features: one axis per class. Audio: clip 1
    # sounds like class 1. z_a: one axis per clip; z_v of clips 2 and 3 are swapped, nearly.
    e = torch.eye(4)
    feats = {
        "joint": torch.stack([e[0], e[0], e[1], e[1]]),
        "audio": torch.stack([e[0], e[1], e[1], e[1]]),
        "video": torch.stack([e[0], e[0], e[1], e[1]]),
        "z_a": torch.stack([e[0], e[1], e[2], e[3]]),
        "z_v": F.normalize(torch.stack([e[0], e[1], e[2] + 0.1 * e[3], e[2]]), dim=1),
    }
    y = torch.tensor([0, 0, 1, 1])
    one_vote = {"k": 1, "weighting": "uniform", "temperature": 0.07}
    figures = validation_metrics(feats, y, "single", None, one_vote)
    # leave-one-out, k = 1: in joint and video every clip's nearest other clip is its class twin
    assert figures["knn_joint"] == 1.0 and figures["knn_video"] == 1.0
    assert figures["knn_audio"] < 1.0  # clip 1's nearest other clips (2, 3) are of class 1: a miss
    # a->v: audio 0 and 1 find their partners; audio 2 (= e2) prefers video 3 (= e2, cos 1) to its
    # partner (cos 0.995); audio 3 (= e3) prefers video 2 (cos 0.0995) to video 3 (cos 0)
    assert figures["a2v_r1"] == pytest.approx(0.5)
    assert figures["a2v_r5"] is None  # k >= N: says nothing, null
    assert figures["purity"] is None and figures["nmi"] is None  # no prototypes yet
    # with a gallery the references' labels decide: every label flipped, every vote wrong
    gallery = ({k: v.clone() for k, v in feats.items()}, torch.tensor([1, 1, 0, 0]))
    flipped = validation_metrics(feats, y, "single", None, one_vote, gallery)
    assert flipped["knn_joint"] == 0.0 and flipped["knn_video"] == 0.0


def test_purity_and_nmi_follow_the_nearest_joint_prototype():
    e = torch.eye(4)
    feats = {k: torch.stack([e[0], e[0], e[1], e[1]]) for k in ("joint", "audio", "video")}
    feats["z_a"] = feats["z_v"] = torch.stack([e[0], e[0], e[1], e[1]])
    y = torch.tensor([0, 0, 1, 1])
    def prototypes(centroids: torch.Tensor) -> Prototypes:
        k = len(centroids)
        return Prototypes(centroids=centroids, p_a=centroids, p_v=centroids, gamma=torch.ones(k),
                          assignments=torch.zeros(4, dtype=torch.long), counts=torch.ones(k, dtype=torch.long))  # fmt: skip

    two, one = prototypes(torch.stack([e[0], e[1]])), prototypes(e[:1])
    figures = validation_metrics(feats, y, "single", [two, one])
    # joint_embedding(z_a, z_v) = z here. Two prototypes split the classes exactly; one
    # prototype holds both (purity 1/2, NMI 0)
    assert figures["purity"] == [1.0, 0.5] and figures["nmi"] == [1.0, 0.0]
    assert label_lists(torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]), "multi_hot") == [["1", "2"], ["0"]]
    no_labels = validation_metrics(feats, None, "single", [two])
    assert no_labels["knn_joint"] is None and no_labels["purity"] is None and no_labels["a2v_r1"] is not None


def test_best_validated_takes_the_last_epoch_at_the_highest_value():
    epochs = [{"epoch": 0, "metric": "knn_joint"}, {"epoch": 1, "metric": "knn_joint", "val_knn_joint": 0.5},
              {"epoch": 2, "metric": "knn_joint", "val_knn_joint": 0.75}, {"epoch": 3, "metric": "knn_joint",
              "val_knn_joint": 0.75}, {"epoch": 4, "metric": "knn_joint", "val_knn_joint": None}]  # fmt: skip
    assert best_validated(epochs) == ("knn_joint", 0.75, 3)  # a tie: the later epoch, trained longer
    assert best_validated([{"epoch": 0, "loss_total": 1.0}]) is None


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("validated")
    train = write_corpus(root, classes=3, per_class=4, name="train")
    held_out = write_corpus(root, classes=3, per_class=2, seed=1, name="eval")
    overrides = [
        *TINY_MODEL, f"data.train_manifest={train}", f"data.eval_manifest={held_out}",
        f"data.label_csv={root / 'labels.csv'}", f"train.run_dir={root / 'run'}",
        "prototypes.num_clusters=[2, 3]", "prototypes.warmup_epochs=1", "optim.effective_batch=4",
        "stages.0.epochs=3", "stages.1.epochs=1", "train.log_every=2", "validation.every_epochs=2",
        "validation.figures_every_epochs=4",
    ]  # fmt: skip
    cfg = config.load_recipe("demo", overrides)
    return root, held_out, cfg, pretrain(cfg)


def test_pretraining_validates_and_picks_best_by_the_validation_metric(validated_run):
    root, held_out, cfg, result = validated_run
    epochs = read_metrics(root / "run" / "metrics.jsonl", "epoch")
    assert [e["metric"] for e in epochs] == ["knn_joint"] * 4
    validated = [e["epoch"] for e in epochs if "val_knn_joint" in e]
    assert validated == [2, 4]  # every 2nd epoch and the last (epochs are numbered from 1)
    for e in epochs:
        if e["epoch"] in validated:
            assert {"val_knn_audio", "val_knn_video", "val_a2v_r1", "val_v2a_r1", "eval_seconds"} <= set(e)
            assert len(e["val_purity"]) == 2 and len(e["val_nmi"]) == 2  # prototypes were on: one per granularity
    # the E-step's figures: per granularity, the largest cluster's share and gamma's range (null in warm-up)
    assert epochs[0]["proto_largest_share"] is None
    for e in epochs[1:]:
        assert len(e["proto_largest_share"]) == 2 and all(0 < s <= 1 for s in e["proto_largest_share"])
        assert all(lo <= hi for lo, hi in zip(e["proto_gamma_min"], e["proto_gamma_max"]))
    metric, value, index = best_validated(epochs)
    state = torch.load(root / "run" / "checkpoints" / "best" / "state.pt", weights_only=True)["train"]
    assert state["best_by"] == "val_knn_joint" and state["best_epoch"] + 1 == epochs[index]["epoch"]  # state: 0-based
    assert state["best_metric"] == pytest.approx(value)
    # `pcav evaluate --task knn` on that checkpoint, same clips and frames: the same figure
    again = evaluate("knn", result.best, held_out, frames="middle")
    assert again.metrics["top1"] == pytest.approx(value, abs=1e-6)
    # TensorBoard has the validation scalars
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(root / "run" / "tensorboard"))
    events.Reload()
    assert {"epoch/val_knn_joint", "epoch/val_a2v_r1", "epoch/val_purity/g0"} <= set(events.Tags()["scalars"])
    # the figures of the 4th epoch, as files and as TensorBoard images at that epoch's last step
    assert sorted(p.name for p in (root / "run" / "plots").iterdir()) == ["epoch0004"]
    assert sorted(p.name for p in (root / "run" / "plots" / "epoch0004").iterdir()) == ["reconstruct.png", "tsne.png"]
    assert set(events.Tags()["images"]) == {"figures/tsne", "figures/reconstruct"}
    assert [e.step for e in events.Images("figures/tsne")] == [epochs[3]["step"]]


def test_a_missing_eval_manifest_is_one_line_naming_the_key(validated_run, tmp_path):
    root, _, cfg, _ = validated_run
    bad = config.load_recipe("demo", [f"data.train_manifest={cfg.data.train_manifest}", *TINY_MODEL,
                                      f"data.eval_manifest={tmp_path / 'nope.jsonl'}", f"train.run_dir={tmp_path / 'r'}"])  # fmt: skip
    with pytest.raises(UserError, match="key 'data.eval_manifest'.*nope.jsonl not found.*every_epochs=0"):
        pretrain(bad)
    with pytest.raises(UserError, match="validation: 'metric' must be one of"):
        config.load_recipe("demo", ["validation.metric=knn"])


def test_validation_runs_every_nth_epoch_the_last_and_where_figures_are_drawn():
    from pcavmae_cli.engine.schema import ValidationConfig
    from pcavmae_cli.engine.train.pretrain_validation import PretrainValidation

    v = object.__new__(PretrainValidation)  # only the schedule: no eval set needed
    v.cfg = ValidationConfig(every_epochs=4, figures_every_epochs=17)
    validated = [e + 1 for e in range(34) if v.due(e, final=e == 33)]
    assert validated == [4, 8, 12, 16, 17, 20, 24, 28, 32, 34]  # epoch numbers, from 1
    assert [e + 1 for e in range(34) if v.figures_due(e)] == [17, 34]
