"""Classification metrics: expected values are worked out by hand from the definitions."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch

from pcavmae_cli.engine.evaluate.metrics import (
    classification_metrics,
    d_prime,
    per_class_ap_auc,
    topk_hits,
)

# 4 clips, 3 classes.
# class 0: ranking by score 0.9(+) 0.8(-) 0.7(+) 0.6(-): AP = (1/1 + 2/3) / 2 = 5/6;
#          AUC = positive-over-negative pairs: (0.9>0.8, 0.9>0.6, 0.7<0.8, 0.7>0.6) = 3/4.
# class 1: ranking 0.4(+) 0.3(+) 0.2(-) 0.1(-): AP = 1, AUC = 1.
# class 2: no positive: skipped from mAP and mean AUC.
SCORES = [
    [0.9, 0.1, 0.5],
    [0.8, 0.4, 0.2],
    [0.7, 0.3, 0.9],
    [0.6, 0.2, 0.1],
]
TARGETS = [
    [1, 0, 0],
    [0, 1, 0],
    [1, 1, 0],
    [0, 0, 0],
]


def test_per_class_ap_and_auc_by_hand():
    ap, auc = per_class_ap_auc(np.array(SCORES), np.array(TARGETS))
    assert ap[0] == pytest.approx((1 + 2 / 3) / 2)
    assert auc[0] == pytest.approx(3 / 4)
    assert ap[1] == pytest.approx(1.0) and auc[1] == pytest.approx(1.0)
    assert math.isnan(ap[2]) and math.isnan(auc[2])


def test_multilabel_summary_skips_class_without_positives():
    names = ["dog", "cat", "owl"]
    summary, rows = classification_metrics(np.array(SCORES), np.array(TARGETS), "multi_hot", names)
    assert summary["mAP"] == pytest.approx((5 / 6 + 1) / 2)
    assert summary["mAUC"] == pytest.approx((3 / 4 + 1) / 2)
    assert summary["d_prime"] == pytest.approx(math.sqrt(2) * NormalDist().inv_cdf(7 / 8))
    assert summary["classes"] == 3
    assert summary["classes_without_positives"] == 1
    assert summary["classes_without_negatives"] == 0
    # sorted by AP, best first; the skipped class last with no AP / AUC
    assert [(r.index, r.name, r.positives) for r in rows] == [(1, "cat", 2), (0, "dog", 2), (2, "owl", 0)]
    assert rows[1].ap == pytest.approx(5 / 6) and rows[1].auc == pytest.approx(3 / 4)
    assert rows[2].ap is None and rows[2].auc is None


def test_class_with_only_positives_has_ap_but_no_auc():
    scores = np.array([[0.2, 0.9], [0.1, 0.3], [0.7, 0.5]])
    targets = np.array([[1, 0], [1, 1], [1, 0]])  # class 0 positive everywhere
    summary, rows = classification_metrics(scores, targets, "multi_hot")
    # class 1: ranking 0.9(-) 0.5(-) 0.3(+): AP = 1/3, AUC = 0
    assert summary["mAP"] == pytest.approx((1 + 1 / 3) / 2)
    assert summary["mAUC"] == pytest.approx(0.0)
    assert summary["classes_without_negatives"] == 1
    assert rows[0].index == 0 and rows[0].ap == pytest.approx(1.0) and rows[0].auc is None
    assert rows[0].name == "0"


def test_torch_and_numpy_inputs_agree():
    a, _ = classification_metrics(np.array(SCORES), np.array(TARGETS), "multi_hot")
    targets = torch.tensor(TARGETS, dtype=torch.float32)
    b, _ = classification_metrics(torch.tensor(SCORES), targets, "multi_hot")
    assert a == pytest.approx(b)


def test_d_prime_known_values():
    assert d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    # Phi(1) = 0.8413...: d' = sqrt(2) * 1
    assert d_prime(NormalDist().cdf(1.0)) == pytest.approx(math.sqrt(2))
    assert d_prime(NormalDist().cdf(-0.5)) == pytest.approx(-0.5 * math.sqrt(2))
    assert d_prime(1.0) == math.inf


def test_top1_top5_by_hand():
    # 3 clips, 6 classes; the true class ranks 1st, 3rd and 6th.
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],  # true 0: rank 1
            [0.1, 0.7, 0.8, 0.9, 0.2, 0.3],  # true 1: rank 3
            [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],  # true 5: rank 6
        ]
    )
    targets = np.array([0, 1, 5])
    summary, _ = classification_metrics(scores, targets, "single")
    assert summary["top1"] == pytest.approx(1 / 3)
    assert summary["top5"] == pytest.approx(2 / 3)


def test_topk_clipped_to_number_of_classes():
    scores = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    targets = np.array([0, 2])  # both ranked last of 3
    summary, _ = classification_metrics(scores, targets, "single")
    assert summary["top1"] == 0.0
    assert summary["top5"] == 1.0  # top-5 of 3 classes is top-3


def test_ties_count_against_the_model():
    scores = np.zeros((4, 3))  # a constant output
    assert not topk_hits(scores, np.array([0, 1, 2, 0]), 1).any()
    assert topk_hits(scores, np.array([0, 1, 2, 0]), 3).all()
    # two classes tied at the top: top-1 miss, top-2 hit
    assert not topk_hits(np.array([[0.5, 0.5, 0.1]]), np.array([0]), 1)[0]
    assert topk_hits(np.array([[0.5, 0.5, 0.1]]), np.array([0]), 2)[0]


def test_per_class_accuracy_sorted_and_empty_class_last():
    # labels 0 0 1 1, top-1 predictions 0 1 1 1: class 0 -> 1/2, class 1 -> 2/2, class 2 has no clip
    scores = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1]])
    targets = torch.tensor([0, 0, 1, 1])
    summary, rows = classification_metrics(scores, targets, "single", ["a", "b", "c"])
    assert summary["top1"] == pytest.approx(3 / 4)
    assert summary["mean_class_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    assert summary["classes_without_positives"] == 1
    assert [(r.name, r.accuracy, r.positives) for r in rows] == [("b", 1.0, 2), ("a", 0.5, 2), ("c", None, 0)]
    assert all(r.ap is None for r in rows)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="label_mode"):
        classification_metrics(np.array(SCORES), np.array(TARGETS), "multi")
    with pytest.raises(ValueError, match="nan"):
        classification_metrics(np.array([[math.nan, 0.0]]), np.array([0]), "single")
    with pytest.raises(ValueError, match="range"):
        classification_metrics(np.zeros((1, 2)), np.array([2]), "single")
    with pytest.raises(ValueError, match="integer"):
        classification_metrics(np.zeros((1, 2)), np.array([1.0]), "single")
    with pytest.raises(ValueError, match="0 or 1"):
        classification_metrics(np.zeros((1, 2)), np.array([[0.5, 1]]), "multi_hot")
    with pytest.raises(ValueError, match="class names"):
        classification_metrics(np.array(SCORES), np.array(TARGETS), "multi_hot", ["only one"])
