"""Whether bf16 matrix products beat fp32 ones on this machine: measured, not read off CPU flags.

CPUs with the same bf16 instructions differ by a factor of seven in what bf16 buys. Measured on
2-core VMs with AVX512-BF16 (docs/benchmarks.md, "bf16 or fp32 on a CPU"): an Intel Xeon without
AMX ran bf16 products at 0.6x its fp32 rate, an AMD EPYC of family 25 (Zen 4) at 2.2x, one of
family 26 (Zen 5) at 2.6-4.6x. So ``precision: auto`` asks the machine: a product of the model's
own width (unless narrower than ``MIN_PRODUCT``) in both precisions on one core, alternated, best
of three, takes about 0.15 s for the paper's model and is made once per process and shape; bf16
is used where it is at least ``MIN_SPEEDUP`` times as fast. A CPU without native bf16
instructions is not asked (there bf16 is emulated and slower). On a GPU the answer is whether it
supports bf16.
"""

from __future__ import annotations

import functools
import math
import time

import torch

MIN_SPEEDUP = 1.5  # below this the casts autocast adds eat what the products gain
# Narrower models (k x n below 256 x 1024) stay in fp32 unasked: their steps spend their time
# around the products, so bf16 gains little (the 64-wide demo model: 1.34x on the Zen 5 where its
# products gain 3x), and narrow products' ratios sit near MIN_SPEEDUP on some machines (1.2-1.3 at
# 32 x 64 there), where a run's precision would follow the probe's noise.
MIN_PRODUCT = 256 * 1024
PROBE_ROWS = 512  # tokens of a small micro-batch: the product shape training runs
PROBE_ROUNDS = 3

VIT_B_MLP = (768, 3072)  # the width probed when no model is given


def native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX); without them bf16 is emulated."""
    cpu = getattr(torch._C, "_cpu", None)
    return bool(cpu and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported()))


@functools.lru_cache(maxsize=None)
def cpu_bf16_speedup(k: int, n: int) -> float:
    """How many times faster a (512, k) @ (k, n) product runs in bf16 than in fp32 on one core of
    this CPU (measured once per shape and process). One compute thread, so that the answer does
    not depend on when it is asked: the ratio is the cores' instructions'."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = best_product_seconds(k, n)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / best[torch.bfloat16]


def best_product_seconds(k: int, n: int, rounds: int = PROBE_ROUNDS) -> dict[torch.dtype, float]:
    """The best time of a (``PROBE_ROWS``, k) @ (k, n) product in fp32 and in bf16 over ``rounds``
    rounds, the two alternated, on the current compute threads."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(PROBE_ROWS, k, generator=g), torch.randn(k, n, generator=g)
    operands = {torch.float32: (a, b), torch.bfloat16: (a.bfloat16(), b.bfloat16())}
    for x, y in operands.values():
        torch.mm(x, y)  # the first call of a shape sets up its kernel
    best = dict.fromkeys(operands, math.inf)
    for _ in range(rounds):  # alternated: a machine that slows down slows both
        for dtype, (x, y) in operands.items():
            start = time.perf_counter()
            torch.mm(x, y)
            best[dtype] = min(best[dtype], time.perf_counter() - start)
    return best


def bf16_is_fast(device: torch.device, width: tuple[int, int] = VIT_B_MLP) -> bool:
    """Whether bf16 products of ``width`` (inner, outer dimension) are worth taking on ``device``:
    a GPU that supports bf16, or a CPU with bf16 instructions whose bf16 products of that width,
    if at least ``MIN_PRODUCT``, run at least ``MIN_SPEEDUP`` times as fast as fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return probed(width) and cpu_bf16_speedup(*width) >= MIN_SPEEDUP


def probed(width: tuple[int, int]) -> bool:
    """Whether ``bf16_is_fast`` measures a CPU's products of ``width``: wide enough, native bf16."""
    return width[0] * width[1] >= MIN_PRODUCT and native_bf16()
