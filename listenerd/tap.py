"""Live taps: every normalized event of a listener, fanned out to connected SSE clients.

Publishing never waits: each client has a bounded queue, and a client too slow to keep up misses
events (it is told how many) instead of slowing the delivery path. At shutdown `close` ends every
tap at once (a `None` in its queue): an open tap must not hold the daemon's stop until its next
keep-alive finds the client gone, nor for as long as a client stays.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]


@dataclass(eq=False)
class Subscription:
    queue: asyncio.Queue[dict[str, Any] | None]  # None: the tap is over (shutdown)
    missed: int = 0
    reported_missed: int = field(default=0)


class TapHub:
    def __init__(self, queue_size: int = 1000):
        self.queue_size = queue_size
        self._subscribers: dict[Key, set[Subscription]] = {}
        self.closed = False

    def subscribe(self, tenant_id: str, listener_id: str) -> Subscription:
        sub = Subscription(asyncio.Queue(self.queue_size))
        self._subscribers.setdefault((tenant_id, listener_id), set()).add(sub)
        if self.closed:
            self._end(sub)
        return sub

    def close(self) -> None:
        """End every tap (the daemon stops); a tap opened later ends at once."""
        self.closed = True
        for subs in self._subscribers.values():
            for sub in subs:
                self._end(sub)

    @staticmethod
    def _end(sub: Subscription) -> None:
        while sub.queue.full():  # the end must get in: an event it displaces is one the client would miss anyway
            sub.queue.get_nowait()
            sub.missed += 1
        sub.queue.put_nowait(None)

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
