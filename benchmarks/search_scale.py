"""Where ``pcav search``'s brute force stops being quick: seconds per query against library size.

For each library size N (random unit vectors of width D, float32, as ``pcav embed`` writes them),
one query is answered by the exact brute-force product ``pcav search`` uses (``search.nearest``)
and by faiss: its exact inner-product index (``IndexFlatIP``) and the HNSW graph ``--faiss``
builds (approximate; its build time and recall@10 against the exact answer are printed too).
The sides alternate in one process (brute, flat, hnsw, brute, ...), min and median of the
repeats, with the load average and thread counts printed.

    python benchmarks/search_scale.py                      # N = 1e4, 1e5, 1e6 at D = 256
    python benchmarks/search_scale.py --sizes 100000 --width 768 --repeats 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pcavmae_cli.engine.search import Library, nearest


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    import faiss

    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, faiss threads "
          f"{faiss.omp_get_max_threads()}, width {args.width}, top {args.top}")  # fmt: skip
    print("| clips | brute force (pcav search) min / median | faiss flat min / median | faiss HNSW min / median "
          "| HNSW build | HNSW recall@10 |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n in args.sizes:
        x = rng.standard_normal((n, args.width), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        lib = Library(Path("."), [str(i) for i in range(n)], [""] * n, [""] * n, {"joint": x}, None)
        flat = faiss.IndexFlatIP(args.width)
        flat.add(x)
        build, hnsw = _timed(lambda: _hnsw(x))
        times: dict[str, list[float]] = {"brute": [], "flat": [], "hnsw": []}
        recalls = []
        for _ in range(args.repeats):
            q = rng.standard_normal(args.width, dtype=np.float32)
            q /= np.linalg.norm(q)
            t, hits = _timed(lambda: nearest(lib, q, "joint", args.top))
            times["brute"].append(t)
            t, _ = _timed(lambda: flat.search(q[None], args.top))
            times["flat"].append(t)
            t, (_, found) = _timed(lambda: hnsw.search(q[None], args.top))
            times["hnsw"].append(t)
            exact = {h.row for h in hits}
            recalls.append(len(exact & set(found[0].tolist())) / args.top)
        cells = [f"{min(v) * 1e3:.2f} / {statistics.median(v) * 1e3:.2f} ms" for v in times.values()]
        print(f"| {n:,} | {' | '.join(cells)} | {build:.1f} s | {statistics.mean(recalls):.2f} |")


def _hnsw(x: np.ndarray):
    import faiss

    index = faiss.IndexHNSWFlat(x.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 64
    index.add(x)
    return index


if __name__ == "__main__":
    main()
