"""``train/allocator.py``: freed CPU buffers are reused without page faults (glibc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from pcavmae_cli.engine.train.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
mib = int(sys.argv[2])
def churn():
    for _ in range(10):  # a step: three buffers of MIB MiB taken, written, then all freed
        buffers = [torch.empty(mib * 1024 * 1024 // 4).fill_(1.0) for _ in range(3)]
        del buffers
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str, mib: int) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(mib)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.parametrize("mib", [28, 96])  # below and above glibc's highest mmap threshold (32 MiB)
def test_freed_buffers_are_reused_without_page_faults(mib):
    """10 steps x 3 buffers: 215040 pages of 4 KiB at 28 MiB, 737280 at 96 MiB. Kept, the freed
    blocks are reused: no faults.

    glibc's default is not a stable control: its thresholds follow the largest block freed so
    far (the imports' allocations included), and repeated runs of the same probe gave 0 or
    143040 faults; that variance is why training sets the thresholds instead of relying on it.
    """
    assert faults("keep", mib) < 2_000
