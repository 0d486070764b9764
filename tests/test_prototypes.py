"""The E-step: spherical k-means, density peaks, eq. 2 concentration, estep and its files.

Several ranks are simulated with threads whose ``all_reduce`` sums the tensors of all threads,
so the shard path runs the same code as under torch.distributed.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.prototypes import (
    Comm,
    accumulate,
    assign,
    build_prototypes,
    density_peaks,
    estep,
    kmeans_step,
    load_prototypes,
    normalise_concentration,
    raw_concentration,
    save_prototypes,
    spherical_kmeans,
)
from pcavmae_cli.engine.prototypes import step as step_module
from pcavmae_cli.engine.prototypes.density_peaks import cauchy_density, find_peaks, local_density, radius
from pcavmae_cli.engine.prototypes.kmeans import Bf16Features
from pcavmae_cli.engine.schema import PrototypeConfig


class ThreadComm(Comm):
    """Rank ``rank`` of ``group``: all_reduce sums every thread's tensor, in rank order."""

    def __init__(self, group: dict, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group["n"]

    def all_reduce(self, t):
        g = self.group
        g["slots"][self.rank] = t.clone()
        g["barrier"].wait()
        total = g["slots"][0].clone()
        for other in g["slots"][1:]:
            total += other
        g["barrier"].wait()
        return t.copy_(total)


def run_ranks(n, fn):
    """``fn(comm)`` on ``n`` threads, one per simulated rank; returns their results by rank."""
    group = {"n": n, "slots": [None] * n, "barrier": threading.Barrier(n, timeout=60)}
    results, errors = [None] * n, []

    def target(rank):
        try:
            results[rank] = fn(ThreadComm(group, rank))
        except BaseException as exc:  # surface it in the test, and free the other thread
            errors.append(exc)
            group["barrier"].abort()

    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if errors:
        raise errors[0]
    return results


def sphere_blobs(k=5, per=100, d=16, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(k, d, generator=g), dim=1)
    labels = torch.arange(k).repeat_interleave(per)
    perm = torch.randperm(k * per, generator=g)
    labels = labels[perm]
    x = F.normalize(centres[labels] + noise * torch.randn(k * per, d, generator=g), dim=1)
    return x, labels, centres


def purity(assignment, labels):
    """Fraction of samples whose cluster's majority label is their own."""
    hits = 0
    for c in assignment.unique():
        hits += torch.bincount(labels[assignment == c]).max().item()
    return hits / labels.numel()


def same_partition(a, b):
    """True if the two labellings group the samples the same way (cluster ids may differ)."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# --- spherical k-means --------------------------------------------------------------------


def test_kmeans_recovers_separated_clusters():
    x, labels, _ = sphere_blobs()
    centroids, assignment = spherical_kmeans(x, 5, iters=20, seed=0, comm=Comm())
    assert purity(assignment, labels) == 1.0 and assignment.unique().numel() == 5
    assert torch.allclose(centroids.norm(dim=1), torch.ones(5), atol=1e-5)


def test_kmeans_is_deterministic_for_a_seed():
    x, _, _ = sphere_blobs(k=8, per=30, noise=0.5)
    a = spherical_kmeans(x, 6, iters=5, seed=3, comm=Comm())
    b = spherical_kmeans(x, 6, iters=5, seed=3, comm=Comm())
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_assign_is_cosine_argmax_in_chunks():
    x, _, _ = sphere_blobs(k=3, per=50)
    centroids = F.normalize(torch.randn(7, 16), dim=1)
    idx, sim = assign(x, centroids, chunk_rows=16)
    full = x @ centroids.T
    assert torch.equal(idx, full.argmax(1)) and torch.allclose(sim, full.max(1).values)


@pytest.mark.parametrize("bf16", [False, True])  # bf16: the similarities are made for the re-seed
def test_kmeans_step_reseeds_an_empty_cluster_on_the_farthest_point(bf16):
    # a = (1,0), b = (0,1), c = (0.6,0.8); centroids (1,0) and (-1,0): every point joins
    # centroid 0 (b ties at similarity 0 and argmax takes the first), so cluster 1 is empty.
    # The point farthest from its centroid is b (similarity 0): cluster 1 restarts on b, and
    # centroid 0 is the normalised sum (1.6, 1.8) / |(1.6, 1.8)|.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    centroids = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    low = Bf16Features.of(x) if bf16 else None
    new, assignment, counts = kmeans_step(x, centroids, Comm(), low=low)
    assert assignment.tolist() == [0, 0, 0] and counts.tolist() == [3, 0]
    norm = math.hypot(1.6, 1.8)
    assert new[0].tolist() == pytest.approx([1.6 / norm, 1.8 / norm], abs=1e-6)
    assert new[1].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)


def test_kmeans_from_a_bad_start_ends_with_no_empty_cluster():
    x, labels, centres = sphere_blobs(k=3, per=40)
    init = torch.cat([centres[:2], -centres[:1]])  # the third starts where no point is
    _, assignment = spherical_kmeans(x, 3, iters=10, seed=0, comm=Comm(), init=init)
    assert torch.bincount(assignment, minlength=3).min() > 0 and purity(assignment, labels) == 1.0


def test_kmeans_refuses_more_clusters_than_samples():
    with pytest.raises(UserError, match="cannot make 11 clusters from 10 samples"):
        spherical_kmeans(torch.randn(10, 4), 11, iters=1, seed=0, comm=Comm())


def test_shard_accumulations_sum_to_the_single_process_ones():
    x, _, _ = sphere_blobs(k=4, per=25)
    centroids = F.normalize(torch.randn(4, 16), dim=1)
    sums, counts = accumulate(x, assign(x, centroids)[0], 4)
    parts = [accumulate(s, assign(s, centroids)[0], 4) for s in (x[:37], x[37:])]
    assert torch.allclose(parts[0][0] + parts[1][0], sums, atol=1e-5)
    assert torch.equal(parts[0][1] + parts[1][1], counts)


def test_two_ranks_give_the_single_process_kmeans():
    x, _, _ = sphere_blobs(k=5, per=60, noise=0.3)
    single_c, single_a = spherical_kmeans(x, 7, iters=8, seed=1, comm=Comm())
    shards = (x[:130], x[130:])
    results = run_ranks(2, lambda comm: spherical_kmeans(shards[comm.rank], 7, iters=8, seed=1, comm=comm))
    assert torch.allclose(results[0][0], single_c, atol=1e-5)
    assert torch.equal(results[0][0], results[1][0])  # every rank holds the same centroids
    assert torch.equal(torch.cat([results[0][1], results[1][1]]), single_a)


# --- density peaks ------------------------------------------------------------------------

BLOB_CENTRES = torch.tensor([[5.0, 5.0], [-5.0, 5.0], [-5.0, -5.0], [5.0, -5.0]])


def plane_blobs(per=50, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per)
    return BLOB_CENTRES[labels] + std * torch.randn(4 * per, 2, generator=g), labels


def dp(x, g, **kw):
    args = dict(max_points_exact=10_000, overcluster_k=1, iters=10, seed=0, comm=Comm())
    return density_peaks(x, g, **{**args, **kw})


def test_density_peaks_find_the_modes_of_a_mixture():
    # mean pairwise distance ~ (1/4 * 0.4 + 1/2 * 10 + 1/4 * 14.1) ~ 8.6, so granularity 4 gives
    # sigma ~ 2.2: wider than a blob (std 0.3), far below the gap between blobs (10).
    x, labels = plane_blobs()
    peaks, assignment = dp(x, 4.0)
    assert peaks.shape == (4, 2) and purity(assignment, labels) == 1.0
    for c in range(4):
        members = x[assignment == c]
        blob = labels[assignment == c][0]
        assert (members.mean(0) - BLOB_CENTRES[blob]).norm() < 0.15
        assert (peaks[c] - BLOB_CENTRES[blob]).norm() < 0.3  # the sample at the blob's heart


def test_cauchy_density_by_hand():
    # (0,0), (2,0), (4,0): mu = (2,0), X = (0 + 4 + 16) / 3, X - |mu|^2 = 8/3
    # D = 1 / (1 + 4 / (8/3)) = 0.4 at both ends, 1 in the middle.
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    assert cauchy_density(points).tolist() == pytest.approx([0.4, 1.0, 0.4], abs=1e-6)
    # a radius covering everything: the local density is N times the global one
    ones = torch.ones(3)
    assert local_density(points, ones, 100.0).tolist() == pytest.approx([1.2, 3.0, 1.2], abs=1e-6)
    # radius 2.5: the ends see {end, middle}: mu_i = (1,0) or (3,0), X_i - |mu_i|^2 = 1, 1/(1+1) * 2 = 1;
    # the middle sees all three: 3.
    assert local_density(points, ones, 2.5).tolist() == pytest.approx([1.0, 3.0, 1.0], abs=1e-6)
    # radius 1: each point alone: S = 1, at its own mean -> 1.
    assert local_density(points, ones, 1.0).tolist() == pytest.approx([1.0, 1.0, 1.0], abs=1e-6)
    # weights count as repeated points: the right end twice -> X - |mu|^2 over {0,2,4,4}
    w = torch.tensor([1.0, 1.0, 2.0])
    # mu = 2.5, var = (6.25 + 0.25 + 2 * 2.25) / 4 = 2.75; D(0) = 4 / (1 + 6.25/2.75) ...
    expected = [4 / (1 + 6.25 / 2.75), 4 / (1 + 0.25 / 2.75), 4 / (1 + 2.25 / 2.75)]
    assert local_density(points, w, 100.0).tolist() == pytest.approx(expected, abs=1e-6)


def test_peaks_by_hand():
    # radius 2.5 on (0,0), (2,0), (4,0): the middle (density 3) beats both ends (1): one peak.
    points = torch.tensor([[0.0, 0.0], [2.0, 0.0], [4.0, 0.0]])
    assert find_peaks(points, torch.ones(3), 2.5).tolist() == [1]
    # radius 1: nobody has a neighbour, three peaks; equal densities never block each other
    assert find_peaks(points, torch.ones(3), 1.0).tolist() == [0, 1, 2]
    # two identical points: the tie goes to the lower index
    twins = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    assert find_peaks(twins, torch.ones(2), 0.5).tolist() == [0]
    # mean pairwise distance of the three points: (2 + 4 + 2) / 3; granularity 2 halves it
    assert radius(points, torch.ones(3), 2.0) == pytest.approx(8 / 3 / 2)


def test_more_granularity_gives_more_prototypes():
    x, _ = plane_blobs()
    counts = [dp(x, g)[0].shape[0] for g in (0.5, 4.0, 500.0)]
    # sigma ~ 17 covers everything: one peak; ~2.2: one per blob; ~0.02: most samples alone
    assert counts[0] == 1 and counts[1] == 4 and counts[2] > 50


def axis_blobs(per=100, d=8, noise=0.05, seed=0):
    """4 tight blobs around the first 4 unit axes (distance sqrt(2) apart), unit-norm."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(4).repeat_interleave(per)[torch.randperm(4 * per, generator=g)]
    centres = torch.eye(d)[:4]
    return F.normalize(centres[labels] + noise * torch.randn(4 * per, d, generator=g), dim=1), labels


def test_density_peaks_over_clustering_path_finds_the_blobs():
    x, labels = axis_blobs()
    peaks, assignment = dp(x, 3.0, max_points_exact=10, overcluster_k=40)  # forced over-clustering
    assert peaks.shape[0] == 4 and purity(assignment, labels) == 1.0


def test_density_peaks_two_ranks_equal_one():
    x, _ = axis_blobs()
    kw = dict(max_points_exact=0, overcluster_k=24, iters=10, seed=2)
    single_p, single_a = density_peaks(x, 3.0, comm=Comm(), **kw)
    shards = (x[:150], x[150:])
    results = run_ranks(2, lambda comm: density_peaks(shards[comm.rank], 3.0, comm=comm, **kw))
    assert torch.allclose(results[0][0], single_p, atol=1e-5)
    assert torch.equal(torch.cat([results[0][1], results[1][1]]), single_a)


# --- concentration, eq. 2 -----------------------------------------------------------------


def test_raw_concentration_by_hand():
    p = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    z_v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    z_a = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]])
    assignment = torch.tensor([0, 0, 1, 1, 1, 2])
    gamma, counts = raw_concentration(p, z_a, z_v, assignment, beta=10.0, comm=Comm())
    # cluster 0 (2 clips): video distances 0, sqrt2; audio sqrt2, 0 -> (sqrt2/2 + sqrt2/2) / log(2+2+10)
    g0 = math.sqrt(2) / math.log(14)
    # cluster 1 (3 clips): video 0, 0, 0; audio 0, 0, sqrt2 -> (0 + sqrt2/3) / log(3+3+10)
    g1 = (math.sqrt(2) / 3) / math.log(16)
    # cluster 2 is a singleton: the largest gamma of the others
    assert gamma.tolist() == pytest.approx([g0, g1, max(g0, g1)], abs=1e-6)
    assert counts.tolist() == [2, 3, 1]


