"""How fast something happens: enough to tell a flood from ordinary traffic, without a timer or a thread."""

from __future__ import annotations

import time
from collections.abc import Callable


class EventRate:
    """Whether more than ``limit`` events came within about a second: the count of this whole second plus the
    previous one's share of the second still in the window. Races between threads only blur the count."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.clock = clock
        self._second = 0
        self._count = 0
        self._previous = 0

    def add(self) -> bool:
        """Count one event; True when the rate is past the limit."""
        now = self.clock()
        self._roll(now)
        self._count += 1
        return self._over(now)

    def fast(self) -> bool:
        now = self.clock()
        self._roll(now)
        return self._over(now)

    def _roll(self, now: float) -> None:
        second = int(now)
        if second != self._second:
            self._previous = self._count if second == self._second + 1 else 0
            self._second, self._count = second, 0

    def _over(self, now: float) -> bool:
        return self._count + self._previous * (1.0 - now % 1.0) > self.limit
