"""pcav's E-step k-means against faiss-cpu on the same data and the same start.

200,000 x 128 random unit vectors into 5,000 clusters, 10 Lloyd iterations (the issue's size).
Both start from the same centroids (k-means++ drawn by pcav, timed apart; faiss itself would
draw random rows) and both are rated by the same objective: the mean cosine similarity of each
vector to its nearest final centroid. faiss is only needed for this script
(``pip install faiss-cpu``), never by pcav. Not a test: run it on a quiet machine.

    python benchmarks/kmeans_vs_faiss.py --only pcav
    python benchmarks/kmeans_vs_faiss.py --only faiss
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pcavmae_cli.engine.bench.kmeans import bench_kmeans, objective, unit_features
from pcavmae_cli.engine.prototypes.comm import Comm
from pcavmae_cli.engine.prototypes.kmeans import init_centroids


def faiss_kmeans(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, float]:
    """faiss spherical k-means from ``init``: final centroids and seconds."""
    import faiss

    n, d = x.shape
    km = faiss.Kmeans(d, init.shape[0], niter=iters, spherical=True, seed=0, verbose=False,
                      max_points_per_centroid=n, min_points_per_centroid=1)  # fmt: skip
    xs = x.numpy()
    start = time.perf_counter()
    km.train(xs, init_centroids=init.numpy())
    return torch.from_numpy(km.centroids.copy()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=5_000)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=["pcav", "faiss"], help="run one side (its own process: torch's and "
                        "faiss's OpenMP thread pools in one process compete for the cores)")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average {os.getloadavg()}")
    x = unit_features(args.n, args.d, 0, torch.device("cpu"))
    start = time.perf_counter()
    init = init_centroids(x, args.k, seed=0, comm=Comm())
    print(f"k-means++ init (pcav): {time.perf_counter() - start:.2f} s; objective at init {objective(x, init):.5f}")
    for _ in range(args.repeats):
        if args.only != "faiss":
            r = bench_kmeans(args.n, args.d, args.k, iters=args.iters, seed=0, init=init)
            print(f"pcav  {args.iters} iterations (+ final assignment): {r.iter_seconds:.2f} s, objective {r.objective:.5f}",
                  flush=True)  # fmt: skip
        if args.only != "pcav":
            centroids, seconds = faiss_kmeans(x, init, args.iters)
            print(f"faiss {args.iters} iterations: {seconds:.2f} s, objective {objective(x, centroids):.5f}", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
