"""Capped exponential backoff with full jitter, reset after a healthy spell; and a gate for saying
something at most once in a while."""

import random
import time


class Backoff:
    def __init__(self, base_s: float = 0.25, cap_s: float = 30.0, rng: random.Random = None):
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0
        self.rng = rng or random.Random()

    def next_delay(self) -> float:
        """Full jitter: a uniform draw below the capped exponential, so reconnecting hosts spread out."""
        ceiling = min(self.cap_s, self.base_s * (2 ** self.attempt))
        self.attempt = min(self.attempt + 1, 30)
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class Throttle:
    """due() is true at most once per every_s (for each key): an alarm about a condition that may last
    for hours (a full bus, a local Redis at its limit) is said once in a while, not each time it is met."""

    def __init__(self, every_s: float, clock=time.monotonic):
        self.every_s = every_s
        self.clock = clock
        self.last = {}

    def due(self, key=None) -> bool:
        now = self.clock()
        last = self.last.get(key)
        if last is not None and now - last < self.every_s:
            return False
        self.last[key] = now
        return True
