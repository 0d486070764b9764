"""pcav's E-step k-means against faiss-cpu: same data, same start, sides alternated.

200,000 x 128 random unit vectors into 5,000 clusters, 10 Lloyd iterations (issue size), by three
sides: pcav with an fp32 assignment, pcav with the bf16 assignment (``prototypes.assign_precision``;
re-checked in fp32, the same clusters), and faiss ``Kmeans(spherical=True)``. Every side delivers
what the E-step needs, the centroids and each row's cluster under them: pcav's
``spherical_kmeans`` makes 10 assignments with their centroid updates and a final assignment,
faiss's ``train`` the same 10 and ``Kmeans.assign`` the final one (11 assignments each). Each side
lives in its own persistent worker process (torch's and faiss's OpenMP pools in one process
compete for the cores), built once; the controller then asks them in turn, A, B, C, A, B, C, ... for
``--repeats`` rounds, so every side sees the same machine state, and prints each side's min and
median seconds, its objective (mean cosine of each vector to its nearest final centroid, by one
fp32 function), the assignment FLOP rate (2 N K D per iteration, plus the final assignment)
against the in-run matmul peaks measured in the pcav worker before and after, thread counts,
the load average, and the ratios. faiss is needed only here (``pip install faiss-cpu``).
Not a test: run it on a quiet machine.

    python benchmarks/kmeans_vs_faiss.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import time

from alternate import Worker, alternate, summary

WORKER = r"""
import json, sys, time, torch
from pcavmae_cli.engine.bench.kmeans import objective, unit_features
from pcavmae_cli.engine.bench.peak import matmul_peak
from pcavmae_cli.engine.prototypes.comm import Comm
from pcavmae_cli.engine.prototypes.kmeans import init_centroids, spherical_kmeans
side, n, d, k, iters = sys.argv[1], *map(int, sys.argv[2:6])
x = unit_features(n, d, 0, torch.device("cpu"))
init = init_centroids(x, k, seed=0, comm=Comm())  # the same start for every side
if side == "faiss":
    import faiss
    xs, start_c = x.numpy(), init.numpy()
    def run():
        km = faiss.Kmeans(d, k, niter=iters, spherical=True, seed=0, verbose=False,
                          max_points_per_centroid=n, min_points_per_centroid=1)
        km.train(xs, init_centroids=start_c)
        km.assign(xs)  # every row's cluster under the final centroids: the E-step's output
        return torch.from_numpy(km.centroids.copy())
    threads = faiss.omp_get_max_threads()
else:
    precision = side.split("-")[1]
    def run():
        return spherical_kmeans(x, k, iters=iters, seed=0, comm=Comm(), init=init, precision=precision)[0]
    threads = torch.get_num_threads()
print(json.dumps({"ready": True, "threads": threads}), flush=True)
for line in sys.stdin:
    if line.strip() == "peaks":
        print(json.dumps({p: matmul_peak(dt, torch.device("cpu"), shape=(4096, d, k))
                          for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}), flush=True)
        continue
    start = time.perf_counter()
    centroids = run()
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "objective": objective(x, centroids)}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--k", type=int, default=5_000)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=["pcav-fp32", "pcav-bf16", "faiss"])
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {args.n} x {args.d} -> {args.k}, {args.iters} iterations; "
          f"load average {os.getloadavg()}", flush=True)  # fmt: skip
    argv = [str(args.n), str(args.d), str(args.k), str(args.iters)]
    workers = [Worker(side, WORKER, [side, *argv]) for side in args.sides]  # each builds its data and start once
    pcav = next((w for w in workers if w.side.startswith("pcav")), None)
    peaks = [pcav.ask("peaks")] if pcav else []
    results = alternate(workers, args.repeats)
    if pcav:
        peaks.append(pcav.ask("peaks"))
    for w in workers:
        w.close()
    flop = 2.0 * args.n * args.k * args.d * (args.iters + 1)  # the iterations' assignments and the final one
    print(f"in-run matmul peak (4096 x {args.d} x {args.k}), before / after: "
          + ", ".join(f"{p} {peaks[0][p]:.0f} / {peaks[-1][p]:.0f} GFLOP/s" for p in ("fp32", "bf16")) if peaks else "")
    print(f"| side | threads | min s | median s | objective | assignment GFLOP/s (median) | of the in-run {'{'}fp32, bf16{'}'} peak |")
    print("|---|---|---|---|---|---|---|")
    medians = {}
    for w in workers:
        secs = [x["seconds"] for x in results[w.side]]
        _, medians[w.side] = summary(secs)
        rate = flop / medians[w.side] / 1e9
        peak = max(p["bf16" if w.side.endswith("bf16") else "fp32"] for p in peaks) if peaks else float("nan")
        print(f"| {w.side} | {w.info['threads']} | {min(secs):.2f} | {medians[w.side]:.2f} | "
              f"{results[w.side][-1]['objective']:.5f} | {rate:.0f} | {100 * rate / peak:.0f} % |")  # fmt: skip
    if "faiss" in medians:
        for side, m in medians.items():
            if side != "faiss":
                print(f"faiss / {side} (median seconds): {medians['faiss'] / m:.2f}x")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
