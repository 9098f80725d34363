"""Time for the core: injected, so keep-alive and timeouts are testable."""

from __future__ import annotations

import time


class Clock:
    """Monotonic seconds."""

    def now(self) -> float:
        return time.monotonic()


class FakeClock(Clock):
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1000.0) -> None:
        self.t = start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds
