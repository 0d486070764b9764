"""The figures a long download is planned with: clips per minute, bytes per clip, the failure mix.

A 2M-clip run lasts days; whether it will finish this week, whether the disk and the network
quota hold, and whether YouTube has started to refuse show in these three numbers long before
the end. ``Throughput`` keeps them for the clips settled by this run (the ones found done
before do not count towards the rate) and writes them as the progress bar's note.
"""

from __future__ import annotations

import threading
import time
from collections import Counter


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Throughput:
    """Counts of this run's settled clips; ``note()`` is one line for the progress bar."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.started = clock()
        self.clips = 0
        self.bytes = 0
        self.by_fetch: Counter[str] = Counter()  # window / whole
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()

    def add_clip(self, fetched_bytes: int, fetch: str) -> None:
        with self._lock:
            self.clips += 1
            self.bytes += fetched_bytes
            self.by_fetch[fetch] += 1

    def add_failure(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1

    def clips_per_minute(self) -> float:
        elapsed = max(self.clock() - self.started, 1e-6)
        return 60.0 * self.clips / elapsed

    def bytes_per_clip(self) -> float:
        return self.bytes / self.clips if self.clips else 0.0

    def note(self, top: int = 3) -> str:
        """``12.3 clips/min · 1.2 MB/clip · failed 4: unavailable 3, rate_limited 1``."""
        with self._lock:
            parts = [f"{self.clips_per_minute():.1f} clips/min", f"{human_bytes(self.bytes_per_clip())}/clip"]
            n_failed = sum(self.failures.values())
            if n_failed:
                mix = ", ".join(f"{reason} {n}" for reason, n in self.failures.most_common(top))
                parts.append(f"failed {n_failed}: {mix}")
            if self.by_fetch.get("whole"):
                parts.append(f"whole {self.by_fetch['whole']}")
        return " · ".join(parts)
