"""What ``precision: auto`` sees on this CPU: bf16 / fp32 rate of matrix products by width.

For each width (k, n), the product ``pcavmae_cli.engine.bf16_speed`` times -- (512, k) @ (k, n),
one core, fp32 and bf16 alternated, best of three -- made ``--repeats`` times afresh (the cache
cleared), printed as min / median / max of the ratio, with the decision ``auto`` takes for a
model of that width; then, for the widest, the two precisions' rates on all compute threads
(``bf16_speed.best_product_seconds``: alternated, best of five). The load average is printed
before and after. Not a test.

    python benchmarks/bf16_ratio.py --repeats 8
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from pcavmae_cli.engine import bf16_speed

WIDTHS = [(16, 32), (32, 64), (64, 256), (128, 512), (256, 1024), (384, 1536), (768, 3072)]


def rates(k: int, n: int, rounds: int = 5) -> dict[torch.dtype, float]:
    """Best GFLOP/s of the probe's product in fp32 and bf16, alternated, on the current compute
    threads."""
    best = bf16_speed.best_product_seconds(k, n, rounds)
    return {dtype: 2 * bf16_speed.PROBE_ROWS * k * n / seconds / 1e9 for dtype, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()}; native bf16 instructions: {bf16_speed.native_bf16()}")
    print("| k x n | bf16 / fp32, min | median | max | probed | auto |")
    print("|---|---|---|---|---|---|")
    for k, n in WIDTHS:
        ratios = []
        for _ in range(args.repeats):
            bf16_speed.cpu_bf16_speedup.cache_clear()
            ratios.append(bf16_speed.cpu_bf16_speedup(k, n))
        probed = bf16_speed.probed((k, n))
        auto = "bf16" if bf16_speed.bf16_is_fast(torch.device("cpu"), (k, n)) else "fp32"
        print(f"| {k} x {n} | {min(ratios):.2f} | {statistics.median(ratios):.2f} | {max(ratios):.2f} "
              f"| {'yes' if probed else 'no'} | {auto} |")  # fmt: skip
    k, n = WIDTHS[-1]
    threads = torch.get_num_threads()
    measured = rates(k, n)
    fp32, bf16 = measured[torch.float32], measured[torch.bfloat16]
    print(f"{k} x {n} on {threads} threads: fp32 {fp32:.0f}, bf16 {bf16:.0f} GFLOP/s ({bf16 / fp32:.2f}x)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
