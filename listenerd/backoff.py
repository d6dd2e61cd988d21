"""Capped exponential back-off with jitter, shared by reconnects and engine retries."""

from __future__ import annotations

import random


def backoff_delay(attempt: int, initial: float, cap: float, jitter: float = 0.2) -> float:
    """Delay before retry number `attempt` (1-based): initial * 2**(attempt-1), capped, +-jitter."""
    base = min(cap, initial * (2 ** min(max(attempt, 1) - 1, 32)))
    return min(cap, base * random.uniform(1 - jitter, 1 + jitter))
