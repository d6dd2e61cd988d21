"""What a simulator remembers of each client connection: who it said it was (its `User-Agent`, which names
the node in a cluster), when it opened and closed, and what it subscribed to when. The cluster chaos bench
reads these to measure, from the provider's side, whether a group was ever subscribed from two nodes at once."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(eq=False)
class Subscribed:
    """One subscription of a connection: a channel, stream hash or topic, from `at` until `until` (None: open)."""

    name: str
    at: float
    until: float | None = None


@dataclass(eq=False)
class ConnectionRecord:
    """One client connection (a WebSocket, or a CometD client from handshake to disconnect or expiry);
    times are wall-clock seconds (`time.time()`), comparable across processes."""

    user_agent: str
    credential: str = ""  # the app key, user name or login user it connected with
    opened_at: float = field(default_factory=time.time)
    closed_at: float | None = None
    # a CometD client between connects: since when it holds none (None while one is held); one that stopped
    # polling is delivered nothing more, though the org counts it until it expires
    idle_since: float | None = None
    subscriptions: list[Subscribed] = field(default_factory=list)

    def subscribe(self, name: str) -> None:
        if not any(s.name == name and s.until is None for s in self.subscriptions):
            self.subscriptions.append(Subscribed(name, time.time()))

    def unsubscribe(self, name: str) -> None:
        for s in self.subscriptions:
            if s.name == name and s.until is None:
                s.until = time.time()

    def ended(self, now: float, idle: float) -> float | None:
        """When the connection ended as far as delivery goes: closed, or idle (no connect held) for more than
        `idle` seconds by `now`; None while live."""
        if self.closed_at is not None:
            return self.closed_at
        if self.idle_since is not None and now - self.idle_since > idle:
            return self.idle_since
        return None

    def close(self, at: float | None = None) -> None:
        """Closed at `at` (default now; idempotent): every subscription still open ends with it."""
        if self.closed_at is None:
            self.closed_at = time.time() if at is None else at
            for s in self.subscriptions:
                if s.until is None:
                    s.until = self.closed_at
