"""Classification metrics: mAP / mean AUC / d' (multi-label), top-1 / top-5 (single-label).

Pure functions on score matrices; inputs may be numpy arrays or torch tensors (any device).
Shapes, with N clips and C classes:

- ``scores``: (N, C) real-valued, higher = more confident (logits, probabilities or votes;
  every metric here depends only on the ordering of scores).
- ``targets``: ``label_mode="multi_hot"``: (N, C) 0/1 (AudioSet); ``label_mode="single"``:
  (N,) integer class indices in [0, C) (VGGSound). These are the two forms
  ``engine.data.dataset`` yields.

Choices (docs/method.md, "Evaluation"):
- AP and AUC are sklearn's ``average_precision_score`` and ``roc_auc_score`` per class. A class
  with no positive in ``targets`` has neither and is left out of mAP and mean AUC; a class with
  no negative has no AUC and is left out of mean AUC. Both are counted in the summary.
- d' = sqrt(2) * Phi^-1(mean AUC), as in the AudioSet papers (AST, CAV-MAE); it is +inf at
  AUC 1 and -inf at AUC 0.
- Single-label ties count against the model: a clip is a top-k hit when fewer than k *other*
  classes score at least as high as its true class. A model that outputs a constant is
  therefore never right, instead of always right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

LabelMode = Literal["multi_hot", "single"]
ArrayLike = np.ndarray | torch.Tensor


@dataclass(frozen=True)
class ClassRow:
    """One line of the per-class table. Fields a label mode does not define are ``None``.

    ``positives``: clips of the class in the targets (multi-label: positive clips).
    ``ap`` / ``auc``: multi-label; ``None`` for a skipped class. ``accuracy``: single-label,
    the class's top-1 recall; ``None`` when it has no clip.
    """

    index: int
    name: str
    positives: int
    ap: float | None = None
    auc: float | None = None
    accuracy: float | None = None


def to_numpy(x: ArrayLike) -> np.ndarray:
    """A numpy view or copy of ``x`` (a torch tensor is detached and moved to the CPU)."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def d_prime(auc: float) -> float:
    """d' = sqrt(2) * Phi^-1(auc), Phi the standard normal CDF (0.5 -> 0, 1 -> +inf)."""
    phi_inv = torch.special.ndtri(torch.tensor(auc, dtype=torch.float64)).item()
    return math.sqrt(2.0) * phi_inv


