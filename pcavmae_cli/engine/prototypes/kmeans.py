"""Spherical k-means in torch, shard-parallel (PCL's clustering; METHOD_NOTES, Prototypes).

Each rank holds a shard of the unit-norm features. One iteration is ``assign`` (nearest
centroid by cosine, chunked so 200k x 5k similarities never sit in memory at once), then
``accumulate`` (per-cluster sums and counts of the shard), then ``comm.all_reduce`` of both,
then the new centroids are the L2-normalised sums. No feature ever leaves its rank: only
(K, D) sums, (K,) counts and, for initialisation and empty-cluster re-seeding, a few
candidate rows travel. With one process the same functions run with the identity reduce.

Initialisation is k-means++ (D^2 sampling) drawn in at most ~16 batched rounds, so it costs
about one Lloyd iteration even for K = 5000; every random draw comes from one CPU generator
seeded identically on every rank, so all ranks pick the same centroids.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.prototypes.comm import Comm, default_comm, global_count

CHUNK_ROWS = 4096  # rows of x per similarity block: 4096 x 5000 floats = 80 MB


def assign(x: Tensor, centroids: Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[Tensor, Tensor]:
    """Nearest centroid of each row by cosine similarity.

    Args:
        x: (N, D) unit-norm features.
        centroids: (K, D) unit-norm centroids.
    Returns:
        assignment (N,) int64 and the similarity to the assigned centroid (N,).
    """
    n = x.shape[0]
    assignment = torch.empty(n, dtype=torch.long, device=x.device)
    similarity = torch.empty(n, dtype=x.dtype, device=x.device)
    # One similarity block reused for every chunk, written by mm(out=) and reduced by max(out=)
    # into the result slices: a fresh (c, K) block per chunk costs page faults on the CPU
    # (the allocator hands large blocks back to the OS) and was half the time of an iteration.
    block = x.new_empty(min(chunk_rows, n), centroids.shape[0])
    centroids_t = centroids.T
    for start in range(0, n, chunk_rows):
        rows = x[start : start + chunk_rows]
        sim = block[: rows.shape[0]]
        torch.mm(rows, centroids_t, out=sim)  # (c, K)
        torch.max(sim, dim=1, out=(similarity[start : start + chunk_rows], assignment[start : start + chunk_rows]))
    return assignment, similarity


def accumulate(x: Tensor, assignment: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per-cluster sums (K, D) and member counts (K,) int64 of this shard's rows."""
    sums = x.new_zeros(k, x.shape[1]).index_add_(0, assignment, x)
    counts = torch.bincount(assignment, minlength=k)
    return sums, counts


def _gather_rows(rows: Tensor, take: Tensor, comm: Comm, width: int) -> Tensor:
    """Rows ``rows[take >= 0]`` placed at their slot, zeros elsewhere, summed over ranks.

    ``take`` (L,) holds a local row index for the slots this rank owns and -1 for the others,
    so the all-reduce leaves every slot filled by exactly one rank.
    """
    out = rows.new_zeros(take.shape[0], width)
    mine = take >= 0
    out[mine] = rows[take[mine]]
    return comm.all_reduce(out)


def _weighted_draw(weights: Tensor, count: int, gen: torch.Generator, comm: Comm) -> Tensor:
    """Local row index (or -1) for each of ``count`` draws, with probability ~ ``weights``.

    ``weights`` (N_local,) are this rank's; the draw is over the concatenation of all ranks'
    weights in rank order, and the uniform numbers come from ``gen``, identical on all ranks.
    """
    device = weights.device
    w = weights.double()
    totals = torch.zeros(comm.world_size, dtype=torch.float64, device=device)
    totals[comm.rank] = w.sum()
    comm.all_reduce(totals)
    grand = float(totals.sum())
    u = torch.rand(count, generator=gen, dtype=torch.float64).to(device) * grand
    rank_end = totals.cumsum(0)
    owner = torch.searchsorted(rank_end, u, right=True).clamp_max(comm.world_size - 1)
    local_u = u - (rank_end[comm.rank] - totals[comm.rank])
    local_cum = w.cumsum(0)
    idx = torch.searchsorted(local_cum, local_u, right=True).clamp_max(max(w.shape[0] - 1, 0))
    return torch.where(owner == comm.rank, idx, torch.full_like(idx, -1))


