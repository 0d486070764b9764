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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pcavmae_cli.engine.bf16_speed import bf16_is_fast
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.prototypes.comm import Comm, default_comm, global_count

CHUNK_ROWS = 4096  # rows of x per similarity block: 4096 x 5000 floats = 80 MB
BF16_UNIT = 2.0**-9  # bf16 rounds to nearest with 8 significant bits: |bf16(v) - v| <= 2^-9 |v|
GROUPS = 16  # column slices of the bf16 assignment's strided maximum (assign_bf16)
# bf16 blocks of 1024 rows (10 MB at K = 5000) are read again by the strided maximum while still
# in cache: 1.2x faster than 4096-row blocks on the 2-core EPYC (docs/benchmarks.md, "E-step")
BF16_CHUNK_ROWS = 1024


@dataclass(frozen=True)
class Bf16Features:
    """The features in bf16 for the assignment's matrix product, and each row's rounding error
    ``||bf16(x) - x||``: made once per k-means, since the rows do not change between iterations."""

    x: Tensor  # (N, D) bf16
    error: Tensor  # (N,) fp32

    @staticmethod
    def of(x: Tensor) -> Bf16Features:
        low = x.to(torch.bfloat16)
        return Bf16Features(low, (low.float() - x).norm(dim=1))


def assign(
    x: Tensor,
    centroids: Tensor,
    chunk_rows: int = CHUNK_ROWS,
    low: Bf16Features | None = None,
    *,
    similarity: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Nearest centroid of each row by cosine similarity.

    Args:
        x: (N, D) unit-norm features.
        centroids: (K, D) unit-norm centroids.
        low: ``x`` in bf16 (``Bf16Features.of(x)``): the similarities are a bf16 matrix product
            and the rows it cannot decide are re-checked in fp32 (``assign_bf16``); the result
            is the fp32 assignment.
        similarity: whether the caller needs the similarities; without them the bf16 path
            skips the fp32 product of every row that has a single candidate (most rows).
    Returns:
        assignment (N,) int64 and the similarity to the assigned centroid (N,) (None where the
        bf16 path was told it is not needed).
    """
    if low is not None:
        return assign_bf16(x, low, centroids, chunk_rows, similarity=similarity)
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


def assign_bf16(
    x: Tensor, low: Bf16Features, centroids: Tensor, chunk_rows: int = CHUNK_ROWS, *, similarity: bool = True
) -> tuple[Tensor, Tensor | None]:
    """``assign`` with the similarity matrix in bf16 and the decision in fp32: the fp32 assignment.

    A bf16 similarity b_j of row x and centroid c_j differs from the fp32 one s_j by at most

        e = ||bf16(x) - x|| max_j ||bf16(c_j)|| + max_j ||bf16(c_j) - c_j||   (the inputs' rounding)
            + 2^-9 |b_j| (1 + 2^-8)                                         (the output's rounding)
            + D 2^-24 (1.1)                                                 (fp32 accumulation)

    so only centroids whose bf16 value is within ``margin`` (two such errors, taken at
    |b| <= |top| + 0.02) of the row's bf16 maximum can be its fp32 best. Those candidates -- one
    for most rows, a few where the best two are close -- get their fp32 similarity, and the best
    of them wins (ties: the lower index; a row whose two best are equal to fp32 rounding may get
    the other of the two than ``assign``'s fp32 product, whose sums round differently). A row
    with a single candidate needs no fp32 product unless its similarity is asked for.

    Finding the candidates reads the (rows, K) block once more, as a strided maximum over 16
    column slices (``GROUPS``): a row's maximum of each slice position, then the members of the
    positions within the margin (``_candidates``). Reading the block for an index (``max`` with
    indices, ``topk``) cost more than the bf16 product saved.
    """
    n, k = x.shape[0], centroids.shape[0]
    chunk_rows = min(chunk_rows, BF16_CHUNK_ROWS)
    width = -(-k // GROUPS)  # column positions per slice; the block is (rows, GROUPS * width)
    c_low = torch.zeros(GROUPS * width, x.shape[1], dtype=torch.bfloat16, device=x.device)
    c_low[:k] = centroids
    c_norm = c_low[:k].float().norm(dim=1).max()
    c_error = (c_low[:k].float() - centroids).norm(dim=1).max()
    accumulation = x.shape[1] * 2.0**-24 * 1.1
    assignment = torch.empty(n, dtype=torch.long, device=x.device)
    similarities = torch.empty(n, dtype=x.dtype, device=x.device) if similarity else None
    block = low.x.new_empty(min(chunk_rows, n), GROUPS * width)
    c_low_t = c_low.T
    for start in range(0, n, chunk_rows):
        stop = min(start + chunk_rows, n)
        m = stop - start
        sim = block[:m]
        torch.mm(low.x[start:stop], c_low_t, out=sim)  # (m, GROUPS * width) bf16
        sim[:, k:] = -math.inf  # padding columns are never candidates
        inputs = low.error[start:stop] * c_norm + c_error + accumulation
        rows, cols = _candidates(sim.view(m, GROUPS, width), inputs)
        first = assignment[start:stop]
        if not similarity:  # a lone candidate is its row's answer; only contested rows are re-checked
            first.scatter_(0, rows, cols)  # right for lone rows; contested ones are redone below
            contested = (torch.bincount(rows, minlength=m).index_select(0, rows) > 1).nonzero().squeeze(1)
            rows, cols = rows.index_select(0, contested), cols.index_select(0, contested)
            first.index_fill_(0, rows, k)
        else:
            first.fill_(k)
        exact = (x.index_select(0, start + rows) * centroids.index_select(0, cols)).sum(dim=1)
        best = torch.full((m,), -math.inf, dtype=x.dtype, device=x.device).scatter_reduce(0, rows, exact, "amax")
        first.scatter_reduce_(0, rows, torch.where(exact == best.index_select(0, rows), cols, k), "amin")
        if similarities is not None:
            similarities[start:stop] = best
    return assignment, similarities


def _floor(top: Tensor, inputs: Tensor) -> Tensor:
    """bf16 lower bound (rounded down) on the bf16 similarity of any centroid that can be the
    fp32 best of a row whose bf16 maximum is ``top`` (fp32) and input rounding error ``inputs``."""
    margin = (2 * inputs + 2 * BF16_UNIT * (1 + 2.0**-8) * (top.abs() + 0.02)) / (1 - 2.0**-8)
    floor = top - margin
    return (floor - 2.0**-8 * (floor.abs() + 1e-3)).to(torch.bfloat16)


def _candidates(slices: Tensor, inputs: Tensor) -> tuple[Tensor, Tensor]:
    """(row, column) of every centroid whose bf16 similarity is at or above its row's ``_floor``.

    ``slices`` is the (m, GROUPS, width) bf16 block. The maxima and comparisons run on its bits
    read as int16: for bf16 values >= +0 the integer order is the number order and every
    negative value (sign bit set) is a negative integer, so wherever the row's floor is above
    +0 the integer maximum and ``>=`` give the float answer, 5x faster than torch's bf16
    reductions on the CPU (which widen every element to fp32). Rows whose floor is at or below
    zero -- a row with no centroid in front of it, rare except for tiny K -- take the float path.
    """
    m, _, width = slices.shape
    bits = slices.view(torch.int16)
    per_position = bits.amax(dim=1)  # (m, width): strided, vectorised
    top = per_position.amax(dim=1).view(torch.bfloat16).float()
    floor = _floor(top, inputs).view(torch.int16)
    signed = floor <= 0  # the floor is -0, +0 or negative: integer order does not hold there
    any_signed = bool(signed.any())
    if any_signed:  # the float path for those rows only, its results spliced in
        few = signed.nonzero().squeeze(1)
        values = slices[few].float()
        low_floor = _floor(values.amax(dim=(1, 2)), inputs[few]).float()
        hit, group, position = (values >= low_floor[:, None, None]).nonzero(as_tuple=True)
        floor = floor.masked_fill(signed, torch.iinfo(torch.int16).max)  # no integer candidates
    row, position_i = (per_position >= floor[:, None]).nonzero(as_tuple=True)
    members = bits[row, :, position_i]  # (P, GROUPS): the columns at those positions
    pick, group_i = (members >= floor.index_select(0, row)[:, None]).nonzero(as_tuple=True)
    rows, cols = row.index_select(0, pick), group_i * width + position_i.index_select(0, pick)
    if any_signed:
        rows, cols = torch.cat([rows, few[hit]]), torch.cat([cols, group * width + position])
    return rows, cols


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
    x: Tensor, centroids: Tensor, comm: Comm, chunk_rows: int = CHUNK_ROWS, low: Bf16Features | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One Lloyd iteration on the sphere.

    Returns the new centroids (K, D) (L2-normalised member means; each empty cluster re-seeded
    on a row far from its centroid), this shard's assignment to the *old* centroids (N,), and
    the global member counts (K,) of that assignment.
    """
    k = centroids.shape[0]
    assignment, similarity = assign(x, centroids, chunk_rows, low, similarity=False)
    sums, counts = accumulate(x, assignment, k)  # fp32: the centroid update never sees bf16
    comm.all_reduce(sums)
    comm.all_reduce(counts)
    new = F.normalize(sums, dim=1)
    empty = (counts == 0).nonzero().squeeze(1)
    if empty.numel():
        if similarity is None:
            similarity = (x * centroids.index_select(0, assignment)).sum(dim=1)
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
    precision: str = "fp32",
) -> tuple[Tensor, Tensor]:
    """Spherical k-means of this rank's shard ``x`` (N, D) into ``k`` clusters.

    Rows are L2-normalised first (in fp32). ``iters`` Lloyd iterations (stopping early once no
    assignment changes anywhere), then a final assignment to the returned centroids.

    Args:
        comm: all-reduce across ranks; ``default_comm()`` when None.
        init: (K, D) starting centroids instead of k-means++ (tests use it).
        precision: the assignment's similarity matrix: ``fp32``; ``bf16`` (``assign_bf16``: the
            same assignment, re-checked in fp32 where bf16 cannot decide); ``auto``: bf16 where
            products of this shape are fast in it (``bf16_speed.bf16_is_fast``). The centroid
            update is fp32 in every case.
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
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be fp32, bf16 or auto, got {precision!r}")
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_is_fast(x.device, (x.shape[1], k)))
    low = Bf16Features.of(x) if use_bf16 else None
    previous: Tensor | None = None
    for _ in range(iters):
        new, assignment, counts = kmeans_step(x, centroids, comm, chunk_rows, low)
        if previous is not None:
            changed = comm.all_reduce((assignment != previous).sum().reshape(1))
            if int(changed) == 0 and bool((counts > 0).all()):
                break  # converged: the update would only recompute the same means
        centroids, previous = new, assignment
    assignment, _ = assign(x, centroids, chunk_rows, low, similarity=False)
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

