"""What a training run holds in memory, and how close that is to what it may hold.

Why: the paper's model on a CPU is at the edge of common machines (pre-training's micro-batch
of 48 peaks near 20 GB, fine-tuning's about the same; docs/benchmarks.md), and a CPU process
that goes over is ended by the kernel's OOM killer with a bare "Killed", nothing of ours. So
each epoch line carries the process's peak (``peak_memory_gb``), and after the first optimiser
step, when the peak of a step is known, a run past ``HEADROOM`` of its limit says so once,
naming the settings that lower it, while it can still be changed.

- CPU: the peak is the resident set's high-water mark (``VmHWM`` of ``/proc/self/status``:
  memory-mapped clips the process read count too); the limit is what this process could hold:
  its resident set plus what the machine has available (``MemAvailable``), or the cgroup's
  ``memory.max`` (v2) / ``memory.limit_in_bytes`` (v1) where that is lower (containers, CI).
- CUDA: the caching allocator's peak reservation on the process's GPU against the GPU's memory
  (an overflow raises ``torch.OutOfMemoryError`` there, with torch's own message).

Off Linux (no ``/proc``) the CPU figures are ``None`` and nothing is said.
"""

from __future__ import annotations

from pathlib import Path

import torch

HEADROOM = 0.85  # past this share of the limit, the first step warns
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


def _status_kib(field: str, proc: Path = PROC) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` in bytes (``VmHWM``, ``VmRSS``)."""
    try:
        for line in (proc / "self" / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _meminfo(field: str, proc: Path = PROC) -> int | None:
    """A ``kB`` field of ``/proc/meminfo`` in bytes (``MemAvailable``)."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_limit(root: Path = CGROUP) -> int | None:
    """The memory limit of this process's cgroup in bytes, or ``None`` where there is none.

    v2 keeps it in ``memory.max`` ("max" when unlimited), v1 in ``memory.limit_in_bytes`` (a
    huge number when unlimited). Read at the mount point: a container sees its own cgroup there.
    """
    for name in ("memory.max", "memory/memory.limit_in_bytes"):
        try:
            text = (root / name).read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        try:
            value = int(text)
        except ValueError:
            continue
        return value if value < 2**60 else None
    return None


def peak_bytes(device: torch.device) -> int | None:
    """This process's peak memory on ``device`` so far (module docstring), or ``None`` unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_reserved(device)
    return _status_kib("VmHWM")


def limit_bytes(device: torch.device) -> int | None:
    """The most this process could hold on ``device`` now (module docstring), or ``None``."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    rss, available = _status_kib("VmRSS"), _meminfo("MemAvailable")
    machine = None if rss is None or available is None else rss + available
    limits = [x for x in (machine, cgroup_limit()) if x is not None]
    return min(limits) if limits else None


def gigabytes(n: int | None) -> float | None:
    """Bytes as GB with two decimals, as the epoch lines carry them."""
    return None if n is None else round(n / 1e9, 2)


def headroom_warning(peak: int | None, limit: int | None, device: torch.device) -> str | None:
    """A one-line warning when ``peak`` is past ``HEADROOM`` of ``limit``, else ``None``."""
    if peak is None or not limit or peak <= HEADROOM * limit:
        return None
    where = "the GPU's" if device.type == "cuda" else "what this process may use"
    ending = ("" if device.type == "cuda" else
              "; a CPU process that goes over is killed without a message")  # fmt: skip
    return (f"memory: the first step peaked at {peak / 1e9:.1f} GB of {where} {limit / 1e9:.1f} GB{ending}; "
            "a smaller data.loader.batch_size (the contrastive batch too) or train.activation_checkpointing=true "
            "lowers it")  # fmt: skip


class FirstStepMemory:
    """Warns once per process, after its first optimiser step, when that step came close to
    the limit (``headroom_warning``); rank 0 only, as the other ranks' lines are not shown."""

    def __init__(self, device: torch.device, is_main: bool, warn):
        self.device, self.warn = device, warn
        self.done = not is_main

    def after_step(self) -> None:
        if self.done:
            return
        self.done = True
        message = headroom_warning(peak_bytes(self.device), limit_bytes(self.device), self.device)
        if message is not None:
            self.warn(message)
