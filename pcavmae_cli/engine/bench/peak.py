"""The device's measured matrix-multiply peak, the denominator of MFU.

A datasheet peak says little on a shared CPU VM (it depends on AVX-512 / AMX exposure, clocks,
neighbours), so ``pcav bench`` measures the peak in the same run as the step it rates, in fp32
and in bf16, at two shapes, and rates the step against the faster: a ViT-B MLP-shaped product
``(2048 x 768) @ (768 x 3072)`` (what the step multiplies most), and a large square one (8192 on a
GPU, 2048 on a CPU). On a GPU the small product does not fill the chip (an H200 ran it at 562
TFLOP/s in bf16, the 8192 one at about 790), and an MFU against it would flatter the step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

VIT_B_MLP = (2048, 768, 3072)  # (tokens, width, MLP width): the step's dominant matrix product
SQUARE_SIDE = {"cuda": 8192, "cpu": 2048}  # a product that fills the device (2048 keeps a CPU run short)


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype, device: torch.device, *, shape: tuple[int, int, int] = VIT_B_MLP,
    seconds: float = 1.0, repeats: int = 3,
) -> float:  # fmt: skip
    """Best GFLOP/s of ``a @ b`` for ``shape = (m, k, n)`` over ``repeats`` timed runs of ~``seconds``."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    flops = 2 * m * k * n
    torch.mm(a, b, out=out)  # warm-up: kernel selection, page faults
    sync(device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    sync(device)
    per_call = max(time.perf_counter() - start, 1e-7)
    calls = max(1, int(seconds / per_call))
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        sync(device)
        best = max(best, flops * calls / (time.perf_counter() - start) / 1e9)
    return best


@dataclass(frozen=True)
class Peak:
    """GFLOP/s of one dtype at both shapes; ``best``, the larger, is what MFU divides by."""

    vit_b_mlp: float
    square: float
    square_side: int

    @property
    def best(self) -> float:
        return max(self.vit_b_mlp, self.square)


def device_peak(dtype: torch.dtype, device: torch.device, *, seconds: float = 1.0) -> Peak:
    """The ViT-B MLP-shaped and the large square product's best rates on ``device``."""
    side = SQUARE_SIDE.get(device.type, SQUARE_SIDE["cpu"])
    return Peak(
        vit_b_mlp=matmul_peak(dtype, device, seconds=seconds),
        square=matmul_peak(dtype, device, shape=(side, side, side), seconds=seconds),
        square_side=side,
    )
