"""Side-by-side timing: one persistent worker process per side, asked in turn (A, B, A, B, ...).

A comparison is only worth its protocol: two things timed in different processes at different
moments see a different machine. Here each side is built once in its own process (so that one
side's thread pools, allocator settings or compiled kernels never touch the other's) and the
controller asks the workers one after the other for ``repeats`` rounds; every answer is one JSON
line. ``summary`` gives min and median. Used by ``kmeans_vs_faiss.py`` and ``pretrain_step.py``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys


class Worker:
    """A worker process running ``script`` (Python source) with ``argv``; it prints one JSON line
    when ready and one per request line it reads from stdin."""

    def __init__(self, side: str, script: str, argv: list[str]):
        self.side = side
        self.proc = subprocess.Popen([sys.executable, "-c", script, *argv], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        self.info = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.side} worker stopped")
        return json.loads(line)

    def ask(self, what: str = "run") -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def alternate(workers: list[Worker], repeats: int, key: str = "seconds") -> dict[str, list[dict]]:
    """Ask every worker in turn, ``repeats`` rounds; each side's answers in order."""
    results: dict[str, list[dict]] = {w.side: [] for w in workers}
    for r in range(repeats):
        for w in workers:
            results[w.side].append(w.ask())
            print(f"  round {r + 1} {w.side}: {results[w.side][-1][key]:.4g} {key}", flush=True)
    return results


def summary(values: list[float]) -> tuple[float, float]:
    """(min, median)."""
    return min(values), statistics.median(values)