def init_centroids(
    x: Tensor, k: int, *, seed: int, comm: Comm, chunk_rows: int = CHUNK_ROWS
) -> Tensor:
    """k-means++ centroids (K, D) of unit-norm ``x``, drawn in batched rounds.

    The first centroid is uniform; each later round draws ``max(1, K // 16)`` rows with
    probability proportional to their squared distance to the nearest centroid so far
    (exact k-means++ when K <= 31). Identical on every rank.
    """
    gen = torch.Generator().manual_seed(seed)
    d = x.shape[1]
    batch = max(1, k // 16)
    weights = torch.ones(x.shape[0], dtype=x.dtype, device=x.device)  # uniform first draw
    chosen: list[Tensor] = []
    have = 0
    while have < k:
        count = 1 if have == 0 else min(batch, k - have)
        totals = comm.all_reduce(weights.double().sum().reshape(1))
        if float(totals) <= 0:  # every row sits on a centroid already: draw uniformly
            weights = torch.ones_like(weights)
        new = _gather_rows(x, _weighted_draw(weights, count, gen, comm), comm, d)
        _, sim = assign(x, new, chunk_rows)
        d2 = (2 - 2 * sim).clamp_min(0)  # squared distance of unit vectors
        weights = torch.minimum(weights, d2) if chosen else d2
        chosen.append(new)
        have += count
    return torch.cat(chosen)


def _reseed_empty(
    x: Tensor, similarity: Tensor, centroids: Tensor, empty: Tensor, comm: Comm
) -> Tensor:
    """Centroids with each empty cluster moved onto one of the rows farthest from its centroid.

    Each rank offers its ``e`` least similar rows; the ``e`` least similar of all offers win.
    """
    e = empty.shape[0]
    n_local, d = x.shape
    take = min(e, n_local)
    sim_local, idx_local = torch.topk(similarity, take, largest=False)
    scores = torch.zeros(comm.world_size, e, dtype=torch.float64, device=x.device)
    scores[comm.rank] = math.inf
    scores[comm.rank, :take] = sim_local.double()
    slots = torch.full((comm.world_size, e), -1, dtype=torch.long, device=x.device)
    slots[comm.rank, :take] = idx_local
    comm.all_reduce(scores)
    rows = _gather_rows(x, slots.flatten(), comm, d)  # (world * e, D)
    best = torch.topk(scores.flatten(), e, largest=False).indices
    centroids = centroids.clone()
    centroids[empty] = rows[best]
    return centroids


def kmeans_step(
    x: Tensor, centroids: Tensor, comm: Comm, chunk_rows: int = CHUNK_ROWS
) -> tuple[Tensor, Tensor, Tensor]:
    """One Lloyd iteration on the sphere.

    Returns the new centroids (K, D) (L2-normalised member means; each empty cluster re-seeded
    on a row far from its centroid), this shard's assignment to the *old* centroids (N,), and
    the global member counts (K,) of that assignment.
    """
    k = centroids.shape[0]
    assignment, similarity = assign(x, centroids, chunk_rows)
    sums, counts = accumulate(x, assignment, k)
    comm.all_reduce(sums)
    comm.all_reduce(counts)
    new = F.normalize(sums, dim=1)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        new = _reseed_empty(x, similarity, new, empty, comm)
    return new, assignment, counts


def spherical_kmeans(
    x: Tensor,
    k: int,
    *,
    iters: int,
    seed: int,
    comm: Comm | None = None,
    init: Tensor | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> tuple[Tensor, Tensor]:
    """Spherical k-means of this rank's shard ``x`` (N, D) into ``k`` clusters.

    Rows are L2-normalised first (in fp32). ``iters`` Lloyd iterations (stopping early once no
    assignment changes anywhere), then a final assignment to the returned centroids.

    Args:
        comm: all-reduce across ranks; ``default_comm()`` when None.
        init: (K, D) starting centroids instead of k-means++ (tests use it).
    Returns:
        centroids (K, D) unit-norm and this shard's assignment (N,) int64.
    """
    comm = comm or default_comm()
    x = F.normalize(x.float(), dim=1)
    n_total = int(global_count(x.shape[0], comm, x.device).sum())
    if not 0 < k <= n_total:
        raise UserError(f"cannot make {k} clusters from {n_total} samples; lower the cluster count")
    if init is None:
        centroids = init_centroids(x, k, seed=seed, comm=comm, chunk_rows=chunk_rows)
    else:
        centroids = F.normalize(init.float().to(x.device), dim=1)
    previous: Tensor | None = None
    for _ in range(iters):
        new, assignment, counts = kmeans_step(x, centroids, comm, chunk_rows)
        if previous is not None:
            changed = comm.all_reduce((assignment != previous).sum().reshape(1))
            if int(changed) == 0 and bool((counts > 0).all()):
                break  # converged: the update would only recompute the same means
        centroids, previous = new, assignment
    assignment, _ = assign(x, centroids, chunk_rows)
    return centroids, assignment


def benchmark(n: int, d: int, k: int, iters: int, seed: int) -> float:
    """Seconds for ``spherical_kmeans`` of ``n`` random unit vectors in ``d`` dimensions.

    Not a test. On the 2-core development machine (fp32, 2 threads) 200000 x 128 -> 5000
    clusters, 10 iterations, took 64 s: each iteration is one 200k x 5k x 128 matmul
    plus the row-wise max; k-means++ initialisation costs about one more iteration::

        python -c "from pcavmae_cli.engine.prototypes.kmeans import benchmark as b; \
                   print(b(200_000, 128, 5_000, iters=10, seed=0))"
    """
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=gen), dim=1)
    start = time.perf_counter()
    spherical_kmeans(x, k, iters=iters, seed=seed, comm=Comm())
    return time.perf_counter() - start

