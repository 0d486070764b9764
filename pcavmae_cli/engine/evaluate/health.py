"""Representation health: is each modality of the clip embedding still carrying information?

A joint embedding ``normalise(z_a + z_v)`` can look healthy while one modality has collapsed: if
every clip's audio embedding points the same way, the joint clusters are the picture's clusters
and the audio side explains nothing. These figures expose that per modality (audio ``z_a``,
video ``z_v``, joint ``normalise(normalise(z_a) + normalise(z_v))``, every row unit-normalised):

- ``mean_pairwise_cosine``: the mean of ``cos(x_i, x_j)`` over pairs ``i != j``. 1 when every
  clip has the same embedding (collapse), about 0 for directions spread over the sphere.
  Computed without the ``N x N`` matrix: for unit rows, ``sum_{i != j} x_i . x_j =
  ||sum_i x_i||^2 - N``, so the mean is ``||mean||^2 N / (N - 1) - 1 / (N - 1)``.
- ``effective_rank``: Roy & Vetterli (2007), ``exp(H(p))`` with ``p_k = s_k / sum_j s_j`` the
  singular values of the (uncentred) ``N x D`` matrix of unit rows normalised to sum 1 and ``H``
  the Shannon entropy (natural log). 1 for identical rows, k for k orthonormal rows; it counts
  the directions the clips use (dimensional collapse lowers it even where the mean cosine does not
  move).
- ``prototype_spread``: per clip, the largest minus the smallest cosine to the K prototypes of
  one granularity, averaged over clips. A modality whose clips are (nearly) equally close to
  every prototype (0 spread) cannot tell the clusters apart. The audio and video embeddings are
  compared with the same clusters' audio and video prototypes ``p_a``, ``p_v`` (eq. 3: the
  normalised member means), the joint one with the joint prototypes ``p^m``.
- ``nearest_agreement``: the share of clips whose nearest audio (video) prototype, by its own
  modality alone, is the cluster the E-step assigned the clip to from the joint embedding.
  1/K is chance; a collapsed modality sits near the share of the largest cluster.

Several processes: every function takes the E-step's ``Comm`` (a sum all-reduce) and each rank
passes its shard; sums and counts are reduced, so the figures equal those of one process over the
whole set. The effective rank needs the rows themselves: it is computed on at most ``max_rows``
clips, evenly spaced within each shard, the same number from every rank, placed into one buffer
by the same sum all-reduce (``gathered_rows``), so every rank computes the same figure from the
same subsample (a few thousand rows give the singular values to well under 1 %; an ``N x D`` SVD
of the whole set would cost what the E-step does).

Pure functions: tensors in, floats out (``nan`` where a figure is undefined: fewer than two clips,
all-zero rows); ``embedding_health`` collects them into the fields ``metrics.jsonl`` logs.
``CollapseEpisodes``, the one piece of state, decides when pre-training warns about a collapse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.prototypes.comm import Comm, default_comm, global_count
from pcavmae_cli.engine.prototypes.step import Prototypes, joint_embedding

MODALITIES = ("a", "v", "joint")  # the field suffixes, in this order
NAMES = {"a": "audio", "v": "video", "joint": "joint"}


def _sum(values: Sequence[float], like: Tensor, comm: Comm) -> list[float]:
    """``values`` summed over ranks, in float64 (one all-reduce)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=like.device)
    return comm.all_reduce(t).tolist()


@torch.no_grad()
def mean_pairwise_cosine(x: Tensor, comm: Comm | None = None) -> float:
    """Mean cosine over all pairs of distinct rows of ``x`` ``(N, D)`` (all shards' rows)."""
    comm = comm or default_comm()
    unit = F.normalize(x.double(), dim=1)
    total = comm.all_reduce(torch.cat([unit.sum(0), unit.new_tensor([float(unit.shape[0])])]))
    s, n = total[:-1], float(total[-1])
    if n < 2:
        return math.nan
    return float((s @ s - n) / (n * (n - 1)))


