"""Is an explanation faithful? Two numbers per granularity (docs/method.md, "Faithfulness").

A decomposition (``contributions.py``) says the top logit is base + prototype contributions +
residual. It explains the model only as far as (a) the prototypes, not the residual, carry the
logit, and (b) the prototypes it names as most important are the ones the prediction depends on.

(a) **Prototype share** of the top logit:

    share = |C| / (|C| + |R|),  C = sum of all prototype contributions,  R = residual

in [0, 1]; the base (an average clip's logit, or the prototype head's bias) is the same for every
clip and is left out. 1 means the prototypes carry everything that moves the logit away from the
base (always, for the prototype head); 0 that the residual does. Undefined (``None``) when both are 0.

(b) **Deletion test**: remove the contributions of the n prototypes contributing most to the
predicted class (from every class's logit: the clip as if those prototypes said nothing), and
measure the drop of the predicted class's logit and probability; compare with removing n
prototypes drawn at random from the others, averaged over ``draws`` draws. A faithful
explanation has top drop >> random drop. The candidates are the prototypes the decomposition
gives contributions to: the listed ones for the linear head, every prototype of the granularity
for the prototype head. Probabilities are softmax over the classes (``single``) or the class's
sigmoid (``multi_hot``) of the decomposed (frame-averaged) logits.

Pure functions: tensors in, numbers out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DELETED = 3  # prototypes removed by the deletion test
DRAWS = 20  # random draws averaged


def explained_share(explained: float, residual: float) -> float | None:
    """|C| / (|C| + |R|) of (a) above; ``None`` when both are 0."""
    total = abs(explained) + abs(residual)
    return abs(explained) / total if total > 0 else None


@dataclass
class DeletionResult:
    """What removing the top-n prototypes does to the predicted class, against n random others."""

    deleted: list[int]  # the prototype ids removed, largest contribution first
    n: int
    draws: int  # random draws averaged (0: no other prototype to draw)
    top_logit_drop: float
    random_logit_drop: float | None  # mean over the draws; None without draws
    top_probability_drop: float
    random_probability_drop: float | None


def _probability(logits: Tensor, cls: int, label_mode: str) -> float:
    return float(torch.softmax(logits, 0)[cls] if label_mode == "single" else torch.sigmoid(logits[cls]))


def deletion_test(
    logits: Tensor, contributions: Tensor, cls: int, *, n: int = DELETED, draws: int = DRAWS,
    label_mode: str = "single", ids: list[int] | None = None, seed: int = 0,
) -> DeletionResult:  # fmt: skip
    """(b) above.

    Args:
        logits: (C,) the decomposed logits of every class.
        contributions: (R, C) each candidate prototype's contribution to each class's logit.
        cls: the predicted class.
        n: prototypes removed (at most R); ``draws``: random draws of n among the other R - n
            (fewer when R - n < n: then all of the others, once).
        ids: the prototype id of each row (default 0..R-1), for ``deleted``.
    """
    logits, contributions = logits.double(), contributions.double()
    R = contributions.shape[0]
    n = min(n, R)
    ids = list(range(R)) if ids is None else list(ids)
    order = contributions[:, cls].argsort(descending=True)
    top, rest = order[:n], order[n:]
    p0 = _probability(logits, cls, label_mode)

    def drops(rows: Tensor) -> tuple[float, float]:
        after = logits - contributions[rows].sum(dim=0)
        return float(logits[cls] - after[cls]), p0 - _probability(after, cls, label_mode)

    top_logit, top_prob = drops(top)
    random_drops = []
    if len(rest) and n:
        gen = torch.Generator().manual_seed(seed)
        k = min(n, len(rest))
        times = draws if len(rest) > k else 1  # every draw would be the same
        random_drops = [drops(rest[torch.randperm(len(rest), generator=gen)[:k]]) for _ in range(times)]
    random_logit = random_prob = None
    if random_drops:
        random_logit = sum(d[0] for d in random_drops) / len(random_drops)
        random_prob = sum(d[1] for d in random_drops) / len(random_drops)
    return DeletionResult(
        deleted=[ids[i] for i in top.tolist()], n=n, draws=len(random_drops), top_logit_drop=top_logit,
        random_logit_drop=random_logit, top_probability_drop=top_prob, random_probability_drop=random_prob,
    )  # fmt: skip


@dataclass
class Faithfulness:
    """Both measures for one granularity's decomposition of the top logit."""

    level: int
    share: float | None
    deletion: DeletionResult
