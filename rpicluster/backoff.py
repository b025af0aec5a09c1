"""Reconnect delays: exponential backoff with full jitter.

After a master restart every slave of a fleet loses its connection at the same
instant. Fixed delays (the article's 60 s) make the fleet wait; short fixed delays
make it stampede. Full jitter (a uniform draw between 0 and an exponentially
growing ceiling, as in AWS's "Exponential Backoff and Jitter") spreads the
reconnects over the whole window while the first retry stays well under a second.
"""

from __future__ import annotations

import random
from typing import Optional


class Backoff:
    """Delays for successive attempts; :meth:`reset` after a success."""

    def __init__(self, base: float = 1.0, cap: float = 5.0, rng: Optional[random.Random] = None):
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base} cap={cap}")
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def ceiling(self) -> float:
        """The largest delay the next attempt may draw."""
        return min(self.cap, self.base * (2 ** min(self.attempt, 32)))

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (uniform in 0..ceiling)."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self.attempt += 1
        return delay

    def reset(self) -> None:
        self.attempt = 0

    def spread_fully(self) -> None:
        """Draw the next delay from the whole window, 0..cap.

        Called when the master says it is shutting down: every slave of the fleet
        hears that goodbye in the same instant, and a restarted master may be back
        within a fraction of a second, before a fleet drawing from 0..base would
        have spread out. A planned restart costs at most ``cap`` seconds.
        """
        while self.ceiling() < self.cap:
            self.attempt += 1
