"""Speed of one pre-training step: FLOPs per sample, samples/s, fp32 and bf16.

A thin wrapper over ``pcavmae_cli.engine.bench.step`` (what ``pcav bench`` runs): the plain
eager step (torch's default AdamW) of each recipe, full-size synthetic inputs. ``pcav bench``
adds the fast step, the measured matmul peak and MFU. Not a test: run it on a quiet machine.

    python benchmarks/pretrain_step.py --recipes pretrain_audioset pretrain_cavmae demo --batch 4
"""

from __future__ import annotations

import argparse
import os

import torch

from pcavmae_cli.engine import config
from pcavmae_cli.engine.bench.step import count_flops, measure_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["pretrain_audioset", "pretrain_cavmae", "demo"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--fast", action="store_true", help="the fast step (fused AdamW, recipe's compile)")
    args = parser.parse_args()
    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, batch {args.batch}")
    print(f"{'recipe':<20} {'precision':<9} {'GFLOP/sample':>13} {'samples/s':>10} {'GFLOP/s':>8}")
    for recipe in args.recipes:
        cfg = config.load_recipe(recipe)
        flops = count_flops(cfg, args.batch, cpu)
        for precision in args.precisions:
            r = measure_step(
                cfg, args.batch, cpu, precision, fast=args.fast, steps=args.steps, warmup=1, flops_per_sample=flops
            )
            print(f"{recipe:<20} {precision:<9} {flops / 1e9:>13.1f} {r.samples_per_s:>10.2f} "
                  f"{r.flops_per_s / 1e9:>8.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
