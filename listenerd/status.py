"""The status record of one listener: the only place a listener's status changes.

The supervisor owns one `ListenerStatus` per listener and hands sources narrow methods to report
progress; every change is timestamped, logged once, and mirrored into the status gauge. A `started`
listener's message also says why its source waits, as a suffix the record keeps across the
source's own messages: the outbox is full (`paused`), or the store cannot write (`store_failing`,
told by the supervisor, which hears it from `listenerd.store_health`).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

PAUSED = " (paused: outbox full, waiting for the engine to drain it)"
STORE_FAILING = " (store failing: {}; new events wait in memory until it writes again)"
STORE_PAUSED = " (paused: store failing: {}; reading resumes once it writes again)"
State = Literal["starting", "started", "retrying", "failed", "stopped"]
STATES: tuple[State, ...] = ("starting", "started", "retrying", "failed", "stopped")
RATE_WINDOW = 60  # seconds `rate` averages over
HISTORY = 20  # status changes a record keeps for `history`


def rfc3339(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)  # one per listener: no instance dict
class ListenerStatus:
    tenant_id: str
    listener_id: str
    status: State = "stopped"
    message: str = "Not started"
    since: float = field(default_factory=time.time)
    received: int = 0
    forwarded: int = 0
    last_event_at: float | None = None
    last_error: str | None = None
    attempts: int = 0
    started_at: float | None = None  # when it last became `started`, for the healthy-period reset
    on_change: Callable[[ListenerStatus, State], None] | None = field(default=None, repr=False)
    node: str | None = None  # in a cluster, the node that runs it (in the JSON only then)
    store_problem: str | None = field(default=None, init=False, repr=False)
    _paused: bool = field(default=False, init=False, repr=False)
    _suffix: str = field(default="", init=False, repr=False)  # the waiting note at the end of `message`
    # events committed per second of the last RATE_WINDOW seconds, a ring indexed by second % RATE_WINDOW
    _window: list[int] = field(default_factory=lambda: [0] * RATE_WINDOW, init=False, repr=False)
    _window_second: int = field(default=0, init=False, repr=False)  # the newest second the ring counts
    _first_second: int | None = field(default=None, init=False, repr=False)  # the second of the first commit
    _history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY), init=False,
                                            repr=False)  # formatted once, when the change happens

    def __post_init__(self) -> None:
        self._remember()

    def set(self, status: State, message: str, *, error: str | None = None) -> None:
        suffix = self._waiting_note(status)
        message += suffix
        previous = self.status
        if status == previous and message == self.message and error is None:
            return
        self.status, self.message, self._suffix = status, message, suffix
        if status != previous:
            self.since = time.time()
            self.started_at = self.since if status == "started" else None
            self._remember()
        if error is not None:
            self.last_error = error
        if self.on_change:
            self.on_change(self, previous)

    def committed(self, count: int, now: float | None = None) -> None:
        """`count` of this listener's events became durable (at `now`, the wall clock by default)."""
        self.received += count
        now = self.last_event_at = time.time() if now is None else now
        second = int(now)
        if self._first_second is None:
            self._first_second = self._window_second = second
        elif second != self._window_second:
            self._advance(second)
        self._window[second % RATE_WINDOW] += count

    def _advance(self, second: int) -> None:
        """Move the ring to `second`, zeroing the seconds it skipped (all of them after a minute's quiet)."""
        gap = second - self._window_second
        if gap <= 0:
            return
        for skipped in range(self._window_second + 1, self._window_second + 1 + min(gap, RATE_WINDOW)):
            self._window[skipped % RATE_WINDOW] = 0
        self._window_second = second

    def rate(self, now: float | None = None) -> float:
        """Events committed per second, averaged over the last RATE_WINDOW seconds (this one included), or
        over the seconds since the first event when that is shorter: a listener started 5 s ago is not diluted."""
        if self._first_second is None:
            return 0.0
        second = int(time.time() if now is None else now)
        self._advance(second)
        return sum(self._window) / max(1, min(RATE_WINDOW, second - self._first_second + 1))

    def history(self) -> list[dict[str, Any]]:
        """The last HISTORY status changes, oldest first: when, to what, with which message."""
        return list(self._history)

    def _remember(self) -> None:
        self._history.append({"status": self.status, "message": self.message, "at": rfc3339(self.since)})

    def paused(self, paused: bool) -> None:
        """Back-pressure holds (or releases) the source: a started listener's message says so."""
        self._paused = paused
        self._renote()

    def store_failing(self, problem: str | None) -> None:
        """The store cannot write (`problem`), or can again (None): a started listener's message says so,
        and a running listener's `last-error` names the problem."""
        if problem == self.store_problem:
            return
        self.store_problem = problem
        if problem is not None and self.status in ("starting", "started", "retrying"):
            self.last_error = f"store failing: {problem}"
        self._renote()

    def _renote(self) -> None:
        if self.status == "started":
            self.set("started", self.message.removesuffix(self._suffix))

    def _waiting_note(self, status: State) -> str:
        if status != "started":
            return ""
        if self.store_problem is not None:
            return (STORE_PAUSED if self._paused else STORE_FAILING).format(self.store_problem)
        return PAUSED if self._paused else ""

    def as_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "message": self.message,
            "since": rfc3339(self.since),
            "received": self.received,
            "forwarded": self.forwarded,
            "last-event-at": rfc3339(self.last_event_at),
            "last-error": self.last_error,
            "attempts": self.attempts,
            "rate": round(self.rate(), 3),
            "history": self.history(),
            **({"node": self.node} if self.node is not None else {}),
        }
