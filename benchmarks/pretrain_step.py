"""Speed of one pre-training step, side by side: plain and fast, fp32 and bf16.

Each side -- a (recipe, variant, precision) -- is built once in its own worker process
(``alternate.py``; the fast step's allocator setting and compiled kernels last for a process)
and timed in turn with the others, A, B, C, D, A, ..., for ``--repeats`` rounds of ``--steps``
steps. Printed per side: FLOPs per sample (counted, attention included), min and median
samples/s, MFU against the matmul peak of its precision measured in the same run (in the first
worker, before and after), then the ratios against the first side, the thread count and the load
average. "plain" is the eager step with torch's default AdamW; "fast" the recipe's settings
with fused AdamW (``pcav bench`` runs the same steps). A variant ending in ``-sdpa``
(``fast-sdpa:bf16``) runs bf16 attention on the CPU through torch's fused kernel instead of
``cpu_attention.grouped_attention``'s explicit products; one ending in ``-allheads`` runs those
products on all heads at once instead of in cache-sized groups of heads
(``blocks.ATTENTION_GROUP_BYTES``), one ending in ``-group<MiB>`` (``fast-group4:bf16``) in groups
of that many MiB of weights; one ending in ``-compile``
(``fast-compile:bf16``) sets ``train.compile`` (inductor; the first step compiles, minutes on a
CPU); one ending in ``-onereplica`` (``fast-onereplica:bf16``) sets ``train.replicas=1``, the
whole micro-batch in one thread that splits each product over all compute threads. A side written ``CHECKOUT@VARIANT:PRECISION`` imports ``pcavmae_cli`` from another checkout
(``git worktree add /tmp/before HEAD~1``), so a change is timed against the code before it,
side by side. Not a test: run it on a quiet machine.

    python benchmarks/pretrain_step.py --recipe pretrain_cavmae --batch 4 --sides plain:fp32 fast:fp32 plain:bf16 fast:bf16
    python benchmarks/pretrain_step.py --sides /tmp/before@fast:bf16 fast:bf16
"""

from __future__ import annotations

import argparse
import os
import time

from alternate import Worker, alternate, summary

WORKER = r"""
import json, re, sys, time
if sys.argv[7] != "-":  # another checkout's code (a side written CHECKOUT@VARIANT:PRECISION)
    sys.path.insert(0, sys.argv[7])
import torch
from pcavmae_cli.engine import config
from pcavmae_cli.engine.bench.peak import device_peak
from pcavmae_cli.engine.bench.step import build_step, count_flops, time_step
from pcavmae_cli.engine.model import blocks
recipe, variant, precision, batch, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
if variant.endswith("-sdpa"):  # torch's fused attention kernel also for bf16 on the CPU
    blocks.EXPLICIT_CPU_BF16 = False
    variant = variant[: -len("-sdpa")]
if variant.endswith("-allheads"):  # the explicit bf16 attention on all heads at once
    blocks.ATTENTION_GROUP_BYTES = 0
    variant = variant[: -len("-allheads")]
group = re.search(r"-group(\d+)$", variant)
if group:  # the explicit bf16 attention in groups of heads of this many MiB of weights
    blocks.ATTENTION_GROUP_BYTES = int(group[1]) * 2**20
    variant = variant[: group.start()]
cpu = torch.device("cpu")
cfg = config.load_recipe(recipe)
if variant.endswith("-onereplica"):  # the whole micro-batch in one thread of all the compute threads
    cfg.train.replicas = 1
    variant = variant[: -len("-onereplica")]
if variant.endswith("-compile"):  # the step through torch.compile, as train.compile=true runs it
    cfg.train.compile = True
    variant = variant[: -len("-compile")]
# an eager fp32 count, the same for every variant and precision: made by the first worker only
flops = count_flops(cfg, batch, cpu) if sys.argv[6] == "count" else None
step = build_step(cfg, batch, cpu, precision, fast=variant == "fast")
time_step(step, cpu, 1, 1)  # warm-up
import pcavmae_cli
print(json.dumps({"threads": torch.get_num_threads(), "flops": flops, "code": pcavmae_cli.__file__}), flush=True)
for line in sys.stdin:
    if line.strip() == "peaks":
        print(json.dumps({p: device_peak(dt, cpu).best for p, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}),
              flush=True)
        continue
    seconds = time_step(step, cpu, steps, 0)
    print(json.dumps({"seconds": seconds, "samples_per_s": batch / seconds}), flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="pretrain_cavmae")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps per timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", nargs="+", default=["plain:fp32", "fast:fp32", "plain:bf16", "fast:bf16"],
                        help="[CHECKOUT@]VARIANT:PRECISION, variant plain, fast, plain-sdpa, fast-sdpa, fast-allheads, "
                             "fast-group<MiB>, fast-onereplica or fast-compile; CHECKOUT: another checkout's code (e.g. a git worktree)")  # fmt: skip
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; {args.recipe}, batch {args.batch}, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()}", flush=True)  # fmt: skip
    workers = []
    for i, side in enumerate(args.sides):
        checkout, _, spec = side.rpartition("@")
        variant, precision = spec.split(":")
        argv = [args.recipe, variant, precision, str(args.batch), str(args.steps), "count" if i == 0 else "-",
                os.path.abspath(checkout) if checkout else "-"]  # fmt: skip
        workers.append(Worker(side, WORKER, argv))
    for w in workers:
        print(f"{w.side}: code from {os.path.dirname(os.path.dirname(w.info['code']))}", flush=True)
    flops = workers[0].info["flops"]
    peaks = [workers[0].ask("peaks")]
    results = alternate(workers, args.repeats, key="samples_per_s")
    peaks.append(workers[0].ask("peaks"))
    for w in workers:
        w.close()
    print("in-run matmul peak, before / after: "
          + ", ".join(f"{p} {peaks[0][p]:.0f} / {peaks[1][p]:.0f} GFLOP/s" for p in ("fp32", "bf16")))
    print(f"FLOPs per sample: {flops / 1e9:.1f} G")
    print("| side | threads | samples/s (min) | samples/s (median) | MFU (median) | median vs first side |")
    print("|---|---|---|---|---|---|")
    first = None
    for w in workers:
        rates = [r["samples_per_s"] for r in results[w.side]]
        low, median = summary(rates)
        first = first or median
        peak = max(p[w.side.split(":")[1]] for p in peaks)
        mfu = 100 * flops * median / 1e9 / peak
        print(f"| {w.side} | {w.info['threads']} | {low:.3f} | {median:.3f} | {mfu:.0f} % | {median / first:.2f}x |")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
