"""Per-tenant write quota: a token bucket per tenant, so one tenant's API writes cannot crowd out another's.

Every write (POST, PUT, DELETE below `/1.0/tenants/{tid}/`: listeners, integrations, checkpoints,
restarts, dead-letter retries) takes a token; tokens come back at `limits.tenant-write-rate` per
second up to `limits.tenant-write-burst`. Without a token the answer is 429 with `Retry-After`, the
whole seconds until one is back. Reads are not counted: they change nothing and are cheap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

_MAX_TENANTS = 100_000  # buckets kept; past this, full ones are forgotten (a full bucket is the default)


class WriteQuota:
    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # tenant -> (tokens, at)

    def take(self, tenant_id: str, rate: float, burst: int) -> float:
        """Take one token for `tenant_id`: 0.0 when granted, else the seconds until one is back."""
        if rate <= 0:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.get(tenant_id, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate)
        if tokens < 1.0:
            self._buckets[tenant_id] = (tokens, now)
            return (1.0 - tokens) / rate
        if len(self._buckets) >= _MAX_TENANTS and tenant_id not in self._buckets:
            self._forget_full(now, rate, burst)
        self._buckets[tenant_id] = (tokens - 1.0, now)
        return 0.0

    def _forget_full(self, now: float, rate: float, burst: int) -> None:
        self._buckets = {t: (k, at) for t, (k, at) in self._buckets.items() if k + (now - at) * rate < burst}


def retry_after(seconds: float) -> int:
    """A `Retry-After` value: whole seconds, at least 1."""
    return max(1, math.ceil(seconds))
