"""Where ``pcav search``'s brute force stops being quick, and what its faiss IVF index buys.

For each library size N (unit vectors of width D, float32, as ``pcav embed`` writes them), one
query at a time is answered by the exact brute-force product (``search.nearest``) and by the
library's IVF index (``nearest(..., use_faiss=True)``: built once, kept on disk, read with
mmap), alternating (brute, ivf, brute, ...) in one process; min and median of the repeats, the
IVF index's build time and its recall@10 against the exact answer, the time to open the
library from its files (``open_library`` + reading the feature), with the load average and
thread counts printed. Two kinds of data: ``random`` (unstructured: the worst case for any
index) and ``clustered`` (1000 clusters with spread: how embeddings of real clips look).

    python benchmarks/search_scale.py                                  # N = 1e4, 1e5, 1e6, D = 256
    python benchmarks/search_scale.py --sizes 100000 --width 768 --repeats 7 --kinds clustered
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pcavmae_cli.engine.search import ivf_lists, nearest, open_library


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def library_data(kind: str, n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return rng.standard_normal((n, d), dtype=np.float32)
    centres = rng.standard_normal((1000, d), dtype=np.float32)
    x = centres[rng.integers(0, 1000, n)]
    x += 0.5 * rng.standard_normal((n, d), dtype=np.float32)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["clustered", "random"], choices=["clustered", "random"])
    args = parser.parse_args()
    import faiss

    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}, faiss threads "
          f"{faiss.omp_get_max_threads()}, width {args.width}, top {args.top}")  # fmt: skip
    print("| data | clips | open + read feature | brute force min / median | IVF min / median | brute / IVF "
          "| IVF lists | IVF build | IVF recall@10 |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for kind in args.kinds:
        for n in args.sizes:
            x = library_data(kind, n, args.width, rng)
            with tempfile.TemporaryDirectory() as tmp:
                np.save(Path(tmp) / "joint.npy", x)
                (Path(tmp) / "index.csv").write_text("row,id,labels,source\n" + "".join(f"{i},{i},,\n" for i in range(n)))
                opened, lib = _timed(lambda: open_library(tmp))
                read, _ = _timed(lambda: lib.feature("joint"))
                build, _ = _timed(lambda: nearest(lib, x[0], "joint", 1, use_faiss=True))  # builds and keeps the index
                times: dict[str, list[float]] = {"brute": [], "ivf": []}
                recalls = []
                for _ in range(args.repeats):
                    q = x[rng.integers(0, n)] + 0.1 * rng.standard_normal(args.width, dtype=np.float32)
                    t, exact = _timed(lambda: nearest(lib, q, "joint", args.top))
                    times["brute"].append(t)
                    t, found = _timed(lambda: nearest(lib, q, "joint", args.top, use_faiss=True))
                    times["ivf"].append(t)
                    recalls.append(len({h.row for h in exact} & {h.row for h in found}) / args.top)
            cells = [f"{min(v) * 1e3:.2f} / {statistics.median(v) * 1e3:.2f} ms" for v in times.values()]
            ratio = statistics.median(times["brute"]) / statistics.median(times["ivf"])
            print(f"| {kind} | {n:,} | {opened + read:.2f} s | {' | '.join(cells)} | {ratio:.1f}x | {ivf_lists(n)} "
                  f"| {build:.1f} s | {statistics.mean(recalls):.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
