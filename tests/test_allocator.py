"""``train/allocator.py``: freed CPU buffers are reused without page faults (glibc)."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import resource, sys, torch
from pcavmae_cli.engine.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def churn():
    for _ in range(10):  # a step: three 28 MiB buffers taken, written, then all freed
        buffers = [torch.empty(7 * 1024 * 1024).fill_(1.0) for _ in range(3)]
        del buffers
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


def test_freed_buffers_are_reused_without_page_faults():
    """10 steps x 84 MiB = 215040 pages of 4 KiB. Kept, the freed blocks are reused: no faults.

    glibc's default is not a stable control: its thresholds follow the largest block freed so
    far (the imports' allocations included), and repeated runs of the same probe gave 0 or
    143040 faults; that variance is why training sets the thresholds instead of relying on it.
    """
    assert faults("keep") < 2_000
