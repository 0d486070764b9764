"""Where one pre-training step's time goes, aten op by aten op (a profile, not a comparison).

Builds the fast step of ``--recipe`` (``pcavmae_cli.engine.bench.step.build_step``; the whole
micro-batch in one thread, ``train.replicas=1``, so that the dispatch mode sees every op), runs
two warm-up steps, then one step with every aten op timed by a ``TorchDispatchMode`` (no
profiler: ``torch.profiler``'s self times over-counted memory-bound ops here), and prints the
step's time with and without the mode, the in-run matmul peak of the precision, and the ops
with the most time: calls, share of the step and, for matrix products, GFLOP/s. ``--shapes``
splits products, softmax and casts by operand shapes. Not a test; shares are hints, and a
change is judged side by side (``pretrain_step.py``).

    python benchmarks/step_ops.py --recipe pretrain_cavmae --batch 4 --precision bf16 --shapes
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pcavmae_cli.engine import config
from pcavmae_cli.engine.bench.peak import device_peak
from pcavmae_cli.engine.bench.step import PRECISIONS, build_step

SPLIT_BY_SHAPE = (
    "mm", "addmm", "bmm", "_to_copy", "_softmax", "_softmax_backward_data", "copy_", "clone", "add", "native_layer_norm",
)  # fmt: skip


def product_flops(name: str, args: tuple) -> int:
    """FLOPs of a matrix product op from its operands (0 for anything else)."""
    shapes = [a.shape for a in args if isinstance(a, torch.Tensor)]
    if name == "mm":
        return 2 * shapes[0][0] * shapes[0][1] * shapes[1][1]
    if name == "addmm":
        return 2 * shapes[1][0] * shapes[1][1] * shapes[2][1]
    if name == "bmm":
        return 2 * shapes[0][0] * shapes[0][1] * shapes[0][2] * shapes[1][2]
    return 0


class OpTimer(TorchDispatchMode):
    """Wall time, calls and product FLOPs per aten op (or per op and operand shapes)."""

    def __init__(self, shapes: bool):
        super().__init__()
        self.shapes = shapes
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: collections.Counter[str] = collections.Counter()
        self.flops: dict[str, float] = collections.defaultdict(float)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        name = func.overloadpacket.__name__
        key = name
        if self.shapes and name in SPLIT_BY_SHAPE:
            key += str([tuple(a.shape) + (str(a.dtype)[6:],) for a in args if isinstance(a, torch.Tensor)])
        self.seconds[key] += elapsed
        self.calls[key] += 1
        self.flops[key] += product_flops(name, args)
        return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain_cavmae")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="bf16")
    parser.add_argument("--shapes", action="store_true", help="split products, softmax and casts by shapes")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    cpu = torch.device("cpu")
    cfg = config.load_recipe(args.recipe)
    cfg.train.replicas = 1
    step = build_step(cfg, args.batch, cpu, args.precision, fast=True)
    step()
    step()
    start = time.perf_counter()
    step()
    plain = time.perf_counter() - start
    timer = OpTimer(args.shapes)
    with timer:
        start = time.perf_counter()
        step()
        timed = time.perf_counter() - start
    peak = device_peak(PRECISIONS[args.precision] or torch.float32, cpu).best
    in_ops = sum(timer.seconds.values())
    print(f"{args.recipe}, batch {args.batch}, {args.precision}, {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()}")  # fmt: skip
    print(f"step {plain:.3f} s; under the mode {timed:.3f} s, of which in aten ops {in_ops:.3f} s; "
          f"in-run {args.precision} matmul peak {peak:.0f} GFLOP/s")  # fmt: skip
    print("| op | ms | share of the step | calls | GFLOP/s |")
    print("|---|---|---|---|---|")
    for key, seconds in sorted(timer.seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        rate = f"{timer.flops[key] / seconds / 1e9:.0f}" if timer.flops[key] else ""
        print(f"| {key} | {1000 * seconds:.1f} | {100 * seconds / timed:.1f} % | {timer.calls[key]} | {rate} |")


if __name__ == "__main__":
    main()
