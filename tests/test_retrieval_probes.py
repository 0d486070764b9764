"""Retrieval ranks on a hand-made 4x4 similarity matrix; linear probe and kNN on synthetic data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pcavmae_cli.engine.evaluate.probes import knn, linear_probe, standardise
from pcavmae_cli.engine.evaluate.retrieval import pair_ranks, retrieval_metrics, similarity_matrix

# Audio clip i is the one-hot e_i and video clip j is column j of M, so S = M / sqrt(30): every
# column of M is a permutation of 1..4 and has norm sqrt(30). Ranks count entries >= the
# diagonal (ties against).
M = [
    [4, 4, 1, 1],
    [3, 1, 2, 2],
    [2, 2, 3, 4],
    [1, 3, 4, 3],
]
# audio->video, rows:    row 0 (4,4,1,1) diag 4 -> 2 (tie); row 1 (3,1,2,2) diag 1 -> 4;
#                        row 2 (2,2,3,4) diag 3 -> 2;       row 3 (1,3,4,3) diag 3 -> 3 (tie)
A2V = [2, 4, 2, 3]
# video->audio, columns: col 0 (4,3,2,1) diag 4 -> 1; col 1 (4,1,2,3) diag 1 -> 4;
#                        col 2 (1,2,3,4) diag 3 -> 2; col 3 (1,2,4,3) diag 3 -> 2
V2A = [1, 4, 2, 2]


def paired():
    audio = torch.eye(4)
    video = torch.tensor(M, dtype=torch.float32).T  # row j = column j of M
    return audio, video


def test_similarity_is_cosine():
    audio, video = paired()
    sim = similarity_matrix(audio * 3.0, video)  # scale does not matter
    assert torch.allclose(sim * math.sqrt(30), torch.tensor(M, dtype=torch.float32))


def test_pair_ranks_by_hand():
    audio, video = paired()
    assert pair_ranks(audio, video).tolist() == A2V
    assert pair_ranks(video, audio).tolist() == V2A
    assert pair_ranks(audio, video, chunk_size=3).tolist() == A2V  # chunking changes nothing


def test_retrieval_metrics_by_hand():
    audio, video = paired()
    m = retrieval_metrics(audio.numpy(), video.numpy(), ks=(1, 2, 3, 5))
    # a2v ranks 2 4 2 3
    assert (m["a2v_r1"], m["a2v_r2"], m["a2v_r3"]) == (0.0, 0.5, 0.75)
    assert m["a2v_r5"] is None and m["v2a_r5"] is None  # k >= N clips: every clip is within k, says nothing
    assert m["a2v_median_rank"] == 2.5  # median of 2 2 3 4
    assert m["a2v_mean_rank"] == pytest.approx(11 / 4)
    # v2a ranks 1 4 2 2
    assert (m["v2a_r1"], m["v2a_r2"], m["v2a_r3"]) == (0.25, 0.75, 0.75)
    assert m["v2a_median_rank"] == 2.0
    assert m["v2a_mean_rank"] == pytest.approx(9 / 4)
    assert m["n"] == 4


def test_default_cutoffs_and_extremes():
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    perfect = retrieval_metrics(x, x)
    assert perfect["a2v_r1"] == perfect["v2a_r1"] == 1.0 and perfect["a2v_median_rank"] == 1.0
    assert set(perfect) >= {f"{d}_r{k}" for d in ("a2v", "v2a") for k in (1, 5, 10)}
    collapsed = retrieval_metrics(torch.ones(6, 8), torch.ones(6, 8))  # all similarities tie
    assert collapsed["a2v_r1"] == 0.0 and collapsed["a2v_median_rank"] == 6.0


def clusters(n_per_class: int, seed: int, centres: torch.Tensor, noise: float):
    """Points around each centre; labels are the centre index."""
    g = torch.Generator().manual_seed(seed)
    c, d = centres.shape
    x = centres.repeat_interleave(n_per_class, 0) + noise * torch.randn(c * n_per_class, d, generator=g)
    y = torch.arange(c).repeat_interleave(n_per_class)
    return x, y


def separable(n: int, seed: int):
    """Labels by the sign of a fixed direction, points within 0.5 of the boundary dropped."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    margin = x[:, 0] + x[:, 1] - x[:, 2]
    keep = margin.abs() > 0.5
    return x[keep], (margin[keep] > 0).long()


def test_standardise_uses_training_statistics():
    train = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    test = torch.tensor([[5.0, 7.0]])
    tr, te = standardise(train, test)
    assert torch.allclose(tr, torch.tensor([[-1.0, 0.0], [1.0, 0.0]]))  # mean (2, 5), std (1, -)
    assert torch.allclose(te, torch.tensor([[3.0, 2.0]]))  # the constant feature is only centred


