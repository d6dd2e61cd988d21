"""Live taps: every normalized event of a listener, fanned out to connected SSE clients.

Publishing never waits: each client has a bounded queue, and a client too slow to keep up misses
events (it is told how many) instead of slowing the delivery path.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[dict[str, Any]]
    missed: int = 0
    reported_missed: int = field(default=0)


class TapHub:
    def __init__(self, queue_size: int = 1000):
        self.queue_size = queue_size
        self._subscribers: dict[Key, set[Subscription]] = {}

    def subscribe(self, tenant_id: str, listener_id: str) -> Subscription:
        sub = Subscription(asyncio.Queue(self.queue_size))
        self._subscribers.setdefault((tenant_id, listener_id), set()).add(sub)
        return sub

    def unsubscribe(self, tenant_id: str, listener_id: str, sub: Subscription) -> None:
        subs = self._subscribers.get((tenant_id, listener_id))
        if subs:
            subs.discard(sub)
            if not subs:
                del self._subscribers[(tenant_id, listener_id)]

    def publish(self, tenant_id: str, listener_id: str, envelope: dict[str, Any]) -> None:
        for sub in self._subscribers.get((tenant_id, listener_id), ()):
            try:
                sub.queue.put_nowait(envelope)
            except asyncio.QueueFull:
                sub.missed += 1

    def clients(self, tenant_id: str, listener_id: str) -> int:
        return len(self._subscribers.get((tenant_id, listener_id), ()))
