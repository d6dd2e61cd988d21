"""Whether the store works, said once in each place an operator looks.

A store that cannot commit (disk full, I/O error) fails every operation alike, many times a second
at first, so failures are gathered into episodes. Each failure counts in
`listenerd_store_errors_total{op}`; an episode logs one line with the error when it starts, one
line with the count every `report_every` seconds while it lasts (lazily, at a failure: no timer),
and one line when it ends, with how long it lasted and how many failures it saw. `problem` is
what readiness, the listeners' statuses and the API's 503 say; watchers hear of it at every failure
and at the end (so a status record made during an episode learns of it at the next retry).

An episode ends once every operation that failed in it has succeeded since, so a store that takes
small commits while it refuses acks still counts as failing. The API's operations run only when an
operator calls, so a successful delivery write (which proves the store writes again) clears them too.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any

import structlog

log = structlog.get_logger("listenerd.store")

REPORT_EVERY = 30.0  # seconds between the "still failing" lines of one episode
DELIVERY_WRITES = frozenset({"commit", "ack", "dead-letter"})
API_OPS = frozenset({"api-write", "api-read"})


def is_store_error(exc: BaseException) -> bool:
    """A failure of the store (full, I/O error, locked, damaged), not a bug in how it is called."""
    return isinstance(exc, sqlite3.Error) and not isinstance(exc, sqlite3.ProgrammingError | sqlite3.InterfaceError)


class StoreHealth:
    def __init__(self, metrics: Any = None, path: str = "", *, report_every: float = REPORT_EVERY,
                 clock: Callable[[], float] = time.monotonic):
        self.metrics = metrics
        self.path = path
        self.report_every = report_every
        self._clock = clock
        self.problem: str | None = None  # the latest error of the episode under way; None while the store works
        self.failures = 0  # in the episode under way
        self._failing: set[str] = set()  # operations that failed in this episode and have not succeeded since
        self._since = 0.0
        self._reported_at = 0.0
        self._unreported = 0
        self._watchers: list[Callable[[str | None], None]] = []

    @property
    def failing(self) -> bool:
        return self.problem is not None

    def watch(self, callback: Callable[[str | None], None]) -> None:
        """Call `callback(problem)` at every failure, and `callback(None)` once the store works again."""
        self._watchers.append(callback)

    def describe(self) -> str | None:
        """The episode in one line, for readiness: what fails, since when, how often; None while the store works.

        Without the path: /readyz answers without a token (the log lines name it)."""
        if self.problem is None:
            return None
        return (f"the store is failing: {self.problem} (for {self._clock() - self._since:.0f}s, "
                f"{self.failures} failed operation(s)); events wait in memory and sources pause at the bound")

    def failed(self, op: str, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(op).inc()
        now = self._clock()
        error = str(exc) or type(exc).__name__
        self._failing.add(op)
        self.failures += 1
        if self.problem is None:
            self._since, self._reported_at, self._unreported = now, now, 0
            log.error("store failing; retrying with back-off (events wait in memory, sources pause at the bound)",
                      path=self.path, op=op, error=error)
        else:
            self._unreported += 1
            if now - self._reported_at >= self.report_every:
                log.error("store still failing", path=self.path, failures=self._unreported,
                          seconds=round(now - self._since), error=error)
                self._reported_at, self._unreported = now, 0
        self.problem = error
        for watcher in self._watchers:
            watcher(error)

    def succeeded(self, op: str) -> None:
        """`op` worked; called on every success, so the common case is one check."""
        if not self._failing:
            return
        self._failing.discard(op)
        if op in DELIVERY_WRITES or op == "api-write":
            self._failing -= API_OPS
        if self._failing:
            return
        log.info("store recovered", path=self.path, seconds=round(self._clock() - self._since, 1),
                 failures=self.failures)
        self.problem, self.failures = None, 0
        for watcher in self._watchers:
            watcher(None)