def test_normalise_concentration_clamps_and_rescales():
    # 0..10: 10th percentile 1, 90th 9 -> [1, 1, 2, ..., 9, 9], mean 55/11 = 5 -> x * 0.1 / 5
    gamma = torch.arange(11, dtype=torch.float32)
    out = normalise_concentration(gamma, tau=0.1, percentiles=(10, 90))
    assert out.tolist() == pytest.approx([0.02 * v for v in [1, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9]], abs=1e-6)
    # [1, 2, 3, 4]: percentiles at positions 0.3 and 2.7 -> 1.3 and 3.7; mean 2.5
    out = normalise_concentration(torch.tensor([1.0, 2.0, 3.0, 4.0]), tau=0.1, percentiles=(10, 90))
    assert out.tolist() == pytest.approx([0.052, 0.08, 0.12, 0.148], abs=1e-6)


# --- estep and files ----------------------------------------------------------------------


def paired_embeddings():
    """Audio and video embeddings of 400 clips from 4 classes, each modality noisy."""
    x, labels = axis_blobs()
    g = torch.Generator().manual_seed(5)
    z_a = F.normalize(x + 0.05 * torch.randn(x.shape, generator=g), dim=1)
    z_v = F.normalize(x + 0.05 * torch.randn(x.shape, generator=g), dim=1)
    return z_a, z_v, labels


