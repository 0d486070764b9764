"""Frozen-feature evaluation on clip embeddings: a linear probe and a cosine kNN classifier.

Both take train features / labels and test features / labels and score the test clips with
``metrics.classification_metrics`` (single-label: top-1 accuracy and friends; multi-label:
mAP and friends). Shapes, with D the feature width and C the number of classes:

- features: (N, D) numpy or torch;
- labels: ``"multi_hot"``: (N, C) 0/1; ``"single"``: (N,) class indices.

Nothing is random: the linear probe starts from zero weights and uses full-batch L-BFGS (the
problem is convex, so the start does not matter), and kNN is a sort. The results are therefore
the same on every run on a given device, without a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.evaluate.metrics import ClassRow, LabelMode, classification_metrics


@dataclass
class ProbeResult:
    """``metrics``: the summary of ``classification_metrics`` (plus the probe's own entries);
    ``classes``: its per-class rows; ``scores``: (N_test, C) test scores on the CPU."""

    metrics: dict[str, float]
    classes: list[ClassRow]
    scores: Tensor


def _tensor(x: np.ndarray | Tensor, device: torch.device | None) -> Tensor:
    t = x.detach() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device) if device is not None else t


def _targets(
    train_y: Tensor, test_y: Tensor, label_mode: LabelMode, num_classes: int | None
) -> tuple[Tensor, int]:
    """Training targets as float (N, C) (multi-hot) or long (N,), and the class count."""
    if label_mode == "multi_hot":
        if train_y.ndim != 2 or test_y.ndim != 2 or train_y.shape[1] != test_y.shape[1]:
            shapes = f"{tuple(train_y.shape)} and {tuple(test_y.shape)}"
            raise ValueError(f"multi-hot labels must be (N, C), got {shapes}")
        return train_y.float(), train_y.shape[1]
    if label_mode == "single":
        if train_y.ndim != 1 or test_y.ndim != 1:
            raise ValueError(
                f"single labels must be (N,), got {tuple(train_y.shape)} and {tuple(test_y.shape)}"
            )
        if num_classes is None:
            num_classes = 1 + max(int(train_y.max()), int(test_y.max()) if len(test_y) else 0)
        if int(train_y.min()) < 0 or int(train_y.max()) >= num_classes:
            raise ValueError(f"training labels out of range [0, {num_classes})")
        return train_y.long(), num_classes
    raise ValueError(f"label_mode must be 'multi_hot' or 'single', got {label_mode!r}")


def _class_count(num_classes: int | None, class_names: Sequence[str] | None) -> int | None:
    return num_classes if num_classes is not None or class_names is None else len(class_names)


def _check_features(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> None:
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        shapes = f"{tuple(train_x.shape)} and {tuple(test_x.shape)}"
        raise ValueError(f"features must be (N, D) with one D, got {shapes}")
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("features and labels must have the same number of rows")
    if len(train_x) == 0:
        raise ValueError("no training clips")


def standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Centre and scale both sets by the training mean and standard deviation per feature.

    A feature constant on the training set (std 0) is only centred.
    """
    mean = train_x.mean(dim=0)
    std = train_x.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (train_x - mean) / std, (test_x - mean) / std


def linear_probe(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor,
    label_mode: LabelMode,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 1000,
    tolerance: float = 1e-7,
    history_size: int = 20,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> ProbeResult:
    """Logistic regression on standardised frozen features, fitted by full-batch L-BFGS.

    Objective (fp32), with W (D, C) and bias b (C) starting at zero:
    ``mean_n loss_n + weight_decay / 2 * ||W||_F^2`` (the bias is not decayed), where loss_n is
    the softmax cross-entropy (``"single"``) or the binary cross-entropy summed over the C
    classes (``"multi_hot"``). L-BFGS (strong-Wolfe line search) stops after ``max_iter``
    iterations or when the largest gradient entry falls below ``tolerance``.

    Args:
        train_x, test_x: (N, D) features. train_y, test_y: labels of ``label_mode``.
        weight_decay: L2 coefficient on W (0 leaves separable data without a minimum).
        max_iter, tolerance, history_size: L-BFGS iterations, gradient tolerance, memory.
        num_classes: single-label class count (default ``len(class_names)``, else 1 + the
            largest label seen); multi-hot takes C from the labels.
        class_names: C names for the per-class table.
        device: where to fit (default: the device of ``train_x``).
    Returns:
        ``ProbeResult``; ``metrics`` adds ``train_loss`` (final objective) and
        ``lbfgs_iterations``; ``scores`` are test logits.
    """
    dev = torch.device(device) if device is not None else None
    xtr, xte = _tensor(train_x, dev).float(), _tensor(test_x, dev).float()
    ytr_raw, yte = _tensor(train_y, xtr.device), _tensor(test_y, None)
    _check_features(xtr, ytr_raw, xte, yte)
    ytr, c = _targets(ytr_raw, yte, label_mode, _class_count(num_classes, class_names))
    xtr, xte = standardise(xtr, xte)

    weight = torch.zeros(xtr.shape[1], c, device=xtr.device, requires_grad=True)
    bias = torch.zeros(c, device=xtr.device, requires_grad=True)
    optimiser = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tolerance,
        history_size=history_size,
        line_search_fn="strong_wolfe",
    )

    def objective() -> Tensor:
        logits = xtr @ weight + bias  # (N, C)
        if label_mode == "single":
            data = F.cross_entropy(logits, ytr)
        else:
            data = F.binary_cross_entropy_with_logits(logits, ytr, reduction="sum") / len(xtr)
        return data + 0.5 * weight_decay * weight.pow(2).sum()

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    with torch.autocast(device_type=xtr.device.type, enabled=False):
        optimiser.step(closure)
        with torch.no_grad():
            train_loss = float(objective())
            scores = (xte @ weight + bias).cpu()
    summary, rows = classification_metrics(scores, yte.cpu(), label_mode, class_names)
    iterations = optimiser.state[weight].get("n_iter", 0)  # L-BFGS keeps its state on the first parameter
    summary = {**summary, "train_loss": train_loss, "lbfgs_iterations": int(iterations)}
    return ProbeResult(metrics=summary, classes=rows, scores=scores)


def knn(
    train_x: np.ndarray | Tensor,
    train_y: np.ndarray | Tensor,
    test_x: np.ndarray | Tensor,
    test_y: np.ndarray | Tensor,
    label_mode: LabelMode,
    *,
    k: int = 20,
    weighting: Literal["uniform", "similarity"] = "similarity",
    temperature: float = 0.07,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
    leave_one_out: bool = False,
) -> ProbeResult:
    """Cosine k-nearest-neighbour classification of the test clips by the training clips.

    Each test clip takes its ``min(k, N_train)`` most cosine-similar training clips. Its score
    for class c is the weighted share of neighbours labelled c: sum_j w_j y_jc / sum_j w_j,
    with y_j the neighbour's one-hot (single) or multi-hot label. ``"uniform"``: w_j = 1 (a
    majority vote; tied votes are misses, see ``metrics``). ``"similarity"``: w_j =
    exp(s_j / temperature) (the weighted kNN of InstDisc / DINO, whose defaults are k = 20,
    temperature = 0.07). Neighbours tied at the k-th place are chosen by ``torch.topk``.

    Args:
        train_x, test_x: (N, D) features (normalised here). train_y, test_y: labels.
        k, weighting, temperature: the vote (temperature unused for ``"uniform"``).
        num_classes, class_names: as in ``linear_probe``.
        chunk_size: test rows per similarity block (memory chunk_size x N_train, and
            chunk_size x k x C for multi-hot labels).
        device: where to compute (default: the device of ``train_x``).
        leave_one_out: the test clips *are* the training clips (same rows, same order) and
            each is classified by the others: its own row is never a neighbour, so k is at most
            N - 1. Pre-training's validation uses it to score a labelled eval set on its own.
    Returns:
        ``ProbeResult``; ``scores`` are the vote shares.
    """
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    if weighting not in ("uniform", "similarity"):
        raise ValueError(f"weighting must be 'uniform' or 'similarity', got {weighting!r}")
    dev = torch.device(device) if device is not None else None
    xtr = F.normalize(_tensor(train_x, dev).float(), dim=-1)
    xte = F.normalize(_tensor(test_x, xtr.device).float(), dim=-1)
    ytr_raw, yte = _tensor(train_y, xtr.device), _tensor(test_y, None)
    _check_features(xtr, ytr_raw, xte, yte)
    ytr, c = _targets(ytr_raw, yte, label_mode, _class_count(num_classes, class_names))
    if leave_one_out and xtr.shape != xte.shape:
        raise ValueError("leave_one_out needs the test clips to be the training clips")
    if leave_one_out and len(xtr) < 2:
        raise ValueError("leave_one_out needs at least 2 clips")
    kk = min(k, len(xtr) - 1 if leave_one_out else len(xtr))
    scores = []
    for start in range(0, len(xte), chunk_size):
        sim = xte[start : start + chunk_size] @ xtr.T  # (chunk, N_train)
        if leave_one_out:  # a clip is not its own neighbour
            rows = torch.arange(len(sim), device=sim.device)
            sim[rows, rows + start] = -torch.inf
        top_sim, top_idx = sim.topk(kk, dim=1)  # (chunk, kk)
        if weighting == "uniform":
            w = torch.ones_like(top_sim)  # integer vote counts: equal votes stay exactly equal
        else:
            w = torch.exp((top_sim - top_sim[:, :1]) / temperature)  # exp(s / T), rescaled
        if label_mode == "single":
            share = torch.zeros(len(sim), c, device=sim.device).scatter_add_(1, ytr[top_idx], w)
        else:
            share = torch.einsum("bk,bkc->bc", w, ytr[top_idx])  # (chunk, kk, C) gathered labels
        scores.append((share / w.sum(dim=1, keepdim=True)).cpu())
    scores_t = torch.cat(scores) if scores else torch.zeros(0, c)
    summary, rows = classification_metrics(scores_t, yte.cpu(), label_mode, class_names)
    return ProbeResult(metrics=summary, classes=rows, scores=scores_t)
