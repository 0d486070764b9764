"""Samples per second of the training data loader, for either data layout.

It times the loader pre-training really uses (``engine/train/data.py``: the seeded batch
sampler, one random frame + the fbank per sample as compact samples -- uint8 frame, fbank in
the store's dtype -- persistent workers, the recipe's ``data.loader`` settings), so ``pcav
bench`` and ``benchmarks/data_pipeline.py`` report what a run will see. The normalisation is
not timed: training does it on the device, after the loader (``data.model_inputs``). Worker
start-up is left out of the timing: a run pays it once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pcavmae_cli.engine.data.dataset import AudioVisualDataset
from pcavmae_cli.engine.schema import DataConfig
from pcavmae_cli.engine.train.data import EpochBatchSampler, close_loader, train_loader
from pcavmae_cli.engine.train.runtime import Runtime


def bench_loader(
    manifest: str | Path,
    data: DataConfig,
    *,
    workers: int = 0,
    batch_size: int | None = None,
    passes: int = 2,
    seed: int = 0,
    threads: int | None = 1,
) -> dict:
    """Time ``passes`` epochs of the training loader over ``manifest``.

    Args:
        manifest: a plain ``manifest.jsonl`` or a pack index (``pcav preprocess --pack``);
            the layout is recognised from the file, as training does.
        data: the recipe's ``data`` section (fbank settings, crop, ``loader`` settings).
        workers: loader worker processes (0: load in this process).
        batch_size: samples per batch; default ``data.loader.batch_size``.
        passes: epochs to time (each a fresh seeded order, new random frames).
        threads: torch threads of this process while it loads (``workers=0`` only); 1 gives
            the per-core figure, as a DataLoader worker runs with one thread; ``None``: leave
            torch's setting.
    Returns:
        ``{"layout": "plain" | "packed", "workers", "batch_size", "samples", "seconds",
        "samples_per_s", "samples_per_s_per_worker", "ms_per_sample", "cpu_ms_per_sample"}``;
        ``ms_per_sample`` is the wall time one worker (or the main process, with 0 workers)
        spends per sample; ``cpu_ms_per_sample`` the CPU time this process spent per sample
        (``workers=0`` only, else ``None``): on a busy machine it still says what a free core
        would do.
    """
    loader_cfg = data.loader.__class__(**{**vars(data.loader), "num_workers": workers})
    if batch_size is not None:
        loader_cfg.batch_size = batch_size
    dataset = AudioVisualDataset(manifest, data, frames="random", compact=True)
    sampler = EpochBatchSampler(len(dataset), loader_cfg.batch_size, seed)
    loader = train_loader(dataset, sampler, loader_cfg, Runtime(torch.device("cpu"), None))
    threads_before = torch.get_num_threads()
    if workers == 0 and threads is not None:
        torch.set_num_threads(threads)
    try:
        sampler.set_epoch(0, start=len(sampler) - 1)  # the last batch only: starts the workers
        for _ in loader:
            pass
        count, start, cpu_start = 0, time.perf_counter(), time.process_time()
        for epoch in range(1, passes + 1):
            sampler.set_epoch(epoch)
            for batch in loader:
                count += batch["fbank"].shape[0]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    finally:
        close_loader(loader)
        torch.set_num_threads(threads_before)
    rate = count / seconds
    per_worker = rate / max(workers, 1)
    return {
        "layout": dataset.layout,
        "workers": workers,
        "batch_size": loader_cfg.batch_size,
        "samples": count,
        "seconds": seconds,
        "samples_per_s": rate,
        "samples_per_s_per_worker": per_worker,
        "ms_per_sample": 1000.0 / per_worker,
        "cpu_ms_per_sample": 1000.0 * cpu_seconds / count if workers == 0 else None,
    }