def kmeans_cfg(**kw):
    base = dict(method="kmeans", kmeans_iters=20, beta=10.0, tau=0.1, gamma_percentiles=[10.0, 90.0],
                warmup_epochs=0, seed=0, num_clusters=[4, 8])
    return PrototypeConfig(**{**base, **kw})


def test_estep_kmeans_levels():
    z_a, z_v, labels = paired_embeddings()
    levels = estep(z_a, z_v, kmeans_cfg(), comm=Comm())
    assert [p.centroids.shape[0] for p in levels] == [4, 8]
    coarse = levels[0]
    assert purity(coarse.assignments, labels) == 1.0
    assert coarse.gamma.mean().item() == pytest.approx(0.1, abs=1e-6)
    assert coarse.counts.sum().item() == 400
    for field in (coarse.centroids, coarse.p_a, coarse.p_v):
        assert torch.allclose(field.norm(dim=1), torch.ones(4), atol=1e-5)
    # p_a is the normalised mean of the audio embeddings of cluster 0's clips
    members = coarse.assignments == 0
    assert torch.allclose(coarse.p_a[0], F.normalize(z_a[members].mean(0), dim=0), atol=1e-5)


def test_estep_density_peaks():
    z_a, z_v, labels = paired_embeddings()
    cfg = kmeans_cfg(method="density_peaks", num_clusters=None, granularities=[3.0, 1000.0],
                     max_points_exact=1000, overcluster_k=40)
    coarse, fine = estep(z_a, z_v, cfg, comm=Comm())
    assert coarse.centroids.shape[0] == 4 and purity(coarse.assignments, labels) == 1.0
    assert fine.centroids.shape[0] > coarse.centroids.shape[0]


