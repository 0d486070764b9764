"""Throughput of the data pipeline on this machine: demo corpus, preprocessing, loader.

Prints clips/s for `demo-data` and `preprocess`, and samples/s of the training loader
(one random frame + fbank per sample) for 0 and N workers. Not a test: run it on a quiet
machine and copy the figures into docs/benchmarks.md.

    python benchmarks/data_pipeline.py --out /tmp/pcav-bench --workers 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from pcavmae_cli.engine import config
from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.data.demo_corpus import make_demo_corpus
from pcavmae_cli.engine.data.preprocess import preprocess


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/pcav-bench"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3, help="loader passes to average")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")

    corpus, seconds = timed(lambda: make_demo_corpus(args.out / "corpus"))
    n = corpus.n_written
    print(f"demo-data:  {n} clips in {seconds:.1f} s = {n / seconds:.2f} clips/s")

    cfg = config.load_recipe("demo").data
    report, seconds = timed(
        lambda: preprocess(corpus.segment_csvs["train"], args.out / "train", cfg, videos=corpus.videos)
    )
    print(f"preprocess: {report.n_ok} clips in {seconds:.1f} s = {report.n_ok / seconds:.2f} clips/s")

    for workers in (0, args.workers):
        dataset = AudioVisualDataset(report.manifest, cfg, "random")
        loader = DataLoader(dataset, batch_size=8, shuffle=True, num_workers=workers, persistent_workers=workers > 0)
        next(iter(loader))  # start the workers outside the timing
        count, start = 0, time.perf_counter()
        for _ in range(args.epochs):
            for batch in loader:
                count += batch["fbank"].shape[0]
        rate = count / (time.perf_counter() - start)
        per_worker = rate / max(workers, 1)
        print(f"loader:     {workers} workers: {rate:.0f} samples/s ({per_worker:.0f} per worker)")


if __name__ == "__main__":
    main()
