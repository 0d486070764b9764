"""Long work in resumable chunks: what ``pcav embed`` and ``pcav predict`` share.

The work is cut into chunks; each finished chunk is saved (atomically, by the caller's
``compute``/``save``) so that a rerun after Ctrl-C, a kill or a crash loads it instead of
redoing it. A stop request (``StopRequests``) drops the chunk in progress and raises
``Stopped`` with how much was finished; the caller's rerun resumes from there.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from pcavmae_cli.engine.interrupt import StopRequests, Stopped

T = TypeVar("T")


def chunk_key(weights: Path, *settings: Any) -> str:
    """What a finished chunk depends on: the weights file (path, size, modification time) and
    the ``settings`` (JSON-able); a chunk saved under another key is redone."""
    stat = weights.stat()
    text = json.dumps([str(weights.resolve()), stat.st_size, stat.st_mtime_ns, *settings])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class ChunkRun(Generic[T]):
    parts: list[T] = field(default_factory=list)  # every chunk's result, in order
    done: int = 0  # computed in this run
    skipped: int = 0  # loaded from an earlier, interrupted run


def run_chunks(
    sizes: Sequence[int],
    load: Callable[[int], T | None],
    compute: Callable[[int, Callable[[], None]], T],
    advance: Callable[..., None],
    *,
    unit: str,
    on_chunk: Callable[[int], None] | None = None,
) -> ChunkRun[T]:
    """Chunk ``i`` (of ``sizes[i]`` units) is ``load(i)``, or else ``compute(i, check)`` (which
    saves it and calls ``check`` between batches, so a stop is honoured within a chunk).

    Raises ``Stopped(units finished, units in all, unit, reason)`` on Ctrl-C / SIGTERM.
    """
    run: ChunkRun[T] = ChunkRun()
    total = sum(sizes)
    with StopRequests() as asked:
        try:
            for number, size in enumerate(sizes):
                part = load(number)
                if part is None:
                    part = compute(number, asked.check)
                    run.done += 1
                else:
                    run.skipped += 1
                run.parts.append(part)
                advance(size, f"chunk {number + 1}/{len(sizes)}")
                if on_chunk is not None:
                    on_chunk(number)
                asked.check()
        except (KeyboardInterrupt, RuntimeError):  # RuntimeError: loader workers killed by the same signal
            if asked.reason is None:
                raise
            raise Stopped(sum(sizes[: len(run.parts)]), total, unit, asked.reason) from None
    return run
