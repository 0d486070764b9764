"""A pre-training step under a CPU quota: torch's default thread count against pcav's.

Creates a cgroup (v1 ``cpu`` controller, or v2) whose CPU quota is ``--quota`` CPUs, fewer than
the machine reports, and runs the demo recipe's pre-training step in a child process inside it,
alternating two sides (A, B, A, B, ...): A with torch's default thread count (one per CPU the
machine has; what a process that ignores the quota runs) and B with the count
``pcav``'s ``thread_plan`` gives inside the cgroup (the quota, rounded up). Prints each side's
min and median seconds per step over ``--repeats`` alternations, the load average, the thread
counts and the ratio. Needs root (to make the cgroup). Not a test.

    sudo python benchmarks/threads_quota.py --quota 1 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r"""
import sys, time, torch
from pcavmae_cli.engine import config
from pcavmae_cli.engine.bench.step import measure_step
from pcavmae_cli.engine.train.threads import thread_plan
threads = int(sys.argv[1]) if sys.argv[1] != "plan" else thread_plan(None, {}).threads
torch.set_num_threads(threads)
r = measure_step(config.load_recipe("demo"), 8, torch.device("cpu"), "fp32", fast=False, steps=int(sys.argv[2]),
                 warmup=2, flops_per_sample=0.0)
print(threads, r.seconds_per_step)
"""


def make_cgroup(quota: float) -> tuple[Path, str]:
    """A cgroup with ``quota`` CPUs; its folder and the file a pid is written to."""
    name = f"pcav-threads-{os.getpid()}"
    v1 = Path("/sys/fs/cgroup/cpu")
    if (v1 / "cpu.cfs_quota_us").is_file():
        folder = v1 / name
        folder.mkdir()
        (folder / "cpu.cfs_period_us").write_text("100000")
        (folder / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
        return folder, "cgroup.procs"
    folder = Path("/sys/fs/cgroup") / name
    folder.mkdir()
    (folder / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
    return folder, "cgroup.procs"


def run_side(folder: Path, procs: str, threads: str, steps: int) -> tuple[int, float]:
    def enter() -> None:  # the child joins the cgroup before it execs python
        (folder / procs).write_text(str(os.getpid()))

    out = subprocess.run([sys.executable, "-c", WORKER, threads, str(steps)], capture_output=True, text=True,
                         preexec_fn=enter, check=True, env={**os.environ, "OMP_NUM_THREADS": ""})  # fmt: skip
    used, seconds = out.stdout.split()[-2:]
    return int(used), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quota", type=float, default=1.0, help="CPUs the cgroup may use")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    machine = os.cpu_count() or 1
    folder, procs = make_cgroup(args.quota)
    sides = {"A torch default": str(machine), "B pcav plan": "plan"}
    times: dict[str, list[float]] = {k: [] for k in sides}
    used: dict[str, int] = {}
    try:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')}; machine {machine} CPUs, cgroup quota {args.quota:g} CPUs; "
              f"load average {os.getloadavg()}")  # fmt: skip
        for _ in range(args.repeats):
            for side, threads in sides.items():
                used[side], seconds = run_side(folder, procs, threads, args.steps)
                times[side].append(seconds)
                print(f"  {side}: {used[side]} threads, {seconds:.3f} s/step", flush=True)
        for side in sides:
            print(f"{side}: {used[side]} threads, min {min(times[side]):.3f} s/step, "
                  f"median {statistics.median(times[side]):.3f}")  # fmt: skip
        a, b = (statistics.median(times[s]) for s in sides)
        print(f"ratio A/B (median): {a / b:.2f}; load average {os.getloadavg()}")
    finally:
        folder.rmdir()


if __name__ == "__main__":
    main()
