"""How much each prototype contributes to a fine-tuned model's top logit (docs/method.md, "Figures and explanations").

The fine-tuned head (``model/classifier.py``) is a LayerNorm then a Linear layer on the pooled
joint-layer output. The Linear layer is where the decision is linear, so the decomposition is
of its input h = LayerNorm(pooled) (D values) and of the logit of class c,
``l_c = w_c . h + b_c``. A clip's h is averaged over its frames (the logit of that average is the
average of the frame logits, the head being linear in h).

Prototype k of one granularity gets a *direction* in this space: c_k - mu, where c_k is the mean
h of (a sample of) its member clips and mu the mean h of (a sample of) the training clips. The
clip's membership of the prototypes is eq. 1's posterior pi_k = softmax_k(z . p_k / gamma_k), z
its joint embedding. The clip's offset from the average clip is written as that mix of prototype
directions, stretched by one scale s >= 0 fitted by least squares:

    m = sum_k pi_k (c_k - mu),    s = max(0, <h - mu, m> / ||m||^2),    a_k = s pi_k
    h = mu + sum_k a_k (c_k - mu) + r

which defines the residual r (the part of the clip the prototype mix does not hold). Then, exactly,

    l_c = (b_c + w_c . mu)  +  sum_k a_k w_c . (c_k - mu)  +  w_c . r
          base (an average clip)  contribution of prototype k   residual

The posterior fixes the proportions (the model's own soft assignment, unique); s corrects for
the softness of that assignment (members' averages are less extreme than any one clip). A free
per-prototype fit would not be unique: with mu the mean of the members' means, the directions
c_k - mu are linearly dependent (sum_k n_k (c_k - mu) = 0). A positive contribution pushes
class c above what an average clip gets; the parts add up to the logit to rounding.

The prototype head (``model/prototype_head.py``) needs no fit: its logit *is* a sum over the
prototypes of every granularity, l_c = b_c + sum_k W[c, k] s_k with s_k the clip's scaled
cosine to p_k, so ``prototype_head_decomposition`` lists this granularity's largest
contributions W[c, k] s_k, sums every other prototype's into ``other``, and has no residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Decomposition:
    """``logit = base + contributions.sum() + residual`` (to float rounding)."""

    logit: float
    base: float  # b_c + w_c . mu
    prototypes: list[int]  # the prototypes listed, by decreasing posterior
    posterior: list[float]  # their eq. 1 posterior pi_k (which prototypes are listed; shown, not used below)
    coefficients: list[float]  # a_k = s pi_k >= 0
    contributions: list[float]  # a_k w_c . (c_k - mu); prototype head: W[c, k] s_k
    residual: float  # w_c . r; 0 for the prototype head
    # Contributions of the prototypes not listed: for the prototype head, this granularity's other
    # prototypes and every other granularity's; 0 for the linear head (its unlisted ones are in r).
    other: float = 0.0

    @property
    def explained(self) -> float:
        """Sum of the prototype contributions, listed or not."""
        return float(sum(self.contributions)) + self.other


def direction_coefficients(h: Tensor, centres: Tensor, mean: Tensor, posterior: Tensor) -> Tensor:
    """a_k = s pi_k with s = max(0, <h - mu, m> / ||m||^2), m = sum_k pi_k (c_k - mu): (R,) float64."""
    pi = posterior.double()
    mix = (pi[:, None] * (centres.double() - mean.double())).sum(dim=0)
    norm = float(mix @ mix)
    scale = max(0.0, float((h.double() - mean.double()) @ mix) / norm) if norm > 0 else 0.0
    return scale * pi


def decompose_logit(
    h: Tensor, weight: Tensor, bias: float, coefficients: Tensor, centres: Tensor, mean: Tensor,
    prototypes: list[int], posterior: Tensor | None = None,
) -> Decomposition:  # fmt: skip
    """Decompose ``weight . h + bias`` over prototype directions with the given coefficients.

    Exact for any coefficients (the residual takes the rest); ``direction_coefficients`` gives
    the ones ``pcav explain`` uses.

    Args:
        h: (D,) the clip's head input, frame-averaged.
        weight: (D,) the Linear row of the class explained; ``bias`` its bias.
        coefficients: (R,) a_k of the listed prototypes.
        centres: (R, D) c_k, mean head input of each listed prototype's members.
        mean: (D,) mu, mean head input of the training clips.
        prototypes: the R prototype ids; ``posterior`` their pi_k, both only reported.
    """
    h, w, mu = h.double(), weight.double(), mean.double()
    a, c = coefficients.double(), centres.double()
    contributions = a * ((c - mu) @ w)  # (R,)
    residual_vec = h - mu - (a[:, None] * (c - mu)).sum(dim=0)
    return Decomposition(
        logit=float(w @ h + bias),
        base=float(bias + w @ mu),
        prototypes=list(prototypes),
        posterior=[] if posterior is None else posterior.double().tolist(),
        coefficients=a.tolist(),
        contributions=contributions.tolist(),
        residual=float(w @ residual_vec),
    )


def posterior(joint: Tensor, centroids: Tensor, gamma: Tensor) -> Tensor:
    """eq. 1's soft assignment of a clip: softmax_k(joint . p_k / gamma_k), (K,)."""
    return torch.softmax((centroids.float() @ joint.float()) / gamma.float(), dim=0)


def contribution_matrix(weight: Tensor, coefficients: Tensor, centres: Tensor, mean: Tensor) -> Tensor:
    """Every class's contributions of the listed prototypes (linear head): ``(R, C)`` float64,
    entry (k, c) = a_k w_c . (c_k - mu); column c is ``decompose_logit``'s contributions for class c.

    Args:
        weight: (C, D) the head's Linear weights; the rest as in ``decompose_logit``.
    """
    a = coefficients.double()
    return a[:, None] * ((centres.double() - mean.double()) @ weight.double().T)


def prototype_head_matrix(similarities: Tensor, weight: Tensor) -> Tensor:
    """The prototype head's contributions, all prototypes x all classes: ``(P, C)`` float64, entry
    (k, c) = W[c, k] s_k. With the bias they add up to the logits exactly.

    Args:
        similarities: (P,) s_k, the clip's (frame-averaged) head input.
        weight: (C, P) the head's Linear weights.
    """
    return similarities.double()[:, None] * weight.double().T


def prototype_head_decomposition(
    similarities: Tensor, weight: Tensor, bias: float, level: slice, listed: int, posterior: Tensor | None = None,
) -> Decomposition:  # fmt: skip
    """The prototype head's logit of one class over the prototypes of one granularity, exact.

    Args:
        similarities: (P,) s_k of all granularities; ``weight`` (P,) the class's row W[c].
        level: this granularity's columns; its ``listed`` largest |contributions| are listed,
            every other prototype's contribution is summed into ``other``.
        posterior: (K,) eq. 1's posterior of this granularity's prototypes, only reported.
    """
    parts = similarities.double() * weight.double()  # (P,)
    mine = parts[level]
    order = mine.abs().argsort(descending=True)[:listed].tolist()
    shown = float(mine[order].sum())
    return Decomposition(
        logit=float(parts.sum() + bias),
        base=float(bias),
        prototypes=order,
        posterior=[] if posterior is None else posterior.double()[order].tolist(),
        coefficients=similarities.double()[level][order].tolist(),
        contributions=mine[order].tolist(),
        residual=0.0,
        other=float(parts.sum()) - shown,
    )
