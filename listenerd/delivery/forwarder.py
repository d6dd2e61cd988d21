"""The engine client: moves committed outbox rows to the engine in batches, never losing one.

One batch is in flight at a time, taken from the head of the outbox in commit order. That is what
keeps every listener's events in order through retries: a later batch is never sent while an
earlier one is unacknowledged, and a retry re-sends the same rows with the same ids (the engine
de-duplicates on `id`). The engine is one endpoint, so an outage stalls every listener alike;
concurrency would buy nothing there and would cost ordering. Only the bookkeeping overlaps: once
the engine has accepted a batch, its ack commits while the next batch is leased and sent (the
engine has the earlier one, so order holds).

A failed ack (the store cannot write: disk full) is retried after the engine retry policy's
back-off, and nothing more is sent until it is recorded: the engine has those rows, so sending them
again would only make duplicates (the probe saw the head batch re-sent 66,488 times). They go again
only if the process stops first (same ids). Any other store failure (a lease, a dead letter) backs
off the same way; the outbox counts and logs them (`listenerd.store_health`), so no traceback here.

Outcomes: 2xx acks (rows deleted); 408, 429, 5xx and network errors retry after a capped,
jittered exponential back-off, or exactly the engine's `Retry-After` when it sends one; any other
4xx moves the batch to the dead-letter table with the status code and the engine's answer, and
delivery carries on with the next rows. A 413 (too large) first halves the batch, sending each half in
order, until the refused event is alone: one tenant's oversized event never dead-letters another's.
Bodies are the stored envelope bytes joined into a JSON array: nothing is re-encoded on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING

import aiohttp
import structlog

from listenerd.backoff import backoff_delay
from listenerd.delivery.ids import age
from listenerd.net import client_tls, describe, kind_of
from listenerd.outcome import Fail, Retry, http_kind
from listenerd.tasks import cancel_and_wait

if TYPE_CHECKING:
    from listenerd.delivery.outbox import Outbox
    from listenerd.delivery.segments import Row
    from listenerd.model import Engine
    from listenerd.observability import Metrics

log = structlog.get_logger("listenerd.forwarder")

RETRY_AFTER_MAX = 3600.0  # seconds: a longer Retry-After is read as this
RESPONSE_KEEP = 64 * 1024  # bytes of the engine's answer kept in a dead letter
_IDLE_TICK = 1.0  # seconds between idle checks (stop requests also wake the loop at once)


@dataclass(frozen=True, slots=True)
class Refused(Fail):
    """The engine refused the batch for good: it goes to the dead-letter table with the engine's answer."""

    status: int
    response: str