def test_linear_probe_separates_separable_data_deterministically():
    xtr, ytr = separable(400, seed=1)
    xte, yte = separable(200, seed=2)
    first = linear_probe(xtr, ytr, xte, yte, "single", weight_decay=1e-3, max_iter=200)
    assert first.metrics["top1"] == 1.0
    assert first.scores.shape == (len(xte), 2)
    assert first.metrics["lbfgs_iterations"] > 0 and math.isfinite(first.metrics["train_loss"])
    numpy_in = (xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy())
    again = linear_probe(*numpy_in, "single", weight_decay=1e-3, max_iter=200)
    assert torch.equal(first.scores, again.scores)


def test_linear_probe_multi_label_map_is_one():
    xtr, _ = separable(400, seed=3)
    xte, _ = separable(200, seed=4)
    # class c is on when feature c is positive, with margin; train and test keep clear points only
    def labels(x):
        keep = (x[:, :3].abs() > 0.3).all(dim=1)
        return x[keep], (x[keep, :3] > 0).float()

    (xtr, ytr), (xte, yte) = labels(xtr), labels(xte)
    names = ["a", "b", "c"]
    result = linear_probe(xtr, ytr, xte, yte, "multi_hot", weight_decay=1e-3, max_iter=200, class_names=names)
    assert result.metrics["mAP"] == pytest.approx(1.0)
    assert sorted(r.name for r in result.classes) == names


def test_weight_decay_shrinks_the_probe():
    xtr, ytr = separable(200, seed=5)
    weak = linear_probe(xtr, ytr, xtr, ytr, "single", weight_decay=1e-3, max_iter=200)
    strong = linear_probe(xtr, ytr, xtr, ytr, "single", weight_decay=10.0, max_iter=200)
    assert strong.scores.abs().max() < weak.scores.abs().max()


def test_knn_by_hand():
    # train points on the unit circle at 0, 30, 90 and 180 degrees, classes 0 0 1 1; test at 10 deg
    angles = torch.deg2rad(torch.tensor([0.0, 30.0, 90.0, 180.0]))
    xtr = torch.stack([angles.cos(), angles.sin()], dim=1)
    ytr = torch.tensor([0, 0, 1, 1])
    xte = torch.tensor([[math.cos(math.radians(10)), math.sin(math.radians(10))]])
    yte = torch.tensor([1])
    # k = 3 neighbours: 0 deg (class 0), 30 deg (class 0), 90 deg (class 1)
    uniform = knn(xtr, ytr, xte, yte, "single", k=3, weighting="uniform")
    assert uniform.scores[0].tolist() == pytest.approx([2 / 3, 1 / 3])
    assert uniform.metrics["top1"] == 0.0
    t = 0.5
    w = [math.exp(math.cos(math.radians(a)) / t) for a in (10, 20, 80)]  # angles to the test point
    weighted = knn(xtr, ytr, xte, yte, "single", k=3, weighting="similarity", temperature=t)
    assert weighted.scores[0].tolist() == pytest.approx([(w[0] + w[1]) / sum(w), w[2] / sum(w)], rel=1e-5)


def test_knn_recovers_clusters():
    centres = 3.0 * torch.eye(4, 8)
    xtr, ytr = clusters(20, seed=6, centres=centres, noise=0.3)
    xte, yte = clusters(10, seed=7, centres=centres, noise=0.3)
    for weighting in ("uniform", "similarity"):
        result = knn(xtr, ytr, xte, yte, "single", k=5, weighting=weighting)
        assert result.metrics["top1"] == 1.0
        assert torch.equal(result.scores, knn(xtr, ytr, xte, yte, "single", k=5, weighting=weighting).scores)
    # multi-label: cluster c carries labels {c, c + 1 mod 4}; scores are neighbour-label averages
    multi = torch.zeros(4, 4)
    for c in range(4):
        multi[c, c] = multi[c, (c + 1) % 4] = 1
    result = knn(xtr, multi[ytr], xte, multi[yte], "multi_hot", k=5, chunk_size=7)
    assert result.metrics["mAP"] == pytest.approx(1.0)


def test_knn_with_k_above_train_size_uses_all():
    xtr = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    result = knn(xtr, torch.tensor([0, 1]), xtr, torch.tensor([0, 1]), "single", k=10, weighting="uniform")
    assert result.scores.tolist() == [[0.5, 0.5], [0.5, 0.5]]
    assert result.metrics["top1"] == 0.0  # tied votes count against


def test_probe_inputs_are_checked():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="rows"):
        knn(x, np.array([0, 1]), x, np.array([0, 1, 0]), "single")
    with pytest.raises(ValueError, match="label_mode"):
        linear_probe(x, np.array([0, 1, 0]), x, np.array([0, 1, 0]), "multi")
    with pytest.raises(ValueError, match="k must"):
        knn(x, np.array([0, 1, 0]), x, np.array([0, 1, 0]), "single", k=0)
    with pytest.raises(ValueError, match="out of range"):
        linear_probe(x, np.array([0, 1, 2]), x, np.array([0, 1, 0]), "single", num_classes=2)
