"""Capped exponential backoff with full jitter, reset after a healthy spell."""

import random


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
