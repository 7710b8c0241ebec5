"""Time, injected: the engine never calls ``time`` directly.

Tests and chapters use :class:`FakeClock` and move time with :meth:`FakeClock.advance`, so a
lease expires because the reader said so, not because a test slept.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds, as a float."""
        ...

    def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` (a fake clock just advances)."""
        ...

    def sleep_until(self, t: float) -> None:
        """Wait until ``now() >= t``."""
        ...


class SystemClock:
    """Wall-clock time for real processes."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def sleep_until(self, t: float) -> None:
        self.sleep(t - time.time())

    def __repr__(self) -> str:
        return "SystemClock()"


class FakeClock:
    """A clock that moves only when told to. ``sleep`` advances it instantly."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> float:
        if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
            raise ValueError(f"seconds must be a number >= 0, got {seconds!r}")
        # Round to microseconds so repeated advances give the same floats on every run.
        self._now = round(self._now + seconds, 6)
        return self._now

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            self.advance(seconds)

    def sleep_until(self, t: float) -> None:
        # Exactly t, not now + (t - now): that sum can land one float below t.
        self._now = max(self._now, float(t))

    def __repr__(self) -> str:
        return f"FakeClock(now={self._now})"
