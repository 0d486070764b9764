"""Density-peak prototypes after xDNN / Autonomous Data Partitioning (the paper's sec. 2.2).

The paper takes "the local peaks of the density" (its ref. 13, xDNN) as prototypes. This is
the project's reading (METHOD_NOTES, Prototypes; docs/method.md says the same):

1. Density: ADP / xDNN's Cauchy data density, ``D(x) = 1 / (1 + ||x - mu||^2 / (X - ||mu||^2))``
   with mu the mean and X the mean squared norm, is a function of the distance to mu alone, so
   over the whole data set it has a single peak. It is therefore evaluated *locally*: for each
   candidate point c_i, mu_i and X_i are the (weighted) mean and mean squared norm of the
   candidates within ``sigma`` of c_i, and the density is weighted by their total weight S_i,
   as ADP weights data clouds by their support::

       D_sigma(c_i) = S_i / (1 + ||c_i - mu_i||^2 / (X_i - ||mu_i||^2))

   A point that sits at the mean of a well-populated neighbourhood is dense; once sigma covers
   all the data this is N * D(c_i), the global density of METHOD_NOTES (``cauchy_density``).
2. The radius: ``sigma = mean pairwise distance / granularity``, the mean taken over distinct
   pairs of candidate points weighted by ``w_i * w_j``. A higher granularity shrinks sigma and
   gives more prototypes.
3. A candidate is a peak if no other candidate within ``sigma`` is denser (ties go to the lower
   index). So no peak has a denser peak within sigma: the note's "drop peaks with a denser
   peak within radius sigma" holds by construction.
4. Every sample joins its nearest peak (Euclidean; Voronoi "data clouds"). The caller turns
   clouds into prototypes (L2-normalised member means, ``step.build_prototypes``).

Candidates: with one process and N <= ``max_points_exact`` they are the samples themselves
(w = 1), an exact O(N^2) computation in row chunks. Otherwise (more samples, or several
ranks) they are the centroids of a spherical k-means over-clustering into ``overcluster_k``
micro-clusters, weighted by their member counts; the peaks are found among those centroids
(the same computation on every rank) and then every sample is assigned. The over-clustering
assumes unit-norm features, which the joint clip embedding is.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pcavmae_cli.engine.prototypes.comm import Comm, default_comm, global_count
from pcavmae_cli.engine.prototypes.kmeans import CHUNK_ROWS, accumulate, spherical_kmeans

BLOCK_ELEMENTS = 1 << 23  # pairwise distances held at once in the O(M^2) passes (32 MB of fp32)


def cauchy_density(points: Tensor) -> Tensor:
    """ADP's global Cauchy data density of each row of ``points`` (M, D) -> (M,):
    ``1 / (1 + ||x - mu||^2 / (X - ||mu||^2))``, mu the mean row, X the mean squared norm."""
    mu = points.mean(dim=0)
    scatter = points.square().sum(dim=1).mean() - mu.square().sum()
    scatter = scatter.clamp_min(torch.finfo(points.dtype).tiny)
    return 1.0 / (1.0 + (points - mu).square().sum(dim=1) / scatter)


def _pairwise_blocks(points: Tensor, budget: int = BLOCK_ELEMENTS):
    """(start, distances (c, M)) for blocks of rows of ``points`` (M, D), c * M <= ``budget``."""
    rows = max(1, budget // max(points.shape[0], 1))
    for start in range(0, points.shape[0], rows):
        dist = torch.cdist(points[start : start + rows], points)
        own = torch.arange(dist.shape[0], device=points.device)
        dist[own, start + own] = 0  # exact zero: the matmul form of cdist leaves rounding noise
        yield start, dist


def radius(points: Tensor, weights: Tensor, granularity: float) -> float:
    """sigma = (weighted mean distance between distinct candidate points) / granularity."""
    w = weights.double()
    pair_weight = float(w.sum() ** 2 - w.square().sum())
    if pair_weight <= 0:  # a single candidate point
        return 0.0
    total = 0.0
    for start, dist in _pairwise_blocks(points):
        w_rows = w[start : start + dist.shape[0]]
        total += float((w_rows[:, None] * dist.double() * w[None, :]).sum())
    return total / pair_weight / granularity


def local_density(points: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """D_sigma of every candidate (M,) float64: the Cauchy density of its sigma-neighbourhood
    times the neighbourhood's weight (module docstring, step 1)."""
    # D is shift-invariant: centring keeps X_i - |mu_i|^2 free of cancellation
    centred = (points - (weights[:, None] * points).sum(0) / weights.sum()).double()
    tiny = torch.finfo(torch.float64).tiny
    sq_norm = centred.square().sum(dim=1)
    density = torch.empty(points.shape[0], dtype=torch.float64, device=points.device)
    for start, dist in _pairwise_blocks(points):
        rows = slice(start, start + dist.shape[0])
        near = (dist <= sigma).double() * weights.double()[None, :]  # (c, M) neighbour weights
        support = near.sum(dim=1)
        mu = near @ centred / support[:, None]
        scatter = (near @ sq_norm / support - mu.square().sum(dim=1)).clamp_min(tiny)
        density[rows] = support / (1 + (centred[rows] - mu).square().sum(dim=1) / scatter)
    return density