@torch.no_grad()
def effective_rank(x: Tensor) -> float:
    """Roy & Vetterli's effective rank of the unit rows of ``x`` ``(N, D)``: exp of the entropy of
    the singular values normalised to sum 1. ``nan`` for a matrix without a non-zero row."""
    unit = F.normalize(x.double(), dim=1)
    s = torch.linalg.svdvals(unit)
    if s.numel() == 0 or float(s.sum()) == 0.0:
        return math.nan
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def evenly_spaced(n: int, m: int, device: torch.device | str = "cpu") -> Tensor:
    """``min(n, m)`` row indices spread evenly over ``0 .. n - 1`` (first and last included)."""
    m = min(n, m)
    if m <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    return torch.linspace(0, n - 1, m, device=device).round().long()


@torch.no_grad()
def gathered_rows(x: Tensor, max_rows: int, comm: Comm | None = None) -> Tensor:
    """At most ``max_rows`` rows of the whole set, the same on every rank: each rank contributes
    the same number of evenly spaced rows of its shard ``x``, summed into place (one all-reduce)."""
    comm = comm or default_comm()
    sizes = global_count(x.shape[0], comm, x.device)
    per = min(-(-max_rows // comm.world_size), int(sizes.min()))
    out = x.new_zeros(comm.world_size * per, x.shape[1], dtype=torch.float64)
    out[comm.rank * per : (comm.rank + 1) * per] = x[evenly_spaced(x.shape[0], per, x.device)].double()
    return comm.all_reduce(out)


@torch.no_grad()
def prototype_cosines(x: Tensor, prototypes: Tensor) -> Tensor:
    """``(N, K)`` cosines of the rows of ``x`` to the rows of ``prototypes``."""
    return F.normalize(x.double(), dim=1) @ F.normalize(prototypes.double(), dim=1).T


@torch.no_grad()
def prototype_spread(x: Tensor, prototypes: Tensor, comm: Comm | None = None) -> float:
    """Mean over clips of (largest - smallest) cosine to the ``K`` prototypes; 0 when every clip is
    as close to every prototype (or ``K`` is 1)."""
    comm = comm or default_comm()
    cos = prototype_cosines(x, prototypes)
    spread = cos.max(1).values - cos.min(1).values if cos.numel() else cos.new_zeros(0)
    total, n = _sum([float(spread.sum()), float(cos.shape[0])], x, comm)
    return total / n if n else math.nan


@torch.no_grad()
def nearest_agreement(x: Tensor, prototypes: Tensor, assignments: Tensor, comm: Comm | None = None) -> float:
    """Share of clips whose nearest prototype (rows of ``prototypes``, by cosine to the rows of
    ``x``) is their ``assignments`` entry ``(N,)``."""
    comm = comm or default_comm()
    nearest = prototype_cosines(x, prototypes).argmax(1)
    hits, n = _sum([float((nearest == assignments.to(nearest.device)).sum()), float(x.shape[0])], x, comm)
    return hits / n if n else math.nan


def collapsed(cos: float | None, rank: float | None, *, max_cosine: float, min_rank: float) -> bool:
    """Whether figures ``cos`` (mean pairwise cosine) and ``rank`` (effective rank) say collapse:
    the cosine reached ``max_cosine`` or the rank fell below ``min_rank``. Unknown figures do not."""
    high = cos is not None and math.isfinite(cos) and cos >= max_cosine
    low = rank is not None and math.isfinite(rank) and rank < min_rank
    return high or low


@torch.no_grad()
def embedding_health(
    z_a: Tensor,
    z_v: Tensor,
    prototypes: list[Prototypes] | None = None,
    *,
    max_rows: int,
    collapse_cosine: float,
    collapse_rank: float,
    comm: Comm | None = None,
) -> dict[str, Any]:
    """The health fields of one epoch's embeddings ``z_a``, ``z_v`` ``(N, D)`` (this rank's shard).

    ``prototypes``: the E-step's granularities, with this shard's ``assignments``; ``None`` (warm-up,
    no prototypes) leaves the prototype fields ``None``. Keys: ``health_cos_{m}``,
    ``health_rank_{m}``, ``health_collapsed_{m}`` for m in a, v, joint; ``health_spread_{m}``
    (a list, one per granularity) and ``health_agree_{a,v}`` (likewise).
    """
    comm = comm or default_comm()
    views = {"a": z_a.float(), "v": z_v.float(), "joint": joint_embedding(z_a, z_v)}
    out: dict[str, Any] = {}
    for m, x in views.items():
        out[f"health_cos_{m}"] = mean_pairwise_cosine(x, comm)
        out[f"health_rank_{m}"] = effective_rank(gathered_rows(x, max_rows, comm))
    for m in MODALITIES:
        out[f"health_collapsed_{m}"] = collapsed(
            out[f"health_cos_{m}"], out[f"health_rank_{m}"], max_cosine=collapse_cosine, min_rank=collapse_rank
        )
    for m in MODALITIES:
        out[f"health_spread_{m}"] = None
    out["health_agree_a"] = out["health_agree_v"] = None
    if prototypes:
        own = {"a": lambda p: p.p_a, "v": lambda p: p.p_v, "joint": lambda p: p.centroids}
        for m, x in views.items():
            out[f"health_spread_{m}"] = [prototype_spread(x, own[m](p), comm) for p in prototypes]
        for m in ("a", "v"):
            out[f"health_agree_{m}"] = [
                nearest_agreement(views[m], own[m](p), p.assignments, comm) for p in prototypes
            ]
    return out


def empty_health() -> dict[str, Any]:
    """The health fields of an epoch that measured none (every value ``None``)."""
    keys = [f"health_{f}_{m}" for f in ("cos", "rank", "collapsed", "spread") for m in MODALITIES]
    return {k: None for k in [*keys, "health_agree_a", "health_agree_v"]}


def collapsed_modalities(health: dict[str, Any]) -> set[str]:
    """The modalities (``a``, ``v``, ``joint``) whose ``health_collapsed_*`` flag is set."""
    return {m for m in MODALITIES if health.get(f"health_collapsed_{m}")}


class CollapseEpisodes:
    """When to warn about a collapsed modality: once per collapse episode.

    An episode of a modality starts with a flagged measurement and ends with the first one that
    is not. The warning comes at its second measurement (a randomly initialised encoder often
    starts flagged and recovers), and not again until the modality has recovered and collapsed
    anew: a modality that stays collapsed for 20 epochs is one warning, not 19.
    """

    def __init__(self) -> None:
        self.flagged: set[str] = set()  # flagged at the last measurement
        self.warned: set[str] = set()  # in an episode that was warned about

    def update(self, flagged: set[str]) -> set[str]:
        """Note one measurement's flagged modalities; returns those to warn about now."""
        new = (flagged & self.flagged) - self.warned
        self.warned = (self.warned & flagged) | new
        self.flagged = set(flagged)
        return new


def collapse_message(health: dict[str, Any], epoch: int, *, collapse_cosine: float, collapse_rank: float) -> str | None:
    """One line naming the collapsed modalities of ``health`` and their figures; ``None`` if none."""
    parts = []
    for m in MODALITIES:
        if not health.get(f"health_collapsed_{m}"):
            continue
        text = (f"{NAMES[m]} mean pairwise cosine {health[f'health_cos_{m}']:.3f}, "
                f"effective rank {health[f'health_rank_{m}']:.2f}")  # fmt: skip
        spread = health.get(f"health_spread_{m}")
        if spread:
            text += ", cosine spread to prototypes " + "/".join(f"{s:.3f}" for s in spread)
        parts.append(text)
    if not parts:
        return None
    return (f"representation health, epoch {epoch}: collapsed embeddings ({'; '.join(parts)}; "
            f"limits: health.collapse_cosine {collapse_cosine}, health.collapse_rank {collapse_rank})")  # fmt: skip
