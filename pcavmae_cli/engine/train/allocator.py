"""Keep freed host memory in the process during CPU training and inference (glibc's malloc settings).

A training step on the CPU frees and re-allocates the same large buffers every step
(activations, the bf16 copies of the weights, their gradients). glibc serves blocks above its
mmap threshold with fresh ``mmap`` pages and gives them back on ``free``, so every step pays
the page faults and the kernel's zeroing of all of them again: measured on the 2-core VM for
``pretrain_audioset`` (ViT-B, bf16, batch 4), 120-150 thousand minor faults and 0.4-1.1 s of
system time per 7.5-8.5 s step. Raising the mmap threshold to glibc's maximum (32 MiB) and the
trim threshold to 1 GiB keeps such blocks on the heap for reuse: 1.6-2.3 thousand faults,
0.05 s of system time, and steps about 8 % faster (docs/benchmarks.md). Blocks above 32 MiB
would still be mapped afresh each time; inference of 10 frames per clip (the joint layer's
activations of 4 clips x 10 frames x 708 tokens, 87-174 MB each) spent 5-11 s of system time per
process and ran 1.2x slower (median of five alternated pairs, docs/benchmarks.md) until mmap was
switched off altogether (``M_MMAP_MAX`` = 0: every block from the heap). The cost is that the
process keeps its peak heap until it exits, which is what a training or embedding process does
anyway.

Threads other than the main one allocate from their own arenas, built of 64 MiB heaps, and
glibc unmaps a heap as soon as it is entirely free whatever the trim threshold, unless the top
pad asks to keep that much: with the micro-batch split over threads (``replicas.py``) each
thread's gradients and activations emptied whole heaps every step, and refaulting them cost
about 1 s of system time per 3-4 s step of the paper's model (``clear_page`` at the top of
``perf``), against 0.07 s with a 64 MiB top pad.

Only the CPU device needs it (CUDA memory has its own caching allocator); outside glibc
(musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's upper limit on 64-bit systems
TRIM_THRESHOLD = 1024 * 1024 * 1024
TOP_PAD = 64 * 1024 * 1024  # a thread arena's heap size (HEAP_MAX_SIZE): no empty heap is unmapped


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's thresholds once per process; whether they were set (``False`` without glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD),
    )  # fmt: skip
    return all(mallopt(key, value) == 1 for key, value in settings)