def find_peaks(points: Tensor, weights: Tensor, sigma: float) -> Tensor:
    """Indices of the candidate points no denser candidate lies within ``sigma`` of.

    Args:
        points: (M, D) candidates, weights: (M,) their member counts (1 for raw samples).
    Returns:
        (P,) int64 indices into ``points``, ascending; ties go to the lower index.
    """
    m = points.shape[0]
    index = torch.arange(m, device=points.device)
    density = local_density(points, weights, sigma)
    is_peak = torch.empty(m, dtype=torch.bool, device=points.device)
    for start, dist in _pairwise_blocks(points):
        rows = slice(start, start + dist.shape[0])
        mine, other = density[rows, None], density[None, :]
        denser = (other > mine) | ((other == mine) & (index[None, :] < index[rows, None]))
        is_peak[rows] = ~((dist <= sigma) & denser).any(dim=1)
    return is_peak.nonzero().squeeze(1)


def nearest(x: Tensor, centres: Tensor, chunk_rows: int = CHUNK_ROWS) -> Tensor:
    """Index of the Euclidean-nearest row of ``centres`` (P, D) for each row of ``x`` (N, D)."""
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    sq = centres.square().sum(dim=1)
    for start in range(0, x.shape[0], chunk_rows):
        block = x[start : start + chunk_rows]
        out[start : start + block.shape[0]] = (sq[None, :] - 2 * block @ centres.T).argmin(dim=1)
    return out


def density_peaks(
    x: Tensor,
    granularity: float,
    *,
    max_points_exact: int,
    overcluster_k: int,
    iters: int,
    seed: int,
    comm: Comm | None = None,
    chunk_rows: int = CHUNK_ROWS,
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Density peaks of this rank's shard ``x`` (N, D) and the Voronoi cloud of each sample.

    Exact on the samples when one process holds N <= ``max_points_exact``; otherwise on a
    spherical k-means over-clustering into ``overcluster_k`` micro-clusters (``iters``
    iterations, ``seed``), weighted by member counts (see the module docstring).

    Returns:
        peaks (P, D) (samples or micro-cluster centroids) and this shard's assignment (N,).
    """
    comm = comm or default_comm()
    x = x.float()
    n_total = int(global_count(x.shape[0], comm, x.device).sum())
    if comm.world_size == 1 and n_total <= max_points_exact:
        points, weights = x, torch.ones(x.shape[0], dtype=x.dtype, device=x.device)
    else:
        centroids, micro = spherical_kmeans(
            x, min(overcluster_k, n_total), iters=iters, seed=seed, comm=comm, chunk_rows=chunk_rows,
            precision=precision,
        )
        _, counts = accumulate(x, micro, centroids.shape[0])
        comm.all_reduce(counts)
        keep = counts > 0
        points, weights = centroids[keep], counts[keep].to(x.dtype)
    centred = points - (weights[:, None] * points).sum(0) / weights.sum()  # for precise distances
    sigma = radius(centred, weights, granularity)
    peaks = points[find_peaks(centred, weights, sigma)]
    return peaks, nearest(x, peaks, chunk_rows)