def test_build_prototypes_drops_empty_clusters():
    z_a, z_v, _ = paired_embeddings()
    assignment = torch.where(torch.arange(400) < 200, 1, 3)  # clusters 0 and 2 empty
    protos = build_prototypes(z_a, z_v, assignment, 4, beta=10.0, tau=0.1, percentiles=(10, 90), comm=Comm())
    assert protos.centroids.shape[0] == 2 and protos.counts.tolist() == [200, 200]
    assert protos.assignments.unique().tolist() == [0, 1]


def test_estep_two_ranks_equal_one():
    z_a, z_v, _ = paired_embeddings()
    cfg = kmeans_cfg(num_clusters=[6])
    (single,) = estep(z_a, z_v, cfg, comm=Comm())
    cut = 170
    results = run_ranks(2, lambda comm: estep(*(z[:cut] if comm.rank == 0 else z[cut:] for z in (z_a, z_v)),
                                              cfg, comm=comm)[0])
    assert torch.equal(torch.cat([results[0].assignments, results[1].assignments]), single.assignments)
    for field in ("centroids", "p_a", "p_v", "gamma"):
        assert torch.allclose(getattr(results[1], field), getattr(single, field), atol=1e-5)


def test_balanced_embedding_by_hand():
    # audio: two clips at (1, 0) and (0, 1); mean (1/2, 1/2), centred +-(1/2, -1/2), mean square 1/2
    z_a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    # video: unit (0, 0, +-1) once normalised; mean 0, so centred the same, mean square 1
    z_v = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -3.0]])
    x = step_module.balanced_embedding(z_a, z_v, Comm())
    s = 2**-0.5
    audio = torch.tensor([[s, -s, 0.0], [-s, s, 0.0]])  # (1/2, -1/2) / sqrt(1/2)
    video = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, -1.0]])  # (0, 0, +-1) / 1
    assert torch.allclose(x, F.normalize(audio + video, dim=1), atol=1e-6)


