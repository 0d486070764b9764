"""Per-prototype member means and the concentration gamma of eq. 2.

Eq. 2 of the paper sums over the I x J (video, audio) member pairs of cluster m and divides
by ``I J log(I + J + beta)``; since ``sum_i sum_j (a_i + b_j) / (I J) = mean_i a_i + mean_j b_j``
this is exactly METHOD_NOTES' reading::

    gamma_m = (mean_i ||p^m - z_v,i|| + mean_j ||p^m - z_a,j||) / log(I + J + beta)

Clusters are found on the joint clip embedding, so every member clip brings one video and one
audio embedding: I = J = n_m. Then PCL's post-processing: singletons (n_m = 1) take the
largest gamma of the clusters with two or more members, gammas are clamped to their
[low, high] percentiles and rescaled so that their mean is tau.

Every sum is per cluster and all-reduced, so ranks holding shards get the global values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.prototypes.comm import Comm, default_comm
from pcavmae_cli.engine.prototypes.kmeans import accumulate


def cluster_means(z: Tensor, assignment: Tensor, k: int, comm: Comm | None = None) -> Tensor:
    """L2-normalised mean of each cluster's rows of ``z`` (N, D) -> (K, D); zero rows if empty."""
    comm = comm or default_comm()
    sums, _ = accumulate(z.float(), assignment, k)
    return F.normalize(comm.all_reduce(sums), dim=1)


def raw_concentration(
    p: Tensor,
    z_a: Tensor,
    z_v: Tensor,
    assignment: Tensor,
    *,
    beta: float,
    comm: Comm | None = None,
) -> tuple[Tensor, Tensor]:
    """Eq. 2 for every cluster, with the singleton rule, before clamping and rescaling.

    Args:
        p: (K, D) joint prototypes p^m.
        z_a, z_v: (N, D) the clips' audio and video (momentum) embeddings.
        assignment: (N,) cluster of each clip.
    Returns:
        gamma (K,) float32 and the member counts n_m (K,) int64. Clusters with fewer than two
        members get the largest gamma of the others; if no cluster has two members, all get 1.
    """
    comm = comm or default_comm()
    k = p.shape[0]
    p = p.float()
    dist_v = (p[assignment] - z_v.float()).norm(dim=1)  # ||p^m - z_v,i||, (N,)
    dist_a = (p[assignment] - z_a.float()).norm(dim=1)
    sums = p.new_zeros(2, k)
    sums[0].index_add_(0, assignment, dist_v)
    sums[1].index_add_(0, assignment, dist_a)
    counts = torch.bincount(assignment, minlength=k)
    comm.all_reduce(sums)
    comm.all_reduce(counts)
    n = counts.to(p.dtype)
    n_safe = n.clamp_min(1)
    gamma = (sums[0] / n_safe + sums[1] / n_safe) / torch.log(2 * n + beta)  # I = J = n_m
    several = counts >= 2
    fill = gamma[several].max() if several.any() else gamma.new_tensor(1.0)
    if not several.any():
        gamma = torch.ones_like(gamma)
    return torch.where(several, gamma, fill), counts


def normalise_concentration(
    gamma: Tensor, *, tau: float, percentiles: tuple[float, float]
) -> Tensor:
    """Clamp ``gamma`` (K,) to its [low, high] percentiles (linear interpolation, as numpy),
    then rescale so that its mean is ``tau`` (PCL's normalisation)."""
    low, high = percentiles
    q = torch.quantile(gamma.float(), gamma.new_tensor([low / 100.0, high / 100.0]).float())
    clamped = gamma.float().clamp(q[0], q[1])
    return clamped * (tau / clamped.mean())


def concentration(
    p: Tensor,
    z_a: Tensor,
    z_v: Tensor,
    assignment: Tensor,
    *,
    beta: float,
    tau: float,
    percentiles: tuple[float, float],
    comm: Comm | None = None,
) -> Tensor:
    """gamma (K,) of eq. 2: ``raw_concentration`` then ``normalise_concentration``."""
    gamma, _ = raw_concentration(p, z_a, z_v, assignment, beta=beta, comm=comm)
    return normalise_concentration(gamma, tau=tau, percentiles=percentiles)

