"""How many compute threads a CPU process runs: the CPUs it may use, not the CPUs the machine has.

torch's default intra-op thread count is the number of CPUs the machine reports. In a container
or a SLURM job that may use 2 of 64 CPUs (a cgroup CPU quota, or an affinity mask), 64 threads
then share 2 CPUs and each step waits on the others: two pcav processes sharing 2 cores, each
with its own 2 threads, ran 40 times slower than with one thread each (docs/benchmarks.md,
"Threads"). So the default here is what the process may actually use:

1. ``train.threads`` in the recipe, when set;
2. else ``OMP_NUM_THREADS`` from the environment (the usual knob; torchrun sets it to 1 for
   several processes on one machine unless the user did);
3. else the usable CPUs -- the affinity mask (``os.sched_getaffinity``), capped by the cgroup
   CPU quota (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), rounded up --
   shared evenly among the processes torchrun started on this machine (``LOCAL_WORLD_SIZE``).

``resolve_runtime`` applies it (``torch.set_num_threads``) and the training commands print it in
their header, with where it came from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    reason: str  # where the number came from, for the run header


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.0), or ``None`` when unlimited or
    unknown. Reads cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") in the process's own
    cgroup and its parents, else cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    limits = []
    for folder in cgroup_folders(root, proc_cgroup, "cpu"):
        v2 = folder / "cpu.max"
        if v2.is_file():
            parts = v2.read_text().split()
            if len(parts) == 2 and parts[0] != "max":
                limits.append(int(parts[0]) / int(parts[1]))
            continue
        quota, period = folder / "cpu.cfs_quota_us", folder / "cpu.cfs_period_us"
        if quota.is_file() and period.is_file():
            q, p = int(quota.read_text()), int(period.read_text())
            if q > 0 and p > 0:
                limits.append(q / p)
    return min(limits) if limits else None


def cgroup_folders(root: Path, proc_cgroup: Path, controller: str) -> list[Path]:
    """The process's cgroup folders for ``controller`` (``cpu``, ``memory``; v2: the unified
    one; v1: the controller's), each followed by its parents up to the hierarchy's root: a limit
    anywhere above applies too."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = ["0::/"]
    out: list[Path] = []
    for line in lines:
        fields = line.split(":", 2)  # "0::/path" (v2) or "4:cpu,cpuacct:/path" (v1)
        if len(fields) != 3:
            continue
        controllers, rel = fields[1], fields[2].lstrip("/")
        if controllers == "":
            bases = [root]
        elif controller in controllers.split(","):
            bases = [root / controllers, root / controller]
        else:
            continue
        for base in bases:
            folder = base / rel
            while folder not in out:
                out.append(folder)
                if folder == base:
                    break
                folder = folder.parent
    return out


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> tuple[int, str]:
    """The CPUs this process may use and why: the affinity mask capped by the cgroup quota."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup CPU quota {quota:g} of {affinity} CPUs in the affinity mask"
    machine = os.cpu_count() or affinity
    if affinity < machine:
        return affinity, f"affinity mask: {affinity} of {machine} CPUs"
    return affinity, f"{affinity} CPUs"


def thread_plan(requested: int | None, environ: dict[str, str] | None = None, **where) -> ThreadPlan:
    """The compute threads of this process (module docstring's order)."""
    env = os.environ if environ is None else environ
    if requested is not None:
        return ThreadPlan(requested, "train.threads")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadPlan(int(omp), "OMP_NUM_THREADS")
    cpus, why = usable_cpus(**where)
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    if local > 1:
        return ThreadPlan(max(1, cpus // local), f"{why}, shared by {local} processes")
    return ThreadPlan(cpus, why)
