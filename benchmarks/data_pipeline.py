"""Throughput of the data pipeline on this machine: demo corpus, preprocessing, packing, loader.

Prints clips/s for `demo-data`, `preprocess` and `pack`, where a plain-layout sample's time
goes (WAV read, fbank, padding, JPEG decode + crop, one thread; and the normalisation, which
training does on the device), and samples/s of the training loader (one random frame + fbank
per sample, as compact samples, `engine/bench/loader.py`) for the plain and the packed layout,
with 0 and N workers, the four sides alternated ``--repeats`` times (min, median, ratio). Not a test: run it on a quiet machine and copy the figures
into docs/benchmarks.md.

    python benchmarks/data_pipeline.py --out /tmp/pcav-bench --workers 1
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torchvision.io import read_file

from pcavmae_cli.engine import config
from pcavmae_cli.engine.bench.loader import bench_loader
from pcavmae_cli.engine.data import fbank as fb
from pcavmae_cli.engine.data.audio_io import read_wav
from pcavmae_cli.engine.data.demo_corpus import make_demo_corpus
from pcavmae_cli.engine.data import frames as fr
from pcavmae_cli.engine.data.manifest import read_manifest
from pcavmae_cli.engine.data.pack import pack_manifest
from pcavmae_cli.engine.data.preprocess import preprocess


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/pcav-bench"))
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3, help="loader passes per timing")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the alternated loader sides")
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

    packed, seconds = timed(lambda: pack_manifest(report.manifest, args.out / "train" / "pack", cfg))
    print(f"pack:       {packed.n_clips} clips in {seconds:.1f} s = {packed.n_clips / seconds:.2f} clips/s")

    profile_plain_sample(report.manifest, cfg)
    # the loader sides in turn, A, B, C, D, A, ...: every side sees the same machine and page cache
    sides = [(layout, manifest, workers) for workers in (0, args.workers)
             for layout, manifest in (("plain", report.manifest), ("packed", packed.index))]  # fmt: skip
    rates: dict[tuple[str, int], list[float]] = {(layout, w): [] for layout, _, w in sides}
    print(f"loader sides alternated {args.repeats} times; load average {os.getloadavg()}", flush=True)
    for _ in range(args.repeats):
        for layout, manifest, workers in sides:
            r = bench_loader(manifest, cfg, workers=workers, passes=args.epochs)
            rates[(layout, workers)].append(r["samples_per_s"])
    for (layout, workers), values in rates.items():
        print(f"loader:     {layout:6s} {workers} workers: samples/s min {min(values):.0f}, "
              f"median {statistics.median(values):.0f}")  # fmt: skip
    for workers in (0, args.workers):
        ratio = statistics.median(rates[("packed", workers)]) / statistics.median(rates[("plain", workers)])
        print(f"packed / plain, {workers} workers (median): {ratio:.2f}x")
    print(f"load average {os.getloadavg()}")


def profile_plain_sample(manifest: Path, cfg, repeats: int = 50) -> None:
    """Milliseconds per step of a plain-layout sample, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root, record = manifest.parent, read_manifest(manifest)[0]
    rate = cfg.audio.sample_rate
    waveform = read_wav(record.audio_path(root), rate)
    log_mel = fb.log_mel(waveform, rate, cfg.audio.fbank)
    frame_path = str(record.frame_path(root, 0))
    padded = fb.fit_length(log_mel, cfg.audio.fbank.target_frames)
    crop = fr.decode_crop(read_file(frame_path), cfg.video, frame_path)
    steps = {
        "WAV read": lambda: read_wav(record.audio_path(root), rate),
        "log-Mel (Kaldi fbank)": lambda: fb.log_mel(waveform, rate, cfg.audio.fbank),
        "pad": lambda: fb.fit_length(log_mel, cfg.audio.fbank.target_frames),
        "frame: read + decode + crop": lambda: fr.decode_crop(read_file(frame_path), cfg.video, frame_path),
        "normalise fbank + frame (device side)": lambda: (fb.normalise(padded, cfg.audio.fbank),
                                                          fr.normalise(crop, cfg.video)),
    }
    for name, step in steps.items():
        step()
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        print(f"per sample: {name:40s} {(time.perf_counter() - start) / repeats * 1000:6.2f} ms")
    torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
