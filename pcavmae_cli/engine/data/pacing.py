"""Being a polite client of a site that rate-limits: a shared pace, backoff, a circuit breaker.

YouTube answers a client that asks too fast with HTTP 429 (or its "rate-limited" page) and,
if the client insists, blocks its address for hours. A 2M-clip download with 16 jobs asks
fast, so every attempt of every worker goes through one ``RateGate``:

* **pace**: at least ``interval`` seconds between the starts of two attempts, over all
  workers (``--max-rate`` clips per minute is ``interval = 60 / rate``); ``--sleep`` adds a
  pause of each worker after each of its clips, as yt-dlp's ``--sleep-interval`` does;
* **backoff**: a rate-limited or failing-server attempt is retried after an exponential delay
  with full jitter (``uniform(0, base * 2**attempt)``, at most ``max_delay``), or after the
  server's ``Retry-After`` when that is longer: jitter keeps the workers from retrying in step;
* **circuit breaker**: when ``trip_after`` of the last ``window`` attempts were throttled,
  every worker pauses for ``cooldown`` seconds, doubled at each trip that follows without a
  success in between (at most ``max_cooldown``): the site sees silence instead of a storm.

Sleeps go through ``Clock`` so that tests run the same logic in milliseconds, and every sleep
ends early when a stop (Ctrl-C) is asked for.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from pcavmae_cli.engine.errors import UserError


class StopFlag(Protocol):
    reason: str | None


@dataclass(frozen=True)
class Pacing:
    """How hard a download may push the site; the defaults suit YouTube with a few jobs."""

    interval: float = 0.0  # seconds between attempt starts, all workers together (60 / --max-rate)
    sleep: float = 0.0  # pause of a worker after each clip (--sleep)
    retries: int = 4  # further attempts of a throttled clip
    base_delay: float = 2.0  # first backoff step, seconds
    max_delay: float = 120.0
    window: int = 20  # attempts the breaker looks back over
    trip_after: int = 8  # throttled attempts among them that pause everyone
    cooldown: float = 60.0
    max_cooldown: float = 900.0

    def check(self) -> None:
        if self.sleep < 0:
            raise UserError(f"--sleep must be 0 or more seconds, got {self.sleep:g}")
        if self.interval < 0:
            raise UserError(f"the interval between attempts must be 0 or more seconds, got {self.interval:g}")
        if self.retries < 0:
            raise UserError(f"--retries must be 0 or more, got {self.retries}")
        if not 1 <= self.trip_after <= self.window:
            raise UserError(f"the breaker needs 1 <= trip_after <= window, got {self.trip_after} of {self.window}")


def pacing_for(max_rate: float | None = None, sleep: float = 0.0, retries: int = 4, **rest) -> Pacing:
    """``Pacing`` from the CLI's words: ``max_rate`` clips per minute (None: no limit)."""
    if max_rate is not None and max_rate <= 0:
        raise UserError(f"--max-rate must be more than 0 clips per minute, got {max_rate:g}")
    interval = 60.0 / max_rate if max_rate else 0.0
    pacing = Pacing(interval=interval, sleep=sleep, retries=retries, **rest)
    pacing.check()
    return pacing


class Clock:
    """Time and sleep; ``sleep`` returns early (False) once ``stop.reason`` is set."""

    STEP = 0.2  # how often a sleeping worker looks at the stop flag

    def now(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float, stop: StopFlag | None = None) -> bool:
        end = self.now() + seconds
        while True:
            if stop is not None and stop.reason is not None:
                return False
            left = end - self.now()
            if left <= 0:
                return True
            time.sleep(min(left, self.STEP))


def backoff_delay(attempt: int, pacing: Pacing, retry_after: float | None = None,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt + 1``: full jitter, or Retry-After if longer."""
    cap = min(pacing.max_delay, pacing.base_delay * 2**attempt)
    delay = (rng or random).uniform(0, cap)
    if retry_after is not None:
        delay = max(delay, min(retry_after, pacing.max_delay))
    return delay


class RateGate:
    """The pace and the breaker shared by all workers of one run (module doc)."""

    def __init__(self, pacing: Pacing, clock: Clock | None = None):
        self.pacing = pacing
        self.clock = clock or Clock()
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._recent: deque[bool] = deque(maxlen=pacing.window)
        self._paused_until = 0.0
        self._cooldown = pacing.cooldown
        self.trips = 0  # times the breaker paused everyone
        self.throttled = 0  # attempts answered with a rate limit or a server error

    def before_attempt(self, stop: StopFlag | None = None) -> bool:
        """Wait for the breaker and this attempt's slot of the pace; False if a stop came first."""
        while True:
            with self._lock:
                now = self.clock.now()
                wait = self._paused_until - now
                if wait <= 0:
                    start = max(now, self._next_start)
                    self._next_start = start + self.pacing.interval
                    wait = start - now
                    if wait <= 0:
                        return True
                    slot = True
                else:
                    slot = False
            if not self.clock.sleep(wait, stop):
                return False
            if slot:  # the slot is ours once its time has come
                return True

    def after_attempt(self, throttled: bool) -> None:
        """Record an attempt's outcome; may open the breaker for everyone."""
        with self._lock:
            self._recent.append(throttled)
            if throttled:
                self.throttled += 1
            else:
                self._cooldown = self.pacing.cooldown  # a success closes the streak
            if sum(self._recent) >= self.pacing.trip_after:
                self._paused_until = self.clock.now() + self._cooldown
                self._cooldown = min(self._cooldown * 2, self.pacing.max_cooldown)
                self._recent.clear()
                self.trips += 1

    def paused_for(self) -> float:
        """Seconds the breaker still holds everyone (0 when closed)."""
        with self._lock:
            return max(0.0, self._paused_until - self.clock.now())
