"""Where and how a run computes: device, precision, process rank, seeds and RNG states.

Precision: ``train.precision`` is ``fp32``, ``bf16`` (autocast to bfloat16 around the forward
pass; the losses run in fp32 themselves, see ``engine/losses.py``; no gradient scaler is
needed for bf16), or ``auto``:

- on CUDA, bf16 when the GPU supports it (``torch.cuda.is_bf16_supported``), else fp32;
- on CPU, fp32. Measured on a 2-core Xeon with AVX512-BF16 (no AMX), torch 2.9.1, one
  optimiser step (forward, backward, AdamW) of the full-size inputs (1024 x 128 fbank, 224 px):
  the demo model (64-d, batch 8) took 0.13 s in fp32 and 0.25 s with bf16 autocast; the paper's
  ViT-B model (batch 2) 2.8 s in fp32 and 4.3 s with bf16. bf16 autocast on such a CPU only
  adds casts, so ``auto`` does not pick it; ``bf16`` can still be asked for explicitly.

Under torchrun (``engine/train/distributed.py``) the runtime joins the process group: rank and
world size come from torchrun's environment, the device is ``cuda:LOCAL_RANK`` on GPUs, and only
the main process (rank 0) writes files.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any

import torch

from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import TrainConfig
from pcavmae_cli.engine.train.allocator import keep_freed_memory
from pcavmae_cli.engine.train.distributed import init_from_env, world_from_env
from pcavmae_cli.engine.train.threads import thread_plan


@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype | None  # autocast dtype; None: plain fp32
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder (rank 0)."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return "bf16" if self.dtype == torch.bfloat16 else "fp32"

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast around a forward pass, or nothing in fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)


def resolve_device(name: str) -> torch.device:
    """``train.device``: ``auto`` is CUDA when a GPU is visible, else CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("key 'train.device' is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """``train.precision`` on ``device``: the autocast dtype, or ``None`` for fp32 (module docstring)."""
    if name == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "bf16":
        if device.type == "cuda" and not cuda_bf16:
            raise UserError("key 'train.precision' is 'bf16' but this GPU does not support bfloat16; use 'fp32'")
        return torch.bfloat16
    return torch.bfloat16 if cuda_bf16 else None  # auto: fp32 on CPU, as measured above


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    """Device, precision and, under torchrun, rank and world size (joining the process group);
    sets torch's compute threads to the CPUs this process may use (``threads.thread_plan``)."""
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"key 'train.threads' must be >= 1 or null, got {cfg.threads}")
    torch.set_num_threads(thread_plan(cfg.threads).threads)
    wants_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = init_from_env(use_cuda=wants_cuda)  # sets cuda:LOCAL_RANK as the current device
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for the buffers each step frees and takes again
    return Runtime(
        device=device, dtype=resolve_precision(cfg.precision, device), rank=world.rank, world_size=world.world_size
    )


def describe_runtime(cfg: TrainConfig, micro_batch: int | None = None) -> str:
    """The run header's line: ``cpu, fp32, 2 compute threads (2 CPUs)`` (what ``resolve_runtime``
    will choose, without joining a process group); for pre-training (``micro_batch``: its
    ``data.loader.batch_size``), the threads a micro-batch is split over when there are several
    (``train.replicas``)."""
    from pcavmae_cli.engine.train.replicas import replica_count  # replicas.py imports this module

    device = resolve_device(cfg.device)
    plan = thread_plan(cfg.threads)
    precision = "bf16" if resolve_precision(cfg.precision, device) == torch.bfloat16 else "fp32"
    line = f"{device}, {precision}, {plan.threads} compute thread{'s' * (plan.threads != 1)} ({plan.reason})"
    world = world_from_env().world_size
    replicas = 1 if micro_batch is None else replica_count(cfg, device, world, plan.threads, micro_batch)
    if replicas > 1:
        line += f", each micro-batch split over {replicas} threads of {max(1, plan.threads // replicas)}"
    return line


def host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t.to(device)`` without making the host wait for the GPU.

    A plain copy from ordinary (pageable) CPU memory to CUDA waits until everything queued on
    the stream has run; values drawn on the CPU inside the training step (the augmentations'
    draws, from the global CPU RNG that checkpoints restore) would make every step a sync. The
    tensor is staged in pinned memory, whose block the caching host allocator keeps until the
    copy is done, and copied without blocking. Elsewhere it is a copy that asks not to block.
    """
    if t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and every GPU) and Python's ``random``."""
    random.seed(seed)
    torch.manual_seed(seed)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """The global RNG states the loop draws from (masking, sampled negatives), for checkpoints.

    Plain tensors, tuples and ints only, so the training state loads with ``weights_only=True``.
    """
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
