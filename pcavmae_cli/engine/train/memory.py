"""What a training run holds in memory, and how close that is to what it may hold.

Why: the paper's model on a CPU is at the edge of common machines (pre-training's micro-batch
of 48 peaks near 22 GB, fine-tuning's about the same; docs/benchmarks.md), and a CPU process
that goes over is ended by the kernel's OOM killer with a bare "Killed", nothing of ours. So
each epoch line carries the process's peak (``peak_memory_gb``), and after the first optimiser
step, when the peak of a step is known, a run past ``HEADROOM`` of its limit says so once,
naming the settings that lower it, while it can still be changed.

- CPU: the peak is the resident set's high-water mark (``VmHWM`` of ``/proc/self/status``:
  memory-mapped clips the process read count too); the limit is what this process could hold:
  its resident set plus what the machine has available (``MemAvailable``), at most the
  machine's memory (``MemTotal``) and the cgroup's ``memory.max`` (v2) /
  ``memory.limit_in_bytes`` (v1) where that is lower (containers, CI).
- CUDA: the caching allocator's peak reservation on the process's GPU against the GPU's memory
  (an overflow raises ``torch.OutOfMemoryError`` there, with torch's own message).

Before the first step a run also estimates what a step of its micro-batch will hold
(``estimate_step``), so that a run the kernel would kill in its first step says why before it
happens: a dry forward pass of 1 and of 2 synthetic clips counts the bytes the autograd graph
keeps per clip (saved tensors, each storage once, plus the attention weights the explicit bf16
CPU attention keeps itself: ``cpu_attention.kept_weights``); to the memory the process holds
now it adds the gradients (one set per thread of ``replicas.py``), AdamW's two moments where
they do not exist yet, one bf16 copy of the weights per further thread, and the kept bytes of
the whole micro-batch. Measured on the 2-core CPU for the paper's model (docs/benchmarks.md,
"Memory of pre-training on a CPU"): 0.95-0.96 of the measured peak (20.84 against 22.05 GB at 48
clips), 0.82 with activation checkpointing, whose backward pass recomputes a block's activations
on top of what the graph keeps; hence the warning's headroom.

Off Linux (no ``/proc``) the CPU figures are ``None`` and nothing is said.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pcavmae_cli.engine.bench.step import synthetic_batch
from pcavmae_cli.engine.model.cpu_attention import kept_weights
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train.replicas import Replicas
from pcavmae_cli.engine.train.runtime import Runtime
from pcavmae_cli.engine.train.threads import cgroup_folders

HEADROOM = 0.85  # past this share of the limit, the estimate or the first step's peak warns
WAY_OUT = ("a smaller data.loader.batch_size (the contrastive batch too) or train.activation_checkpointing=true "
           "lowers it")  # the warnings' last words
PROC = Path("/proc")
CGROUP = Path("/sys/fs/cgroup")


def _kib_field(path: Path, field: str) -> int | None:
    """A ``Field:  N kB`` line of a ``/proc`` file in bytes, or ``None`` (no such file or field)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _status_kib(field: str, proc: Path = PROC) -> int | None:
    """This process's ``VmHWM`` / ``VmRSS`` in bytes."""
    return _kib_field(proc / "self" / "status", field)


def _meminfo(field: str, proc: Path = PROC) -> int | None:
    """The machine's ``MemAvailable`` / ``MemTotal`` in bytes."""
    return _kib_field(proc / "meminfo", field)


def cgroup_limit(root: Path = CGROUP, proc_cgroup: Path = PROC / "self" / "cgroup") -> int | None:
    """The memory limit of this process's cgroup and its parents in bytes (the lowest), or
    ``None`` where there is none: v2 ``memory.max`` ("max" when unlimited), v1
    ``memory.limit_in_bytes`` (a huge number when unlimited)."""
    limits = []
    for folder in cgroup_folders(root, proc_cgroup, "memory"):
        for name in ("memory.max", "memory.limit_in_bytes"):
            try:
                text = (folder / name).read_text().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:
                limits.append(int(text))
    return min(limits) if limits else None


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
    could_hold = None if rss is None or available is None else rss + available  # counts shared pages twice
    limits = [x for x in (could_hold, _meminfo("MemTotal"), cgroup_limit()) if x is not None]
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
    return f"memory: the first step peaked at {peak / 1e9:.1f} GB of {where} {limit / 1e9:.1f} GB{ending}; {WAY_OUT}"


