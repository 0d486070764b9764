"""Speed of one pre-training step: FLOPs per sample, samples/s and MFU.

A step is what the training loop does per batch: forward (masking, encoders, joint layer,
decoder), the first stage's losses (with prototypes active, so L_PJE and L_PCPE are computed at
their real cost), backward and an AdamW update. Inputs are synthetic and full size (the recipe's
fbank and frame sizes), so no data is needed. FLOPs are counted by ``torch.utils.flop_counter``
on one eager step (matrix products and attention, the CPU attention kernel included:
``flops``; elementwise work is not counted).

Two configurations of the same recipe are compared: ``plain`` (eager, torch's default AdamW:
the unoptimised step) and ``fast`` (fused AdamW; on the CPU the training allocator settings and
the micro-batch split over ``train.replicas`` threads as pre-training splits it; plus
``torch.compile`` when the recipe sets ``train.compile``, plus activation checkpointing when it
sets that).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pcavmae_cli.engine.bench import flops
from pcavmae_cli.engine.bench.peak import sync
from pcavmae_cli.engine.model import PCAVMAE
from pcavmae_cli.engine.prototypes import Prototypes
from pcavmae_cli.engine.schema import Recipe
from pcavmae_cli.engine.train.allocator import keep_freed_memory
from pcavmae_cli.engine.train.fast import StepCompiler, set_activation_checkpointing
from pcavmae_cli.engine.train.objective import batch_losses
from pcavmae_cli.engine.train.optim import build_optimizer
from pcavmae_cli.engine.train.replicas import replicas_for
from pcavmae_cli.engine.train.runtime import Runtime

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass
class StepResult:
    variant: str  # "plain" or "fast"
    precision: str  # "fp32" or "bf16"
    batch_size: int
    flops_per_sample: float  # forward + backward, matrix products and attention
    samples_per_s: float
    seconds_per_step: float

    @property
    def flops_per_s(self) -> float:
        return self.flops_per_sample * self.samples_per_s


def fake_prototypes(n_clips: int, dim: int, k: int, device: torch.device) -> list[Prototypes]:
    """Random unit prototypes, so that the prototype losses run at their real cost."""
    g = torch.Generator().manual_seed(0)

    def unit() -> torch.Tensor:
        return F.normalize(torch.randn(k, dim, generator=g), dim=1).to(device)

    return [
        Prototypes(
            centroids=unit(), p_a=unit(), p_v=unit(), gamma=torch.full((k,), 0.1, device=device),
            assignments=torch.randint(k, (n_clips,), generator=g).to(device),
            counts=torch.ones(k, dtype=torch.long, device=device),
        )  # fmt: skip
    ]


def synthetic_batch(cfg: Recipe, batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A full-size batch of the recipe's inputs (random fbank and frames), so no data is needed."""
    m = cfg.model
    return {
        "fbank": torch.randn(batch_size, m.audio_frames, m.mel_bins, device=device),
        "frames": torch.randn(batch_size, 3, m.image_size, m.image_size, device=device),
        "index": torch.arange(batch_size, device=device),
    }


def build_step(
    cfg: Recipe, batch_size: int, device: torch.device, precision: str, *, fast: bool
) -> Callable[[], None]:
    """One optimiser step of ``cfg``'s first stage on a fixed synthetic batch (B = ``batch_size``).

    ``fast`` on the CPU also keeps freed memory in the process (``allocator``), as training
    does; that setting lasts for the process, so measure the plain steps first.
    """
    if fast and device.type == "cpu":
        keep_freed_memory()
    torch.manual_seed(0)
    model = PCAVMAE(cfg.model).to(device)
    stage = cfg.stages[0]
    model.set_trainable(stage.trainable)
    set_activation_checkpointing(model, fast and cfg.train.activation_checkpointing)
    net = StepCompiler(fast and cfg.train.compile)(model)
    optimizer = build_optimizer(model, cfg.optim, fused=fast)
    protos = fake_prototypes(batch_size, cfg.model.proj_dim, 64, device) if cfg.prototypes else None
    rt = Runtime(device=device, dtype=PRECISIONS[precision])
    batch = synthetic_batch(cfg, batch_size, device)
    replicas = replicas_for(model, cfg.train, device, 1, batch_size) if fast else None

    def step() -> None:
        total, _ = batch_losses(net, batch, stage.loss, protos, rt, replicas=replicas)
        total.backward()
        if replicas is not None:
            replicas.backward()
            replicas.collect_grads()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def count_flops(cfg: Recipe, batch_size: int, device: torch.device) -> float:
    """FLOPs per sample of one eager fp32 step (the count does not depend on precision)."""
    step = build_step(cfg, batch_size, device, "fp32", fast=False)
    return flops.count(step) / batch_size


def time_step(step: Callable[[], None], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per step: ``warmup`` untimed steps (compilation, allocator), then the mean of ``steps``."""
    for _ in range(warmup):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return (time.perf_counter() - start) / steps


def measure_step(
    cfg: Recipe, batch_size: int, device: torch.device, precision: str, *,
    fast: bool, steps: int, warmup: int, flops_per_sample: float,
) -> StepResult:  # fmt: skip
    step = build_step(cfg, batch_size, device, precision, fast=fast)
    seconds = time_step(step, device, steps, warmup)
    del step
    gc.collect()
    return StepResult(
        variant="fast" if fast else "plain", precision=precision, batch_size=batch_size,
        flops_per_sample=flops_per_sample, samples_per_s=batch_size / seconds, seconds_per_step=seconds,
    )  # fmt: skip
