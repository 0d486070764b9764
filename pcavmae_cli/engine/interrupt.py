"""Ctrl-C in the long batch commands (preprocess, pack, download, embed): stop within seconds.

Python's default Ctrl-C raises ``KeyboardInterrupt`` in the main thread only; a thread pool's
``with`` block then waits for every *queued* job before the exception gets out (on an AudioSet
list: hours), and whatever the finished jobs produced is never recorded. Instead, as training
does (``train/stop.py``), the first Ctrl-C or SIGTERM only sets a flag (``StopRequests``): the pool
below stops handing out jobs, waits for the few in flight, and returns; the command then writes
its record of the finished work and raises ``Stopped``, which the CLI prints as
``interrupted: N of M ... done; rerun the same command to continue`` with exit status 130.
A second Ctrl-C stops at once (``ForcedStop``) and writes nothing more.

Jobs in flight when the stop came are handed back apart from the finished ones: the terminal
sends Ctrl-C to the whole process group, so an ffmpeg child dies with it and its clip "fails"
because of the interrupt, not because the clip is bad. Callers keep such a job's success and
drop its failure, so a rerun simply does it again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TypeVar

from pcavmae_cli.engine.train.stop import ForcedStop, StopRequests

__all__ = ["ForcedStop", "StopRequests", "Stopped", "run_pool"]

T = TypeVar("T")
R = TypeVar("R")
POLL_S = 0.2  # how often the waiting main thread looks at the stop flag


class Stopped(KeyboardInterrupt):
    """A batch command stopped on request after recording the ``done`` of ``total`` items it finished."""

    def __init__(self, done: int, total: int, unit: str, reason: str = "Ctrl-C"):
        self.done, self.total, self.unit, self.reason = done, total, unit, reason
        super().__init__(f"interrupted ({reason}): {done} of {total} {unit} done; rerun the same command to continue")


def run_pool(
    work: Callable[[T], R],
    items: Iterable[T],
    workers: int,
    on_result: Callable[[T, R], None],
    stop: StopRequests,
) -> list[tuple[T, R]]:
    """``work(item)`` for every item on ``workers`` threads; ``on_result`` in this thread as each ends.

    Items are handed to the pool only as a thread frees up, so after a stop request nothing new
    starts. Returns ``[]`` when every item was done; after a stop, the ``(item, result)`` of the
    jobs that were in flight (those that raised are left out), not passed to ``on_result``: the
    caller decides what of them to keep (module docstring). An exception of a job ends the run.
    """
    queue = iter(items)
    running: dict[Future, T] = {}
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        while True:
            while stop.reason is None and len(running) < max(1, workers):
                item = next(queue, _END)
                if item is _END:
                    break
                running[pool.submit(work, item)] = item
            if not running:
                return []
            done, _ = wait(running, timeout=POLL_S, return_when=FIRST_COMPLETED)
            if stop.reason is not None:
                break
            for fut in done:
                on_result(running.pop(fut), fut.result())
        wait(running)  # a second Ctrl-C (ForcedStop) interrupts this wait
        return [(item, fut.result()) for fut, item in running.items() if fut.exception() is None]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


_END = object()