def kept_bytes(forward: Callable[[], object]) -> int:
    """Bytes the autograd graph of ``forward()`` keeps for its backward pass (module docstring);
    the graph is dropped after."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with kept_weights() as weights, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(storages.values()) + weights[0]


@dataclass
class StepEstimate:
    """What a step of ``micro_batch`` clips will hold, in bytes."""

    now: int  # what the process holds (CPU: resident; GPU: allocated)
    state: int  # gradients, AdamW's moments not yet made, further threads' bf16 weights
    fixed: int  # kept by the graph whatever the clips (the bf16 copy of the weights, the losses)
    per_clip: int
    micro_batch: int

    @property
    def total(self) -> int:
        return self.now + self.state + self.fixed + self.per_clip * self.micro_batch


def estimate_step(
    model: nn.Module, forward_of: Callable[[int], object], micro_batch: int, device: torch.device, *,
    threads: int, bf16: bool, optimizer: torch.optim.Optimizer,
) -> StepEstimate | None:  # fmt: skip
    """``StepEstimate`` of ``model``'s step from ``forward_of(clips)`` (a forward pass of that
    many synthetic clips, the losses included) on 1 and 2 clips; ``threads``: those a
    micro-batch is split over (``replicas.py``). The global RNG is left as it was."""
    now = torch.cuda.memory_allocated(device) if device.type == "cuda" else _status_kib("VmRSS")
    if now is None:
        return None
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        one, two = kept_bytes(lambda: forward_of(1)), kept_bytes(lambda: forward_of(2))
    per_clip = max(two - one, 0)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    weights = sum(p.numel() for p in params)
    state = 4 * trainable * max(1, threads)
    if not optimizer.state:  # AdamW makes exp_avg and exp_avg_sq (fp32) at its first step
        state += 8 * trainable
    if bf16:
        state += 2 * weights * (max(1, threads) - 1)
    return StepEstimate(now, state, one - per_clip, per_clip, micro_batch)


def estimate_loop_step(
    model: nn.Module, forward: Callable[[dict[str, torch.Tensor]], object], cfg: Recipe, clips_in_data: int,
    rt: Runtime, replicas: Replicas | None, optimizer: torch.optim.Optimizer,
) -> StepEstimate | None:  # fmt: skip
    """``estimate_step`` for a training loop whose ``forward(batch)`` runs the model (and its
    losses) on a batch: on synthetic batches of ``cfg``'s inputs (``bench.step.synthetic_batch``)
    for its largest micro-batch (``data.loader.batch_size``, at most the clips there are), this
    rank's share of it, on the threads of ``replicas``."""
    clips = -(-min(cfg.data.loader.batch_size, clips_in_data) // rt.world_size)
    return estimate_step(
        model, lambda n: forward(synthetic_batch(cfg, n, rt.device)), clips, rt.device,
        threads=1 if replicas is None else replicas.n, bf16=rt.dtype is not None, optimizer=optimizer,
    )  # fmt: skip


def estimate_warning(estimate: StepEstimate | None, limit: int | None, device: torch.device) -> str | None:
    """A one-line warning when the estimated step is past ``HEADROOM`` of ``limit``, else ``None``
    (the estimate ran 4-6 % under the measured peak, docs/benchmarks.md)."""
    if estimate is None or not limit or estimate.total <= HEADROOM * limit:
        return None
    where = "the GPU's" if device.type == "cuda" else "what this process may use,"
    fate = ("past it the step runs out of GPU memory" if device.type == "cuda" else
            "past it the kernel kills a CPU process without a message")  # fmt: skip
    return (f"memory: a step of {estimate.micro_batch} clips (data.loader.batch_size) needs about "
            f"{estimate.total / 1e9:.1f} GB by a dry run of 1 and 2 clips, {100 * estimate.total / limit:.0f} % of "
            f"{where} {limit / 1e9:.1f} GB; {fate}; {WAY_OUT}")  # fmt: skip


class MemoryCheck:
    """The run's two looks at memory, on rank 0 (the other ranks' lines are not shown): before
    its first step the estimate (``estimate_step``), which warns where the step will not fit;
    after that step the measured peak, which warns past ``HEADROOM`` of the limit, unless the
    estimate has already warned."""

    def __init__(self, device: torch.device, is_main: bool, warn: Callable[[str], None]):
        self.device, self.warn = device, warn
        self.estimated = self.measured = not is_main

    def before_first_step(self, estimate: Callable[[], StepEstimate | None]) -> StepEstimate | None:
        if self.estimated:
            return None
        self.estimated = True
        found = estimate()
        message = estimate_warning(found, limit_bytes(self.device), self.device)
        if message is not None:
            self.warn(message)
            self.measured = True
        return found

    def after_step(self) -> None:
        if self.measured:
            return
        self.measured = True
        message = headroom_warning(peak_bytes(self.device), limit_bytes(self.device), self.device)
        if message is not None:
            self.warn(message)
