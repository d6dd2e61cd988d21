"""The durable outbox: every event is committed here before it counts as received.

Appends from all listeners are queued and group-committed by one writer task: while one
transaction is on disk the next batch gathers, so a busy daemon commits thousands of events per
transaction and an idle one commits each event at once. A Salesforce checkpoint rides in the same
transaction as the events before it, so a crash can never leave the checkpoint ahead of the
outbox. The outbox is bounded (events and bytes); at the bound `append` waits, which stops the
calling source from reading its socket (back-pressure), and nothing is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from listenerd.backoff import backoff_delay
from listenerd.status import rfc3339
from listenerd.store import Store, in_transaction, put_checkpoint

log = structlog.get_logger("listenerd.outbox")

EVENT_NAMESPACE = uuid.UUID("6f1c3a52-8d3e-4b7a-9a77-2f4c1f0e5d10")


def event_id(tenant_id: str, listener_id: str, key: str | None) -> str:
    """Stable for one source event (UUIDv5 of tenant, listener, source key); else fresh, stored once.

    Computed directly from SHA-1 and random bytes: the same values as `uuid.uuid5`/`uuid.uuid4`,
    at a fraction of their cost, because this runs once per event on the hot path.
    """
    if key is None:
        raw = bytearray(_random(16))
        raw[6] = (raw[6] & 0x0F) | 0x40
    else:
        raw = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{tenant_id}\x00{listener_id}\x00{key}".encode(),
                                     usedforsecurity=False).digest()[:16])
        raw[6] = (raw[6] & 0x0F) | 0x50
    raw[8] = (raw[8] & 0x3F) | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
_pool = bytearray()


def _random(n: int) -> bytes:
    """Random bytes from a refilled pool of os.urandom: one system call per 4,096 ids."""
    global _pool
    if len(_pool) < n:
        _pool = bytearray(os.urandom(n * 4096))
    chunk = bytes(_pool[-n:])
    del _pool[-n:]
    return chunk


_stamp_second = -1
_stamp_prefix = ""


def received_at(ts: float) -> str:
    """RFC 3339 UTC with microseconds; the per-second prefix is formatted once per second."""
    global _stamp_second, _stamp_prefix
    second = int(ts)
    micros = round((ts - second) * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if second != _stamp_second:
        _stamp_prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        _stamp_second = second
    return f"{_stamp_prefix}.{micros:06d}Z"


@dataclass(slots=True)
class _Pending:
    tenant_id: str
    listener_id: str
    event_id: str
    body: bytes
    received: float
    checkpoint: str | None
    envelope: dict[str, Any]
    on_commit: Callable[[dict[str, Any]], None] | None


@dataclass(slots=True)
class Row:
    """One leased outbox row: the envelope exactly as it will be sent."""

    seq: int
    tenant_id: str
    listener_id: str
    body: bytes
    received: float


@dataclass
class _Usage:
    events: int = 0
    bytes: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Outbox:
    def __init__(self, store: Store, *, max_events: int, max_bytes: int, metrics: Any = None,
                 max_batch: int = 1000):
        self.store = store
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._usage = _Usage()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.committed = asyncio.Event()  # set after each commit; the forwarder waits on it
        self.commit_failures = 0
        self._head_received: float | None = None  # receipt time of the oldest waiting event
        if metrics is not None:
            metrics.outbox_oldest_age.set_function(self.oldest_age)

    async def start(self) -> None:
        events, size = await self.store.run(lambda c: c.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM outbox").fetchone())
        self._usage.events, self._usage.bytes = events, size
        if events:
            self._head_received = await self.store.run(lambda c: c.execute(
                "SELECT received_at FROM outbox ORDER BY seq LIMIT 1").fetchone()[0])
        self._publish_usage()
        self._writer = asyncio.create_task(self._write_loop(), name="outbox-writer")

    async def close(self, timeout: float | None = None) -> None:
        """Commit what is queued, then stop the writer.

        With `timeout`, give up waiting after that long (a store that keeps failing must not hang
        shutdown): what is still queued was never committed, so it never counted as received and no
        checkpoint moved past it.
        """
        self._closed = True
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            log.error("outbox could not commit before shutdown; those events were never acknowledged",
                      events=len(self._queue))
            self._queue.clear()
            self._idle.set()
        if self._writer:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass

    # -- appending

    async def append(self, tenant_id: str, listener_id: str, source: str, event: dict[str, Any], *,
                     key: str | None = None, checkpoint: str | None = None,
                     on_commit: Callable[[dict[str, Any]], None] | None = None,
                     on_wait: Callable[[bool], None] | None = None) -> None:
        if self._closed:
            raise RuntimeError("outbox is closed")
        now = time.time()
        envelope = {"id": event_id(tenant_id, listener_id, key), "tenant-id": tenant_id,
                    "listener-id": listener_id, "source": source, "received-at": received_at(now),
                    "event": event}
        body = orjson.dumps(envelope)
        if self._full(len(body)):
            await self._wait_for_room(len(body), on_wait)
        if self._usage.events == 0:
            self._head_received = now
        self._usage.events += 1
        self._usage.bytes += len(body)
        self._queue.append(_Pending(tenant_id, listener_id, envelope["id"], body, now, checkpoint, envelope,
                                    on_commit))
        self._idle.clear()
        self._wake.set()

    def _full(self, size: int) -> bool:
        usage = self._usage
        return usage.events >= self.max_events or (usage.events > 0 and usage.bytes + size > self.max_bytes)

    async def _wait_for_room(self, size: int, on_wait: Callable[[bool], None] | None) -> None:
        if self.metrics:
            self.metrics.backpressure.inc()
        if on_wait:
            on_wait(True)
        try:
            while self._full(size):
                self._usage.changed.clear()
                await self._usage.changed.wait()
        finally:
            if on_wait:
                on_wait(False)

    async def flush(self) -> None:
        """Wait until everything appended so far is committed."""
        while self._queue or not self._idle.is_set():
            await self._idle.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._queue[: self.max_batch]
                await self._commit(batch)
                del self._queue[: len(batch)]
                for item in batch:
                    if item.on_commit:
                        item.on_commit(item.envelope)
                self.committed.set()
                self._publish_usage()
            self._idle.set()

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commit one batch, retrying until it is on disk.

        A failed transaction (disk full, I/O error) rolls back events and checkpoints together, so
        nothing counts as received and no checkpoint moves past it; the batch stays queued (sources
        block at the bound meanwhile) and is retried with back-off instead of being dropped.
        """
        attempt = 0
        while True:
            try:
                await self.store.transaction(lambda c: _insert(c, batch))
                if attempt:
                    log.info("outbox commit recovered", attempts=attempt + 1)
                return
            except sqlite3.Error as exc:
                attempt += 1
                self.commit_failures += 1
                log.error("outbox commit failed; retrying", error=str(exc), events=len(batch), attempt=attempt)
                await asyncio.sleep(backoff_delay(attempt, 0.05, 5.0))

    # -- consuming (the forwarder)

    async def lease(self, limit: int, after: int = 0) -> list[Row]:
        rows = await self.store.run(lambda c: c.execute(
            "SELECT seq, tenant_id, listener_id, body, received_at FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit)).fetchall())
        if rows and after == 0:
            self._head_received = rows[0][4]
        return [Row(*r) for r in rows]

    async def ack(self, rows: list[Row], *, whole_range: bool = False) -> list[Row]:
        """Delete delivered rows; returns those that were still there (a row sent twice is acked once).

        `whole_range`: rows are every outbox row from the first's seq to the last's (as leases
        return them), so one range delete does instead of one delete per row.
        """
        if self.store.synchronous == "FULL":
            gone = await self.store.run(lambda c: _relaxed(c, lambda c: _delete(c, rows, whole_range), "FULL"))
        else:
            gone = await self.store.transaction(lambda c: _delete(c, rows, whole_range))
        if gone is not None:
            rows = [r for r in rows if r.seq in gone]
        self._release(rows)
        return rows

    async def dead_letter(self, rows: list[Row], status_code: int, response: str, *,
                          whole_range: bool = False) -> None:
        """Move refused rows to the dead-letter table, one entry per listener, in one transaction."""
        now = time.time()
        by_listener: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            by_listener.setdefault((row.tenant_id, row.listener_id), []).append(row)

        def move(c: sqlite3.Connection) -> set[int] | None:
            gone = _delete(c, rows, whole_range)
            for (tenant_id, listener_id), group in by_listener.items():
                group = [r for r in group if gone is None or r.seq in gone]  # acked meanwhile: not refused
                if not group:
                    continue
                events = b"[" + b",".join(r.body for r in group) + b"]"
                c.execute("INSERT INTO dead_letters (tenant_id, listener_id, status_code, response, failed_at, "
                          "events) VALUES (?, ?, ?, ?, ?, ?)",
                          (tenant_id, listener_id, status_code, response, now, events))
            return gone

        gone = await self.store.transaction(move)
        self._release(rows if gone is None else [r for r in rows if r.seq in gone])

    def _release(self, rows: list[Row]) -> None:
        self._usage.events -= len(rows)
        self._usage.bytes -= sum(len(r.body) for r in rows)
        if self._usage.events <= 0:
            self._head_received = None
        self._usage.changed.set()
        self._publish_usage()

    def _publish_usage(self) -> None:
        if self.metrics:
            self.metrics.outbox_depth.set(self._usage.events)
            self.metrics.outbox_bytes.set(self._usage.bytes)

    # -- dead letters (the API)

    async def dead_letters(self, tenant_id: str, listener_id: str | None = None) -> list[dict[str, Any]]:
        """Every dead letter of a tenant, oldest first, as the API shows it."""
        sql = ("SELECT id, listener_id, status_code, response, failed_at, events FROM dead_letters "
               "WHERE tenant_id = ?")
        params: tuple[Any, ...] = (tenant_id,)
        if listener_id is not None:
            sql += " AND listener_id = ?"
            params += (listener_id,)
        rows = await self.store.run(lambda c: c.execute(sql + " ORDER BY id", params).fetchall())
        return [dead_letter_json(*row) for row in rows]

    async def dead_letter_by_id(self, tenant_id: str, dead_letter_id: int) -> dict[str, Any] | None:
        row = await self.store.run(lambda c: c.execute(
            "SELECT id, listener_id, status_code, response, failed_at, events FROM dead_letters "
            "WHERE tenant_id = ? AND id = ?", (tenant_id, dead_letter_id)).fetchone())
        return dead_letter_json(*row) if row else None

    async def requeue_dead_letter(self, tenant_id: str, dead_letter_id: int) -> int | None:
        """Put a dead letter's events back into the outbox (same ids), in one transaction.

        Returns how many events were queued, or None when there is no such dead letter. The events
        go to the back of the outbox: an operator retry is a new delivery, after what is waiting.
        The bound is not applied: the operator asked for it, and these events were counted before.
        """
        def move(c: sqlite3.Connection) -> list[tuple[str, str, str, bytes, float]] | None:
            row = c.execute("SELECT listener_id, events FROM dead_letters WHERE tenant_id = ? AND id = ?",
                            (tenant_id, dead_letter_id)).fetchone()
            if row is None:
                return None
            listener_id, events = row
            items = []
            for envelope in orjson.loads(events):
                items.append((tenant_id, envelope.get("listener-id", listener_id), envelope["id"],
                              orjson.dumps(envelope), _epoch(envelope.get("received-at"))))
            insert_rows(c, items)
            c.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
            return items

        items = await self.store.transaction(move)
        if items is None:
            return None
        if self._usage.events == 0 and items:
            self._head_received = items[0][4]
        self._usage.events += len(items)
        self._usage.bytes += sum(len(i[3]) for i in items)
        self._publish_usage()
        self.committed.set()
        return len(items)

    async def discard_dead_letter(self, tenant_id: str, dead_letter_id: int) -> bool:
        cursor = await self.store.transaction(lambda c: c.execute(
            "DELETE FROM dead_letters WHERE tenant_id = ? AND id = ?", (tenant_id, dead_letter_id)))
        return cursor.rowcount > 0

    # -- usage

    @property
    def depth(self) -> int:
        return self._usage.events

    @property
    def size_bytes(self) -> int:
        return self._usage.bytes

    @property
    def full(self) -> bool:
        return self._full(0)

    def oldest_received_at(self) -> float | None:
        """Receipt time (epoch seconds) of the oldest waiting event, or None when empty."""
        return self._head_received if self._usage.events > 0 else None

    def oldest_age(self) -> float:
        """Seconds the oldest waiting event has waited (0 when the outbox is empty)."""
        head = self._head_received
        return max(0.0, time.time() - head) if head is not None and self._usage.events > 0 else 0.0


def dead_letter_json(dead_letter_id: int, listener_id: str, status_code: int, response: str,
                     failed_at: float, events: bytes) -> dict[str, Any]:
    return {"id": str(dead_letter_id), "listener-id": listener_id, "status-code": status_code,
            "response": response, "failed-at": rfc3339(failed_at), "events": orjson.loads(events)}


def _epoch(stamp: str | None) -> float:
    if not stamp:
        return time.time()
    try:
        return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return time.time()


def _relaxed(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], restore: str) -> Any:
    """Run one transaction without the per-commit fsync of FULL.

    Used for acks only: losing an ack to a power cut means the engine sees those events again
    (at least once still holds), and the WAL is sequential, so the next FULL commit syncs this one
    too. Appends, checkpoints and dead letters keep their fsync.
    """
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        return in_transaction(conn, fn)
    finally:
        conn.execute(f"PRAGMA synchronous={restore}")


def _delete(conn: sqlite3.Connection, rows: list[Row], whole_range: bool) -> set[int] | None:
    """Delete these rows; None when all were there (the usual case), else the seqs actually deleted.

    A row can be gone already when it was sent twice (after a failed ack) and the first ack
    landed; counting it again would make the outbox's usage drift.
    """
    if not rows:
        return None
    if whole_range:
        first, last = rows[0].seq, rows[-1].seq
        present = conn.execute("SELECT count(*) FROM outbox WHERE seq BETWEEN ? AND ?", (first, last)).fetchone()[0]
        if present == len(rows):
            conn.execute("DELETE FROM outbox WHERE seq BETWEEN ? AND ?", (first, last))
            return None
    gone = set()
    for row in rows:
        if conn.execute("DELETE FROM outbox WHERE seq = ?", (row.seq,)).rowcount:
            gone.add(row.seq)
    return None if len(gone) == len(rows) else gone


_INSERT_CHUNK = 256


def insert_rows(conn: sqlite3.Connection, rows: list[tuple[str, str, str, bytes, float]]) -> None:
    """Insert outbox rows in order, with multi-row INSERTs of power-of-two sizes.

    Why not `executemany`: it steps once per row and releases and re-takes the GIL around every
    step, so under load the store thread and the event loop hand the GIL back and forth per event
    (a convoy that halved throughput). One statement per chunk binds in C and steps once. Chunk
    sizes are powers of two so at most nine statements are ever prepared (the cache keeps them).
    """
    i = 0
    while i < len(rows):
        size = _INSERT_CHUNK
        while size > len(rows) - i:
            size //= 2
        chunk = rows[i:i + size]
        conn.execute(_insert_sql(size), [value for row in chunk for value in row])
        i += size


_INSERT_SQL: dict[int, str] = {}


def _insert_sql(size: int) -> str:
    sql = _INSERT_SQL.get(size)
    if sql is None:
        sql = _INSERT_SQL[size] = ("INSERT INTO outbox (tenant_id, listener_id, event_id, body, received_at) VALUES "
                                   + ",".join(["(?, ?, ?, ?, ?)"] * size))
    return sql


def _insert(conn: sqlite3.Connection, batch: list[_Pending]) -> None:
    insert_rows(conn, [(p.tenant_id, p.listener_id, p.event_id, p.body, p.received) for p in batch])
    checkpoints: dict[tuple[str, str], str] = {}
    for item in batch:
        if item.checkpoint is not None:
            checkpoints[(item.tenant_id, item.listener_id)] = item.checkpoint
    for (tenant_id, listener_id), value in checkpoints.items():
        put_checkpoint(conn, tenant_id, listener_id, value)
