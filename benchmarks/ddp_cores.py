"""Pre-training on a CPU: one process using all cores as threads, or one one-thread rank per core.

One thread per process runs each matrix product closer to the core's peak than two threads
splitting it (docs/benchmarks.md, "One thread per process"), so data parallelism across the
cores (``pcav pretrain --nproc C``: torch.distributed with gloo, one compute thread per rank,
DDP's ``no_sync`` while accumulating) may beat one process of C threads, if the gradients'
all-reduce, once per optimizer step, costs less than it wins. This times both on the same global
micro-batch and the same accumulation:

- ``single``: one process, C threads, micro-batches of ``--batch`` x C clips;
- ``ranks``: C ranks (``torch.distributed.run``), one thread each, ``--batch`` clips per rank,
  the model wrapped as training wraps it (``BatchObjective`` under ``DistributedDataParallel``);
- ``threads``: one process, C Python threads of one compute thread each, ``--batch`` clips per
  thread, one shared model whose gradients the threads' backward passes add up (no all-reduce,
  no buckets). Each thread's losses see only its own clips (nothing gathers the embeddings
  across threads for the contrastive loss, as training would have to), so this side is an upper
  bound on what data parallelism inside one process could gain.

Each optimizer step is ``--accumulate`` micro-batches (forward, backward) and one fused AdamW
step, bf16 autocast, synthetic full-size inputs of the recipe. Ranks cannot live in a persistent
worker, so the sides run in fresh processes, alternated (single, ranks, threads, single, ...) for
``--repeats`` rounds; printed per round and in a table: samples/s (min, median), MFU against the
bf16 matmul peak measured with C threads in each ``single`` and ``threads`` process, the ratio, the load average.
Not a test: run it on a quiet machine.

    python benchmarks/ddp_cores.py --recipe pretrain_cavmae --batch 4 --accumulate 4 --repeats 3
    python benchmarks/ddp_cores.py --sides single threads --batch 2 --accumulate 4 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

SCRIPT = os.path.abspath(__file__)


def child(args: argparse.Namespace) -> None:
    """One side's process (or one rank): build, one warm-up optimizer step, ``--steps`` timed."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from pcavmae_cli.engine import config
    from pcavmae_cli.engine.bench.flops import count
    from pcavmae_cli.engine.bench.peak import device_peak
    from pcavmae_cli.engine.bench.step import synthetic_batch
    from pcavmae_cli.engine.model import PCAVMAE
    from pcavmae_cli.engine.train.allocator import keep_freed_memory
    from pcavmae_cli.engine.train.objective import BatchObjective
    from pcavmae_cli.engine.train.optim import build_optimizer
    from pcavmae_cli.engine.train.replicas import set_compute_threads
    from pcavmae_cli.engine.train.runtime import Runtime

    ranks, threads = args.role == "rank", args.role == "threads"
    if ranks:
        dist.init_process_group("gloo")
    torch.set_num_threads(1 if ranks else args.cores)
    keep_freed_memory()
    cpu = torch.device("cpu")
    cfg = config.load_recipe(args.recipe)
    stage = cfg.stages[0]
    if cfg.prototypes:
        raise SystemExit("ddp_cores.py times objectives without prototypes (e.g. pretrain_cavmae)")
    torch.manual_seed(0)
    model = PCAVMAE(cfg.model)
    model.set_trainable(stage.trainable)
    net = BatchObjective(model)
    if ranks:
        net = DistributedDataParallel(net, find_unused_parameters=True, broadcast_buffers=False)
    optimizer = build_optimizer(model, cfg.optim, fused=True)
    batch_size = args.batch if ranks else args.batch * args.cores
    batch = synthetic_batch(cfg, batch_size, cpu)
    fp32 = Runtime(device=cpu, dtype=None)
    flops = count(lambda: net(batch, stage.loss, None, fp32)[0].backward()) / batch_size if args.count else None
    optimizer.zero_grad(set_to_none=True)
    rt = Runtime(device=cpu, dtype=torch.bfloat16)

    def clips_forward_backward(clips: dict) -> None:
        total, _ = net(clips, stage.loss, None, rt)
        (total / (args.accumulate * args.cores)).backward()

    if threads:
        pool = ThreadPoolExecutor(args.cores, initializer=set_compute_threads, initargs=(1,))
        parts = [{k: v[i * args.batch : (i + 1) * args.batch] for k, v in batch.items()} for i in range(args.cores)]

    def optimizer_step() -> None:
        for i in range(args.accumulate):
            last = i == args.accumulate - 1
            if threads:
                list(pool.map(clips_forward_backward, parts))
                continue
            with contextlib.nullcontext() if not ranks or last else net.no_sync():
                total, _ = net(batch, stage.loss, None, rt)
                (total / args.accumulate).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer_step()  # warm-up
    peak = None if ranks else device_peak(torch.bfloat16, cpu).best
    if ranks:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        optimizer_step()
    if ranks:
        dist.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    if not ranks or dist.get_rank() == 0:
        clips = args.batch * args.cores * args.accumulate
        print(json.dumps({"samples_per_s": clips / seconds, "flops": flops, "peak": peak}), flush=True)
    if ranks:
        dist.destroy_process_group()


def run_side(args: argparse.Namespace, side: str, port: int, count: bool) -> dict:
    common = ["--role", "rank" if side == "ranks" else side, "--recipe", args.recipe,
              "--batch", str(args.batch), "--cores", str(args.cores), "--accumulate", str(args.accumulate),
              "--steps", str(args.steps), *(["--count"] if count else [])]  # fmt: skip
    if side != "ranks":
        cmd = [sys.executable, SCRIPT, *common]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.cores),
               "--master_port", str(port), SCRIPT, *common]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"the {side} side failed (exit {out.returncode}):\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain_cavmae")
    parser.add_argument("--batch", type=int, default=4, help="clips per rank per micro-batch")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--accumulate", type=int, default=4, help="micro-batches per optimizer step")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per process")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", choices=["single", "ranks", "threads"], default=["single", "ranks"])
    parser.add_argument("--role", choices=["single", "rank", "threads"], help=argparse.SUPPRESS)
    parser.add_argument("--count", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        child(args)
        return
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {args.recipe}, {args.cores} cores, {args.batch} clips per rank, "
          f"{args.accumulate} micro-batches per step; load average {os.getloadavg()}", flush=True)  # fmt: skip
    rates: dict[str, list[float]] = {side: [] for side in ["single", *[s for s in args.sides if s != "single"]]}
    peaks, flops = [], None
    for r in range(args.repeats):
        for side in rates:
            result = run_side(args, side, 29500 + 17 * r, count=side == "single" and r == 0)
            rates[side].append(result["samples_per_s"])
            if result["peak"]:
                peaks.append(result["peak"])
            flops = flops or result["flops"]
            print(f"  round {r + 1} {side}: {result['samples_per_s']:.3f} samples/s", flush=True)
    peak = max(peaks)
    print(f"bf16 matmul peak with {args.cores} threads, per single or threads process: "
          + ", ".join(f"{p:.0f}" for p in peaks) + f" GFLOP/s; FLOPs per sample {flops / 1e9:.1f} G")
    print("| side | samples/s (min) | samples/s (median) | MFU (median, of the highest peak) | median vs single |")
    print("|---|---|---|---|---|")
    base = statistics.median(rates["single"])
    for side, values in rates.items():
        median = statistics.median(values)
        print(f"| {side} | {min(values):.3f} | {median:.3f} | {100 * flops * median / 1e9 / peak:.0f} % | "
              f"{median / base:.2f}x |")  # fmt: skip
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
