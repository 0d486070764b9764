"""The device's measured matrix-multiply peak, the denominator of MFU.

A datasheet peak says little on a shared CPU VM (it depends on AVX-512 / AMX exposure, clocks,
neighbours), so ``pcav bench`` measures the peak in the same run as the step it rates: the best
rate of a ViT-B MLP-shaped product ``(2048 x 768) @ (768 x 3072)``, in fp32 and in bf16.
"""

from __future__ import annotations

import time

import torch

VIT_B_MLP = (2048, 768, 3072)  # (tokens, width, MLP width): the step's dominant matrix product


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