def per_class_ap_auc(scores: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP and AUC, ``nan`` where undefined.

    Args:
        scores: (N, C). targets: (N, C) multi-hot 0/1.
    Returns:
        ap (C,): nan for a class with no positive. auc (C,): nan for a class with no positive
        or no negative.
    """
    s = to_numpy(scores).astype(np.float64)
    y = to_numpy(targets)
    _check_multi_hot(s, y)
    y = y.astype(bool)
    num_classes = s.shape[1]
    ap = np.full(num_classes, np.nan)
    auc = np.full(num_classes, np.nan)
    for c in range(num_classes):
        pos = int(y[:, c].sum())
        if pos == 0:
            continue
        ap[c] = average_precision_score(y[:, c], s[:, c])
        if pos < len(y):
            auc[c] = roc_auc_score(y[:, c], s[:, c])
    return ap, auc


def multilabel_metrics(
    scores: ArrayLike, targets: ArrayLike, class_names: Sequence[str] | None = None
) -> tuple[dict[str, float], list[ClassRow]]:
    """mAP, mean AUC, d' and the per-class table sorted by AP (best first, skipped classes last).

    Args:
        scores: (N, C). targets: (N, C) multi-hot 0/1. class_names: C names, or ``None`` for
        the class indices.
    Returns:
        ``{"mAP", "mAUC", "d_prime", "classes", "classes_without_positives",
        "classes_without_negatives"}`` (a metric over no class is nan) and one ``ClassRow`` per
        class.
    """
    ap, auc = per_class_ap_auc(scores, targets)
    y = to_numpy(targets).astype(bool)
    names = _names(class_names, ap.shape[0])
    positives = y.sum(axis=0)
    has_ap, has_auc = ~np.isnan(ap), ~np.isnan(auc)
    mean_auc = float(auc[has_auc].mean()) if has_auc.any() else math.nan
    summary = {
        "mAP": float(ap[has_ap].mean()) if has_ap.any() else math.nan,
        "mAUC": mean_auc,
        "d_prime": d_prime(mean_auc) if has_auc.any() else math.nan,
        "classes": int(ap.shape[0]),
        "classes_without_positives": int((positives == 0).sum()),
        "classes_without_negatives": int((positives == len(y)).sum()),
    }
    rows = [
        ClassRow(
            index=c,
            name=names[c],
            positives=int(positives[c]),
            ap=float(ap[c]) if has_ap[c] else None,
            auc=float(auc[c]) if has_auc[c] else None,
        )
        for c in range(ap.shape[0])
    ]
    rows.sort(key=lambda r: (r.ap is None, -(r.ap or 0.0), r.index))
    return summary, rows


def topk_hits(scores: ArrayLike, targets: ArrayLike, k: int) -> np.ndarray:
    """(N,) bool: the true class is among the top ``min(k, C)`` classes, ties counting against.

    Args:
        scores: (N, C). targets: (N,) class indices.
    """
    s = to_numpy(scores).astype(np.float64)
    y = to_numpy(targets)
    _check_single(s, y)
    true_score = s[np.arange(len(y)), y][:, None]  # (N, 1)
    others_at_least = (s >= true_score).sum(axis=1) - 1  # the true class itself always counts once
    return others_at_least < min(k, s.shape[1])


def singlelabel_metrics(
    scores: ArrayLike, targets: ArrayLike, class_names: Sequence[str] | None = None
) -> tuple[dict[str, float], list[ClassRow]]:
    """Top-1 and top-5 accuracy, mean per-class accuracy, and the per-class table.

    Args:
        scores: (N, C). targets: (N,) class indices. class_names: C names or ``None``.
    Returns:
        ``{"top1", "top5", "mean_class_accuracy", "classes", "classes_without_positives"}``
        (top-5 is top-C when C < 5; mean class accuracy averages the classes that have a clip)
        and one ``ClassRow`` per class sorted by accuracy (best first, classes without a clip
        last).
    """
    s = to_numpy(scores)
    hit1 = topk_hits(s, targets, 1)  # checks the shapes and the index range
    y = to_numpy(targets).astype(np.int64)
    num_classes = s.shape[1]
    names = _names(class_names, num_classes)
    positives = np.bincount(y, minlength=num_classes)
    correct = np.bincount(y, weights=hit1.astype(np.float64), minlength=num_classes)
    present = positives > 0
    accuracy = np.divide(correct, positives, out=np.full(num_classes, np.nan), where=present)
    summary = {
        "top1": float(hit1.mean()) if len(y) else math.nan,
        "top5": float(topk_hits(s, y, 5).mean()) if len(y) else math.nan,
        "mean_class_accuracy": float(accuracy[present].mean()) if present.any() else math.nan,
        "classes": int(num_classes),
        "classes_without_positives": int((~present).sum()),
    }
    rows = [
        ClassRow(
            index=c,
            name=names[c],
            positives=int(positives[c]),
            accuracy=float(accuracy[c]) if present[c] else None,
        )
        for c in range(num_classes)
    ]
    rows.sort(key=lambda r: (r.accuracy is None, -(r.accuracy or 0.0), r.index))
    return summary, rows


def classification_metrics(
    scores: ArrayLike,
    targets: ArrayLike,
    label_mode: LabelMode,
    class_names: Sequence[str] | None = None,
) -> tuple[dict[str, float], list[ClassRow]]:
    """The metrics of a label mode: ``multilabel_metrics`` or ``singlelabel_metrics``.

    Args:
        scores: (N, C) clip scores. targets: (N, C) multi-hot for ``"multi_hot"``, (N,) class
        indices for ``"single"``. class_names: C display names (label CSV order) or ``None``.
    Returns:
        (summary dict, per-class rows sorted best first); see the two functions for the keys.
    """
    if label_mode == "multi_hot":
        return multilabel_metrics(scores, targets, class_names)
    if label_mode == "single":
        return singlelabel_metrics(scores, targets, class_names)
    raise ValueError(f"label_mode must be 'multi_hot' or 'single', got {label_mode!r}")


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} score columns")
    return list(class_names)


def _check_scores(s: np.ndarray) -> None:
    if np.isnan(s).any():  # a nan compares false with everything: it would pass for a perfect score
        raise ValueError("scores contain nan")


def _check_multi_hot(s: np.ndarray, y: np.ndarray) -> None:
    _check_scores(s)
    if s.ndim != 2 or y.shape != s.shape:
        raise ValueError(f"multi-hot targets {y.shape} must match scores {s.shape} of shape (N, C)")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("multi-hot targets must be 0 or 1")


def _check_single(s: np.ndarray, y: np.ndarray) -> None:
    _check_scores(s)
    if s.ndim != 2 or y.ndim != 1 or len(y) != len(s):
        raise ValueError(f"single-label targets {y.shape} must be (N,) for scores {s.shape} of shape (N, C)")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"single-label targets must be integer class indices, got {y.dtype}")
    if len(y) and (y.min() < 0 or y.max() >= s.shape[1]):
        raise ValueError(f"class index out of range [0, {s.shape[1]})")