def collapsed_audio(seed=2):
    """Audio embeddings that all point nearly one way but vary with a grouping of their own
    (``a_groups``); video embeddings well spread in two groups (``v_groups``) unrelated to it."""
    g = torch.Generator().manual_seed(seed)
    n, d = 400, 16
    a_groups, v_groups = torch.arange(n) % 2, (torch.arange(n) // 2) % 2
    a_dirs, v_dirs = F.normalize(torch.randn(2, d, generator=g), dim=1), F.normalize(torch.randn(2, d, generator=g), dim=1)
    common = F.normalize(torch.randn(d, generator=g), dim=0)
    z_a = F.normalize(common + 0.1 * a_dirs[a_groups] + 0.01 * torch.randn(n, d, generator=g), dim=1)
    z_v = F.normalize(v_dirs[v_groups] + 0.05 * torch.randn(n, d, generator=g), dim=1)
    return z_a, z_v, a_groups, v_groups


def test_balanced_clusters_follow_a_collapsed_modality_as_well():
    """On the joint embedding the nearly collapsed audio has no say: 4 clusters are the 2 video
    groups split at random. Balanced, each of the 4 clusters is one (audio, video) group pair.
    (The data's seed is one where k-means++ does not start two centroids in one pair: the test
    is about the embedding, not about k-means' local minima.)"""
    z_a, z_v, a_groups, v_groups = collapsed_audio()
    pair = 2 * a_groups + v_groups
    (joint,) = estep(z_a, z_v, kmeans_cfg(num_clusters=[4]), comm=Comm())
    (balanced,) = estep(z_a, z_v, kmeans_cfg(num_clusters=[4], cluster_on="balanced"), comm=Comm())
    assert purity(joint.assignments, v_groups) == 1.0 and purity(joint.assignments, pair) < 0.8
    assert purity(balanced.assignments, pair) == 1.0
    # the prototypes are still made on the joint embedding (only the assignment differs)
    members = balanced.assignments == 0
    joint_members = step_module.joint_embedding(z_a[members], z_v[members])
    assert torch.allclose(balanced.centroids[0], F.normalize(joint_members.mean(0), dim=0), atol=1e-5)


def test_balanced_embedding_two_ranks_equal_one():
    z_a, z_v, _, _ = collapsed_audio()
    single = step_module.balanced_embedding(z_a, z_v, Comm())
    cut = 150
    parts = run_ranks(2, lambda comm: step_module.balanced_embedding(
        *(z[:cut] if comm.rank == 0 else z[cut:] for z in (z_a, z_v)), comm))
    assert torch.allclose(torch.cat(parts), single, atol=1e-6)


@pytest.mark.parametrize("with_safetensors", [True, False])
def test_save_and_load_round_trip(tmp_path, monkeypatch, with_safetensors):
    if not with_safetensors:
        monkeypatch.setattr(step_module, "_safetensors", None)
    else:
        assert step_module._safetensors is not None, "safetensors is a declared dependency of pcav"
    z_a, z_v, _ = paired_embeddings()
    levels = estep(z_a, z_v, kmeans_cfg(), comm=Comm())
    path = save_prototypes(levels, tmp_path, epoch=3)  # index 3: the 4th epoch, named by its number
    assert path.name == "prototypes-epoch0004." + ("safetensors" if with_safetensors else "pt")
    loaded = load_prototypes(tmp_path, 3)
    assert len(loaded) == 2
    for a, b in zip(levels, loaded):
        for field in ("centroids", "p_a", "p_v", "gamma", "assignments", "counts"):
            assert torch.equal(getattr(a, field), getattr(b, field))
    with pytest.raises(UserError, match="no prototypes for epoch 5"):  # index 4: the 5th epoch
        load_prototypes(tmp_path, 4)


def test_prototype_config_validation():
    with pytest.raises(UserError, match="num_clusters"):
        kmeans_cfg(num_clusters=None)
    with pytest.raises(UserError, match="granularities"):
        kmeans_cfg(method="density_peaks")
    with pytest.raises(UserError, match="gamma_percentiles"):
        kmeans_cfg(gamma_percentiles=[90.0, 10.0])


# ---------------------------------------------------------------- bf16 assignment


def test_the_bf16_assignment_is_the_fp32_assignment():
    from pcavmae_cli.engine.prototypes.kmeans import Bf16Features, assign

    gen = torch.Generator().manual_seed(3)
    x = F.normalize(torch.randn(3000, 64, generator=gen), dim=1)
    for k in (1, 7, 257):  # 257: the 16 column slices get padding
        c = F.normalize(torch.randn(k, 64, generator=gen), dim=1)
        exact, sim = assign(x, c)
        fast, fast_sim = assign(x, c, chunk_rows=1000, low=Bf16Features.of(x))
        assert torch.equal(fast, exact), k
        assert torch.allclose(fast_sim, sim, atol=1e-6)
        # without similarities, rows with one candidate skip the fp32 product: the same answer
        lone, none = assign(x, c, chunk_rows=1000, low=Bf16Features.of(x), similarity=False)
        assert torch.equal(lone, exact) and none is None, k


def test_a_near_tie_bf16_cannot_see_is_decided_in_fp32():
    from pcavmae_cli.engine.prototypes.kmeans import Bf16Features, assign

    # x = e0; c0 = normalise(e0 + 0.0110 e1), c1 = normalise(e0 + 0.0105 e1): cos 0.999940 and
    # 0.999945, both 1.0 in bf16. fp32 says c1; bf16's first maximum would say c0.
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    c = torch.zeros(2, 8)
    c[:, 0], c[0, 1], c[1, 1] = 1.0, 0.0110, 0.0105
    c = F.normalize(c, dim=1)
    low = Bf16Features.of(x)
    bf16_sims = (low.x @ c.to(torch.bfloat16).T).float()
    assert bf16_sims[0, 0] == bf16_sims[0, 1]  # bf16 alone cannot tell them apart
    assert assign(x, c)[0].item() == 1 and assign(x, c, low=low)[0].item() == 1
    assert assign(x, c, low=low, similarity=False)[0].item() == 1


def test_bf16_kmeans_gives_the_fp32_clusters():
    gen = torch.Generator().manual_seed(5)
    centres = F.normalize(torch.randn(12, 32, generator=gen), dim=1)
    x = F.normalize(centres.repeat_interleave(50, 0) + 0.3 * torch.randn(600, 32, generator=gen), dim=1)
    fp32 = spherical_kmeans(x, 12, iters=8, seed=0, comm=Comm(), precision="fp32")
    bf16 = spherical_kmeans(x, 12, iters=8, seed=0, comm=Comm(), precision="bf16")
    assert torch.equal(fp32[1], bf16[1]) and torch.equal(fp32[0], bf16[0])
    with pytest.raises(ValueError, match="precision"):
        spherical_kmeans(x, 12, iters=1, seed=0, comm=Comm(), precision="fp16")


def test_bf16_candidates_read_as_integers_are_the_float_candidates():
    from pcavmae_cli.engine.prototypes.kmeans import GROUPS, _candidates, _floor

    gen = torch.Generator().manual_seed(11)
    width = 7
    block = (0.3 * torch.randn(64, GROUPS * width, generator=gen)).to(torch.bfloat16)
    block[:8] = -block[:8].abs()  # rows with no centroid in front: every similarity negative
    block[8:12] = -block[8:12].abs() * 1e-3  # maxima just below zero
    block[12, :] = 0.0  # a row whose best is exactly +0
    block[13, :] = -0.0
    block[14, 5] = 1e-3  # a floor just above zero: the integer path with -0 and negatives around
    block[14, 6:] = -0.0
    inputs = torch.rand(64, generator=gen) * 1e-3
    values = block.float()
    floor = _floor(values.amax(dim=1), inputs).float()
    expected = {(int(r), int(c)) for r, c in zip(*(values >= floor[:, None]).nonzero(as_tuple=True))}
    rows, cols = _candidates(block.view(64, GROUPS, width), inputs)
    group, position = cols // width, cols % width
    got = {(int(r), int(g * width + p)) for r, g, p in zip(rows, group, position)}
    # _candidates' columns are slice-major (group * width + position) like the block's own columns
    assert got == expected and len(rows) == len(expected)
    assert any(r < 14 for r, _ in expected) and any(r >= 15 for r, _ in expected)
