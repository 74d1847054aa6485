"""The one backoff formula: delays that double from `first` up to `cap`, and the jittered
Backoff that the retry loop (ingress/client.py) and watch's reconnects use. Cheap to import."""

from __future__ import annotations

import random
from typing import Callable


def doubling(attempt: int, first: float, cap: float) -> float:
    """first, 2 x first, 4 x first ... never more than cap (attempt 1 is the first delay)."""
    return float(min(cap, first * 2.0 ** (max(attempt, 1) - 1)))


class Backoff:
    """Exponential backoff with jitter: about 1, 2, 4, 8, 15, 15 ... seconds (each between half
    and all of `doubling`)."""

    def __init__(
        self, first: float = 1.0, cap: float = 15.0, random: Callable[[], float] = random.random
    ) -> None:
        self.first = first
        self.cap = cap
        self.random = random

    def delay(self, attempt: int) -> float:
        return doubling(attempt, self.first, self.cap) * (0.5 + self.random() / 2)
