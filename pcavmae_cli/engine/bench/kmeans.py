"""Seconds of the E-step's clustering: spherical k-means of N x D unit vectors into K clusters.

The features are random unit vectors (the cost of k-means does not depend on their values, only
on N, D, K and the iterations). Initialisation (k-means++) is timed apart from the Lloyd
iterations, because it is the part other libraries do differently (faiss draws random rows).
The objective is the mean cosine similarity of each vector to its assigned centroid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pcavmae_cli.engine.bench.peak import sync
from pcavmae_cli.engine.prototypes.comm import Comm
from pcavmae_cli.engine.prototypes.kmeans import assign, init_centroids, spherical_kmeans


@dataclass
class KMeansResult:
    n: int
    d: int
    k: int
    iters: int
    init_seconds: float  # k-means++
    iter_seconds: float  # ``iters`` Lloyd iterations plus the final assignment
    objective: float  # mean cosine similarity to the assigned centroid


def unit_features(n: int, d: int, seed: int, device: torch.device) -> torch.Tensor:
    """(N, D) random unit vectors."""
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen), dim=1).to(device)


def objective(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of ``x`` to their nearest centroid."""
    _, sim = assign(x, centroids)
    return float(sim.double().mean())


def bench_kmeans(
    n: int, d: int, k: int, *, iters: int, seed: int = 0, device: torch.device | None = None,
    init: torch.Tensor | None = None, precision: str = "fp32",
) -> KMeansResult:  # fmt: skip
    """Time k-means++ and ``iters`` Lloyd iterations of ``n`` x ``d`` unit vectors into ``k`` clusters.

    ``init`` (K, D) replaces k-means++ (to compare with another library from the same start).
    """
    device = device or torch.device("cpu")
    x = unit_features(n, d, seed, device)
    init_seconds = 0.0
    if init is None:
        start = time.perf_counter()
        init = init_centroids(x, k, seed=seed, comm=Comm())
        sync(device)
        init_seconds = time.perf_counter() - start
    start = time.perf_counter()
    centroids, _ = spherical_kmeans(x, k, iters=iters, seed=seed, comm=Comm(), init=init.to(device),
                                    precision=precision)  # fmt: skip
    sync(device)
    iter_seconds = time.perf_counter() - start
    return KMeansResult(n, d, k, iters, init_seconds, iter_seconds, objective(x, centroids))
