"""Speed of one pre-training step: FLOPs per sample, samples/s, fp32 and bf16.

A step is what the training loop does per batch: forward (masking, encoders, joint layer,
decoder), the stage's losses (with prototypes active, so L_PJE and L_PCPE are computed),
backward and an AdamW update. Inputs are full size (fbank 1024 x 128, 224 px frames).
FLOPs are counted by ``torch.utils.flop_counter`` on one step (matrix products and
attention; elementwise work is not counted). Not a test: run it on a quiet machine.

    python benchmarks/pretrain_step.py --recipes pretrain_audioset pretrain_cavmae demo --batch 4
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pcavmae_cli.engine import config
from pcavmae_cli.engine.model import PCAVMAE
from pcavmae_cli.engine.prototypes import Prototypes
from pcavmae_cli.engine.train.objective import batch_losses
from pcavmae_cli.engine.train.optim import build_optimizer
from pcavmae_cli.engine.train.runtime import Runtime


def fake_prototypes(n_clips: int, dim: int, k: int) -> list[Prototypes]:
    """Random unit prototypes, so the prototype losses run at their real cost."""
    g = torch.Generator().manual_seed(0)
    unit = lambda: torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)  # noqa: E731
    return [
        Prototypes(
            centroids=unit(), p_a=unit(), p_v=unit(), gamma=torch.full((k,), 0.1),
            assignments=torch.randint(k, (n_clips,), generator=g), counts=torch.ones(k, dtype=torch.long),
        )
    ]


def step_fn(recipe: str, batch_size: int, dtype: torch.dtype | None):
    cfg = config.load_recipe(recipe)
    torch.manual_seed(0)
    model = PCAVMAE(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    stage = cfg.stages[0]
    protos = fake_prototypes(batch_size, cfg.model.proj_dim, 64) if cfg.prototypes else None
    rt = Runtime(device=torch.device("cpu"), dtype=dtype)
    m = cfg.model
    batch = {
        "fbank": torch.randn(batch_size, m.audio_frames, m.mel_bins),
        "frames": torch.randn(batch_size, 3, m.image_size, m.image_size),
        "index": torch.arange(batch_size),
    }

    def step() -> None:
        total, _ = batch_losses(model, batch, stage.loss, protos, rt)
        total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure(recipe: str, batch_size: int, dtype: torch.dtype | None, steps: int) -> tuple[float, float]:
    step = step_fn(recipe, batch_size, dtype)
    with FlopCounterMode(display=False) as counter:
        step()
    flops_per_sample = counter.get_total_flops() / batch_size
    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = (time.perf_counter() - start) / steps
    return flops_per_sample, batch_size / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["pretrain_audioset", "pretrain_cavmae", "demo"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores, batch {args.batch}")
    print(f"{'recipe':<20} {'precision':<9} {'GFLOP/sample':>13} {'samples/s':>10} {'GFLOP/s':>8}")
    for recipe in args.recipes:
        for precision in args.precisions:
            dtype = torch.bfloat16 if precision == "bf16" else None
            flops, rate = measure(recipe, args.batch, dtype, args.steps)
            print(f"{recipe:<20} {precision:<9} {flops / 1e9:>13.1f} {rate:>10.2f} {flops * rate / 1e9:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
