"""Clip-embedding throughput of the paper's base model: what ``pcav embed`` / ``predict`` compute.

The frozen forward of ``evaluate.predict.backbone_features`` (the audio encoder once per clip,
the clip's frames batched through the video encoder and the joint layer), on full-size
synthetic inputs (1024 x 128 fbank, 224 px frames), fp32 and bf16 autocast, with 10 frames per
clip (the 10-frame average) and with the middle frame only; bf16 also with torch's fused
attention kernel (``bf16-sdpa``) instead of ``cpu_attention.grouped_attention``'s explicit
products, or with those products on all heads at once (``bf16-allheads``) instead of
cache-sized groups of heads (``--precisions`` picks). The settings are run in turn, A, B, C,
..., A, ..., for ``--repeats`` rounds in one process; each prints min and median clips/s,
FLOPs per clip (counted, attention included), and MFU against the matmul peak of its precision
measured in the same run, before and after. The process keeps freed memory as ``pcav embed``'s
does (``train/allocator.py``, set by ``resolve_runtime``), and each timing's ``--calls`` forwards
share one autocast context as the batches of an embedding chunk do (the weights' bf16 casts are
paid once per timing). Not a test: run it on a quiet machine.

    python benchmarks/inference_throughput.py --recipe cavmae_base --batch 4 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from pcavmae_cli.engine import config
from pcavmae_cli.engine.bench.flops import count
from pcavmae_cli.engine.bench.peak import device_peak
from pcavmae_cli.engine.evaluate.predict import backbone_features
from pcavmae_cli.engine.model import PCAVMAE, blocks
from pcavmae_cli.engine.train.allocator import keep_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cavmae_base")
    parser.add_argument("--batch", type=int, default=4, help="clips per forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2, help="forwards per timing")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "bf16-sdpa"],
                        choices=["fp32", "bf16", "bf16-sdpa", "bf16-allheads"])  # fmt: skip
    args = parser.parse_args()
    keep_freed_memory()  # as pcav embed / predict run (resolve_runtime)
    cpu = torch.device("cpu")
    cfg = config.load_recipe(args.recipe)
    m = cfg.model
    backbone = PCAVMAE(m).backbone.eval()
    gen = torch.Generator().manual_seed(0)
    fbank = torch.randn(args.batch, m.audio_frames, m.mel_bins, generator=gen)
    frames = {k: torch.randn(args.batch, k, 3, m.image_size, m.image_size, generator=gen) for k in (10, 1)}
    settings = [(p, k) for p in args.precisions for k in (10, 1)]
    group_bytes = blocks.ATTENTION_GROUP_BYTES

    def forward(precision: str, k: int, calls: int = 1) -> None:
        """``calls`` forwards in one autocast context, as ``pcav embed`` runs a chunk's batches:
        the weights are cast to bf16 on the first and taken from autocast's cache after it."""
        blocks.EXPLICIT_CPU_BF16 = precision in ("bf16", "bf16-allheads")
        blocks.ATTENTION_GROUP_BYTES = 0 if precision == "bf16-allheads" else group_bytes
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "fp32"):
            for _ in range(calls):
                backbone_features(backbone, fbank, frames[k])

    flops = {k: count(lambda k=k: forward("fp32", k)) / args.batch for k in (10, 1)}
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {args.recipe}, batch {args.batch}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)  # fmt: skip
    peaks_before = {p: device_peak(dt, cpu).best for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    for s in settings:
        forward(*s)  # warm-up
    seconds: dict[tuple[str, int], list[float]] = {s: [] for s in settings}
    for _ in range(args.repeats):
        for s in settings:
            start = time.perf_counter()
            forward(*s, calls=args.calls)
            seconds[s].append((time.perf_counter() - start) / (args.calls * args.batch))
    peaks_after = {p: device_peak(dt, cpu).best for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print("in-run matmul peak, before / after: "
          + ", ".join(f"{p} {peaks_before[p]:.0f} / {peaks_after[p]:.0f} GFLOP/s" for p in peaks_before))
    print("| precision | frames per clip | GFLOP per clip | clips/s (best) | clips/s (median) | MFU (median, of the higher peak) |")
    print("|---|---|---|---|---|---|")
    for p, k in settings:
        best, median = 1 / min(seconds[(p, k)]), 1 / statistics.median(seconds[(p, k)])
        peak = max(peaks_before[p.split("-")[0]], peaks_after[p.split("-")[0]])  # bf16-*: the bf16 peak
        print(f"| {p} | {k} | {flops[k] / 1e9:.0f} | {best:.3f} | {median:.3f} | "
              f"{100 * flops[k] * median / 1e9 / peak:.0f} % |")  # fmt: skip
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
