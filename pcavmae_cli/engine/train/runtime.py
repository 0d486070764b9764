"""Where and how a run computes: device, precision, process rank, seeds and RNG states.

Precision: ``train.precision`` is ``fp32``, ``bf16`` (autocast to bfloat16 around the forward
pass; the losses run in fp32 themselves, see ``engine/losses.py``; no gradient scaler is
needed for bf16), or ``auto``:

- on CUDA, bf16 when the GPU supports it (``torch.cuda.is_bf16_supported``), else fp32;
- on CPU, bf16 where a matrix product of the model's width (``embed_dim`` x its MLP width, at
  least 256 x 1024) runs at least 1.5x as fast in bf16 as in fp32, measured in the process
  (``bf16_speed.py``), else fp32. CPUs differ: on a 2-core Xeon with AVX512-BF16 and no AMX
  bf16 products ran at 0.6x fp32 and one step of the paper's model took 4.3 s with bf16
  autocast against 2.8 s in fp32; on 2-core AMD EPYCs bf16 products ran at 2.2x (Zen 4) and
  4.2x (Zen 5) and the step 1.8-2.0x and 3.1x as fast as in fp32 (docs/benchmarks.md, "bf16 or
  fp32 on a CPU"). The run header says what was chosen and the measured ratio; a resumed run
  keeps the precision it started with.

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

from pcavmae_cli.engine import bf16_speed
from pcavmae_cli.engine.bf16_speed import VIT_B_MLP
from pcavmae_cli.engine.errors import UserError
from pcavmae_cli.engine.schema import ModelConfig, TrainConfig
from pcavmae_cli.engine.train.allocator import keep_freed_memory
from pcavmae_cli.engine.train.distributed import agree, init_from_env, world_from_env
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


def model_width(model: ModelConfig | None) -> tuple[int, int]:
    """The encoder's MLP product (``embed_dim``, hidden width): the shape ``auto`` probes."""
    if model is None:
        return VIT_B_MLP
    return model.embed_dim, round(model.embed_dim * model.mlp_ratio)


def resolve_precision(name: str, device: torch.device, width: tuple[int, int] = VIT_B_MLP) -> torch.dtype | None:
    """``train.precision`` on ``device``: the autocast dtype, or ``None`` for fp32 (module
    docstring); ``width`` is the product ``auto`` times on a CPU (``model_width``)."""
    if name == "fp32":
        return None
    cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if name == "bf16":
        if device.type == "cuda" and not cuda_bf16:
            raise UserError("key 'train.precision' is 'bf16' but this GPU does not support bfloat16; use 'fp32'")
        return torch.bfloat16
    return torch.bfloat16 if bf16_speed.bf16_is_fast(device, width) else None


def describe_precision(name: str, device: torch.device, width: tuple[int, int] = VIT_B_MLP) -> str:
    """``fp32``, ``bf16``, and for ``auto`` on a CPU why: ``bf16 (auto: bf16 products 4.4x fp32's
    here)``, ``fp32 (auto: no bf16 instructions)``, ``fp32 (auto: 64 x 256 products, too narrow
    to gain)``."""
    precision = "bf16" if resolve_precision(name, device, width) == torch.bfloat16 else "fp32"
    if name != "auto" or device.type != "cpu":
        return precision
    if not bf16_speed.probed(width):
        narrow = f"{width[0]} x {width[1]} products, too narrow to gain"
        return f"{precision} (auto: {narrow if bf16_speed.native_bf16() else 'no bf16 instructions'})"
    return f"{precision} (auto: bf16 products {bf16_speed.cpu_bf16_speedup(*width):.1f}x fp32's here)"


def resolve_runtime(cfg: TrainConfig, model: ModelConfig | None = None) -> Runtime:
    """Device, precision (``auto`` probes ``model``'s width, ``model_width``) and, under torchrun,
    rank and world size (joining the process group); sets torch's compute threads to the CPUs this
    process may use (``threads.thread_plan``)."""
    if cfg.threads is not None and cfg.threads < 1:
        raise UserError(f"key 'train.threads' must be >= 1 or null, got {cfg.threads}")
    torch.set_num_threads(thread_plan(cfg.threads).threads)
    wants_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = init_from_env(use_cuda=wants_cuda)  # sets cuda:LOCAL_RANK as the current device
    device = resolve_device(cfg.device)
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for the buffers each step frees and takes again
    dtype = resolve_precision(cfg.precision, device, model_width(model))
    if cfg.precision == "auto" and device.type == "cpu" and agree(dtype is None, device):
        dtype = None  # each rank measured for itself: fp32 everywhere unless every rank chose bf16
    return Runtime(device=device, dtype=dtype, rank=world.rank, world_size=world.world_size)


def describe_runtime(cfg: TrainConfig, micro_batch: int | None = None, model: ModelConfig | None = None) -> str:
    """The run header's line: ``cpu, fp32, 2 compute threads (2 CPUs)`` (what ``resolve_runtime``
    will choose, without joining a process group); for training (``micro_batch``: its
    ``data.loader.batch_size``), the threads a micro-batch is split over when there are several
    (``train.replicas``)."""
    from pcavmae_cli.engine.train.replicas import replica_count  # replicas.py imports this module

    device = resolve_device(cfg.device)
    plan = thread_plan(cfg.threads)
    precision = describe_precision(cfg.precision, device, model_width(model))
    line = f"{device}, {precision}, {plan.threads} compute thread{'s' * (plan.threads != 1)} ({plan.reason})"
    world = world_from_env().world_size
    replicas = 1 if micro_batch is None else replica_count(cfg, device, world, plan.threads, micro_batch)
    if replicas > 1:
        line += f", each micro-batch split over {replicas} threads of {max(1, plan.threads // replicas)}"
    return line


def keep_started_precision(rt: Runtime, asked: str, started: str | None) -> str | None:
    """On resume, a run whose recipe says ``auto`` goes on in the precision it started in (``auto``
    measures, and another machine, or this one under load, may answer otherwise; a resumed run
    should equal an uninterrupted one). Sets ``rt``; returns a warning when that overrides this
    process's own answer. ``started``: the checkpoint's ``precision`` (absent in older ones)."""
    if asked != "auto" or started not in ("bf16", "fp32") or started == rt.precision:
        return None
    if started == "bf16" and rt.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return None  # this GPU cannot: fp32, as auto chose
    mine = rt.precision
    rt.dtype = torch.bfloat16 if started == "bf16" else None
    return f"train.precision is auto: resuming in {started}, as the run started ({mine} would be chosen here)"


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
