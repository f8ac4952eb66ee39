"""Time in live mode, injectable: the listener reads every time it needs from one clock.

:class:`SystemClock` is the real one. :class:`ManualClock` moves only when told
(:meth:`ManualClock.advance`), so tests step time instead of sleeping and assert on exact
latencies, whatever the machine's load.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float:
        """Seconds on a clock that never goes back (latencies, queue waits, time spent)."""

    def now(self) -> datetime:
        """The wall-clock time, in UTC (an event's ``occurred_at``)."""


class SystemClock:
    """``time.monotonic()`` and ``datetime.now(timezone.utc)``."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


class ManualClock:
    """A clock that moves only by :meth:`advance` (thread-safe); wall time is ``start`` plus the
    seconds advanced."""

    def __init__(self, start: datetime | None = None, monotonic: float = 1000.0):
        self._t = float(monotonic)
        self._t0 = float(monotonic)
        self._start = start or datetime(2026, 1, 1, tzinfo=timezone.utc)
        self._lock = threading.Lock()

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        with self._lock:
            self._t += seconds

    def monotonic(self) -> float:
        with self._lock:
            return self._t

    def now(self) -> datetime:
        with self._lock:
            return self._start + timedelta(seconds=self._t - self._t0)