def retryable(status: int) -> bool:
    return status in (408, 429) or status >= 500


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date; None when absent or bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class Forwarder:
    def __init__(self, engine: Engine, outbox: Outbox, metrics: Metrics,
                 on_forwarded: Callable[[str, str, int], None] | None = None):
        self.engine = engine
        self.outbox = outbox
        self.metrics = metrics
        self.on_forwarded = on_forwarded
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._drained = asyncio.Event()
        self.in_flight = 0  # events in the batch being sent (0 when idle)
        self.last_error: str | None = None
        self.attempt = 0  # consecutive failed attempts of the current batch
        self._cursor = 0  # seq of the last row sent and accepted (or refused); leases continue after it
        self._rewinds = 0  # how many times `rewind` was asked: a batch out during one must not move the cursor
        self._batch_rewinds = 0  # `_rewinds` when the batch under way was leased
        self._acking: asyncio.Task[list[Row] | None] | None = None  # the previous batch's ack: rows left to ack

    def rewind(self) -> None:
        """Lease from the head again at the next batch (a cluster node took a group with a backlog whose seqs
        are below the cursor; an event sent twice is de-duplicated by the engine by its id). A batch at the
        engine meanwhile leaves the cursor at the head when it ends (`_advance`), or the backlog would wait
        behind the group's newer events."""
        self._cursor = 0
        self._rewinds += 1
        self.outbox.committed.set()

    def _advance(self, rows: list[Row]) -> None:
        """Leases go on after `rows` (sent and accepted, or refused), unless a rewind came while they were out."""
        if self._batch_rewinds == self._rewinds:
            self._cursor = rows[-1].seq

    # -- lifecycle

    async def start(self) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "listenerd"}
        if self.engine.token:
            headers["Authorization"] = f"Bearer {self.engine.token}"
        connector = aiohttp.TCPConnector(ssl=client_tls(self.engine.ca_bundle), limit=4, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector, headers=headers, timeout=aiohttp.ClientTimeout(total=self.engine.timeout))
        self._task = asyncio.create_task(self._run(), name="forwarder")

    async def stop(self, flush_timeout: float) -> None:
        """Deliver what can be delivered within `flush_timeout`; the rest stays in the outbox."""
        self._stopping = True
        self.outbox.committed.set()  # wake an idle loop so it notices
        if self._task and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._drained.wait()), flush_timeout)
            except TimeoutError:
                log.warning("engine flush bound reached; undelivered events stay in the outbox",
                            waiting=self.outbox.depth, bound=flush_timeout)
            await cancel_and_wait(self._task)
        if self._acking is not None:  # an accepted batch: record it, or it is sent again next start
            with contextlib.suppress(Exception):
                await self._acking
        if self._session:
            await self._session.close()
            self._session = None

    # -- the loop

    async def _run(self) -> None:
        failures = 0  # store failures in a row (a lease, a dead letter): backed off like engine failures
        while True:
            try:
                rows = await self._next_batch()
                if rows is None:
                    self._drained.set()
                    return
                self.in_flight = len(rows)
                await self._deliver(rows)
                failures = 0
            except sqlite3.Error as exc:  # counted and logged by the outbox; the rows are still there
                failures += 1
                self.last_error = f"store: {exc}"
                await asyncio.sleep(self._backoff(failures))
            except Exception:
                log.exception("forwarder step failed; retrying")
                failures += 1
                self._cursor = 0  # a bug: lease from the head again rather than skip a row (the engine de-duplicates)
                await asyncio.sleep(self._backoff(failures))
            finally:
                self.in_flight = 0

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(attempt, self.engine.retry_initial, self.engine.retry_max)

    async def _settle(self) -> None:
        """Wait until the previous batch's ack is recorded (acks stay in order, one pending at most).

        While the store refuses it, retry it after the engine retry policy's back-off: the engine has
        those rows, so they are not sent again, and no later batch goes before this ack is recorded.
        The task stays in `_acking` while it runs, so a stop waits for it and the outbox's count stays true.
        """
        attempt = 0
        while self._acking is not None:
            rows = await asyncio.shield(self._acking)
            self._acking = None
            if rows is None:
                if attempt:
                    log.info("engine ack recorded after the store failed", attempts=attempt + 1)
                return
            attempt += 1
            self.last_error = "store: the engine accepted a batch, its ack cannot be recorded yet"
            if attempt == 1:
                log.warning("the store cannot record the engine's ack; retrying it, sending nothing meanwhile",
                            events=len(rows), error=self.outbox.health.problem)
            await asyncio.sleep(self._backoff(attempt))
            self._acking = asyncio.create_task(self._ack(rows))

    async def _ack(self, rows: list[Row]) -> list[Row] | None:
        """Record an accepted batch's ack while the next batch is already on its way; the rows when it failed.

        The engine has accepted these rows, so sending the next batch now keeps per-listener order.
        Should the ack fail, `_settle` retries it; should the process die first, the rows are still in
        the outbox and go again at the next start (same ids).
        """
        try:
            acked = await self.outbox.ack(rows)
        except sqlite3.Error:  # counted and logged by the outbox
            return rows
        except Exception:
            log.exception("could not record an engine ack; retrying it")
            return rows
        self.metrics.delivered.inc(len(acked))
        if self.on_forwarded:
            for (tenant_id, listener_id), count in _counts(acked).items():
                self.on_forwarded(tenant_id, listener_id, count)
        return None

    async def _next_batch(self) -> list[Row] | None:
        """The next rows in commit order: up to batch-max, lingering up to linger-ms to fill it."""
        committed = self.outbox.committed
        while True:
            committed.clear()
            if not self._cursor:
                await self._settle()  # from the head: the batch whose ack is still being recorded is no row to send
            self._batch_rewinds = self._rewinds
            rows = await self.outbox.lease(self.engine.batch_max, after=self._cursor)
            if rows:
                break
            await self._settle()
            if self._cursor:
                # everything sent is acked: lease from the head again, at once. Not only when the depth says
                # the outbox is empty: rows below the cursor (a group this node took, its backlog) are counted
                # in the depth, which so would never reach 0 while they wait
                self._cursor = 0
                continue
            if self._stopping and self.outbox.depth == 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(committed.wait(), _IDLE_TICK)
        # linger counts from receipt, not from the lease, on the monotonic clock (`ids.receipt_clock`): a
        # wall clock stepped back cannot stretch it, and no batch waits longer than linger-ms from here
        linger = self.engine.linger_ms / 1000
        deadline = time.monotonic() + max(0.0, linger - age(rows[0].received))
        while len(rows) < self.engine.batch_max and not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            committed.clear()
            more = await self.outbox.lease(self.engine.batch_max - len(rows), after=rows[-1].seq)
            if more:
                rows.extend(more)
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(committed.wait(), remaining)
        return rows

    async def _deliver(self, rows: list[Row]) -> None:
        """Send one batch until it is acknowledged or dead-lettered."""
        body = b"[" + b",".join(r.body for r in rows) + b"]"
        self.attempt = 0
        while True:
            outcome = await self._post(body)
            if isinstance(outcome, Retry):
                self.attempt += 1
                self.last_error = outcome.reason
                self.metrics.retried.labels(outcome.kind).inc()
                delay = self._backoff(self.attempt)
                if outcome.delay is not None:  # Retry-After: honoured, but never a tight loop nor a stall past an hour
                    delay = min(max(outcome.delay, self.engine.retry_initial), RETRY_AFTER_MAX)
                log.warning("engine delivery will be retried", reason=outcome.reason, delay=round(delay, 3),
                            attempt=self.attempt, events=len(rows))
                await asyncio.sleep(delay)
                continue
            if outcome is not None and outcome.status == 413 and len(rows) > 1:
                # too large for the engine: halve until the refused event is alone, so only its own
                # listener's dead letters get it (a batch mixes tenants); each half goes in order
                log.warning("engine refused a batch as too large; splitting it", events=len(rows))
                self.metrics.retried.labels("split").inc()
                middle = len(rows) // 2
                await self._deliver(rows[:middle])
                await self._deliver(rows[middle:])
                return
            if outcome is not None:
                await self._settle()
                await self.outbox.dead_letter(rows, outcome.status, outcome.response)
                self._advance(rows)
                self.metrics.dead_lettered.inc(len(rows))
                self.last_error = outcome.reason
                log.error("engine refused a batch; it is in the dead-letter table", status=outcome.status,
                          events=len(rows))
                return
            self.last_error = None
            await self._settle()
            self._advance(rows)
            self._acking = asyncio.create_task(self._ack(rows))
            return

    async def _post(self, body: bytes) -> Retry | Refused | None:
        """POST one batch: None once the engine accepted it, else how to go on (the kind is the metric label)."""
        assert self._session is not None
        started = time.perf_counter()
        try:
            # never follow a redirect: aiohttp would re-send the POST as a bodyless GET (and the token to
            # another host), and a 2xx there would ack a batch the engine never got
            async with self._session.post(self.engine.url, data=body, allow_redirects=False) as response:
                status = response.status
                if 200 <= status < 300:
                    await response.read()
                    return None
                text = (await response.content.read(RESPONSE_KEEP)).decode("utf-8", "replace")
                if 300 <= status < 400:
                    return Retry(http_kind(status), f"HTTP {status}: the engine redirects to "
                                 f"{response.headers.get('Location')!r}; set engine.url to the final URL")
                if retryable(status):
                    return Retry(http_kind(status), f"HTTP {status}",
                                 retry_after_seconds(response.headers.get("Retry-After")))
                return Refused(f"engine refused the batch: HTTP {status}", status, text)
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError is an OSError
            return Retry(kind_of(exc), f"POST to the engine failed: {describe(exc, limit=200)}")
        finally:
            self.metrics.engine_latency.observe(time.perf_counter() - started)


def _counts(rows: list[Row]) -> dict[tuple[str, str], int]:
    """Events per listener; rows of one segment share their id strings, so runs are counted cheaply."""
    counts: dict[tuple[str, str], int] = {}
    tenant_id = listener_id = None
    run = 0
    for row in rows:
        if row.listener_id is listener_id and row.tenant_id is tenant_id:
            run += 1
            continue
        if run:
            counts[(tenant_id, listener_id)] = counts.get((tenant_id, listener_id), 0) + run  # type: ignore[index]
        tenant_id, listener_id, run = row.tenant_id, row.listener_id, 1
    if run:
        counts[(tenant_id, listener_id)] = counts.get((tenant_id, listener_id), 0) + run  # type: ignore[index]
    return counts
