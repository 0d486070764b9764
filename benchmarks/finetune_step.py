"""Speed of one fine-tuning step on a CPU, side by side: the whole micro-batch on all compute
threads, against the micro-batch split over threads of one process (``train.replicas``).

The step is the paper's fine-tuning model (``Classifier`` on ``--recipe``'s model, ``av`` mode,
527 classes, one frame per clip, every token unmasked), BCE on random targets, backward, fused
AdamW: what ``pcav finetune`` runs per micro-batch and optimiser step, on a synthetic batch.
Each side is built once in its own worker process (``alternate.py``: the threads, their
allocator arenas and thread pools of one side never touch the other's; timed in one process,
the whole batch ran 1.24-1.39 samples/s right after the threads and 1.74-1.80 otherwise) and
the sides are timed in turn (A, B, A, B, ...) for ``--repeats`` rounds. Printed: min and median
samples/s, FLOPs per sample (counted), MFU against the matrix-product peak of the precision
measured in the same run before and after, the load average and the thread counts, and the
ratio. Not a test: run it on a quiet machine.

    python benchmarks/finetune_step.py --recipe cavmae_base --batch 8 --precision bf16
"""

from __future__ import annotations

import argparse
import os
import time

from alternate import Worker, alternate, summary

WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[5])
from finetune_step import build
side, recipe, precision, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
step, flops, peak, threads = build(side, recipe, precision, batch)
step()  # warm-up
print(json.dumps({"threads": threads, "flops": flops}), flush=True)
for line in sys.stdin:
    if line.strip() == "peak":
        print(json.dumps({"peak": peak()}), flush=True)
        continue
    seconds = step()
    print(json.dumps({"seconds": seconds, "samples_per_s": batch / seconds}), flush=True)
"""


def build(side: str, recipe: str, precision: str, batch: int):
    """The step of one side: ``(step() -> seconds, FLOPs per sample, peak() -> GFLOP/s, threads)``."""
    import torch
    import torch.nn.functional as F

    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.bench.flops import count
    from pcavmae_cli.engine.bench.peak import device_peak
    from pcavmae_cli.engine.model.classifier import Classifier
    from pcavmae_cli.engine.train.allocator import keep_freed_memory
    from pcavmae_cli.engine.train.replicas import Replicas
    from pcavmae_cli.engine.train.runtime import Runtime

    keep_freed_memory()  # as training runs (resolve_runtime)
    cpu = torch.device("cpu")
    m = config.load_recipe(recipe).model
    torch.manual_seed(0)
    model = Classifier(m, 527, "av").train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    rt = Runtime(cpu, torch.bfloat16 if precision == "bf16" else None)
    gen = torch.Generator().manual_seed(0)
    fbank = torch.randn(batch, m.audio_frames, m.mel_bins, generator=gen)
    frames = torch.randn(batch, 3, m.image_size, m.image_size, generator=gen)
    targets = torch.rand(batch, 527, generator=gen).round()
    threads = torch.get_num_threads()
    replicas = Replicas(model, 2, threads) if side == "threads" else None

    def forward_backward() -> None:
        with rt.autocast():
            F.binary_cross_entropy_with_logits(model(fbank, frames).float(), targets).backward()
        model.zero_grad(set_to_none=True)

    flops = count(forward_backward) / batch

    def step() -> float:
        start = time.perf_counter()
        if replicas is None:
            with rt.autocast():
                logits = model(fbank, frames)
        else:
            logits = replicas.forward_rows(batch, rt, lambda net, rows: net(fbank[rows], frames[rows]))
        F.binary_cross_entropy_with_logits(logits.float(), targets).backward()
        if replicas is not None:
            replicas.backward()
            replicas.collect_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step, flops, lambda: device_peak(rt.dtype or torch.float32, cpu).best, threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="cavmae_base")
    parser.add_argument("--batch", type=int, default=8, help="clips per micro-batch")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; fine-tuning {args.recipe}, batch {args.batch}, {args.precision}, "
          f"{os.cpu_count()} CPUs; load average {os.getloadavg()}", flush=True)  # fmt: skip
    here = os.path.dirname(os.path.abspath(__file__))
    argv = [args.recipe, args.precision, str(args.batch), here]
    workers = [Worker(side, WORKER, [side, *argv]) for side in ("whole", "threads")]
    flops = workers[0].info["flops"]
    peaks = [workers[0].ask("peak")["peak"]]
    results = alternate(workers, args.repeats, key="samples_per_s")
    peaks.append(workers[0].ask("peak")["peak"])
    for w in workers:
        w.close()
    print(f"in-run {args.precision} matmul peak before / after: {peaks[0]:.0f} / {peaks[1]:.0f} GFLOP/s; "
          f"FLOPs per sample {flops / 1e9:.1f} G")  # fmt: skip
    print("| side | compute threads | samples/s (min) | samples/s (median) | MFU (median) |")
    print("|---|---|---|---|---|")
    medians = {}
    for w in workers:
        low, medians[w.side] = summary([r["samples_per_s"] for r in results[w.side]])
        split = "2 x 1" if w.side == "threads" else str(w.info["threads"])
        mfu = 100 * flops * medians[w.side] / 1e9 / max(peaks)
        print(f"| {w.side} | {split} | {low:.3f} | {medians[w.side]:.3f} | {mfu:.0f} % |")
    print(f"threads / whole (median): {medians['threads'] / medians['whole']:.2f}x; load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
