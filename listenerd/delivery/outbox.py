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
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from listenerd.store import Store, put_checkpoint

EVENT_NAMESPACE = uuid.UUID("6f1c3a52-8d3e-4b7a-9a77-2f4c1f0e5d10")


def event_id(tenant_id: str, listener_id: str, key: str | None) -> str:
    """Stable for one source event (UUIDv5 of tenant, listener, source key); else fresh, stored once."""
    if key is None:
        return str(uuid.uuid4())
    return str(uuid.uuid5(EVENT_NAMESPACE, f"{tenant_id}\x00{listener_id}\x00{key}"))


def received_at(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
                 max_batch: int = 5000):
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

    async def start(self) -> None:
        events, size = await self.store.run(lambda c: c.execute(
            "SELECT count(*), coalesce(sum(length(body)), 0) FROM outbox").fetchone())
        self._usage.events, self._usage.bytes = events, size
        self._publish_usage()
        self._writer = asyncio.create_task(self._write_loop(), name="outbox-writer")

    async def close(self) -> None:
        """Commit what is queued, then stop the writer."""
        self._closed = True
        await self.flush()
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
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch:]
                await self.store.transaction(lambda c, b=batch: _insert(c, b))
                for item in batch:
                    if item.on_commit:
                        item.on_commit(item.envelope)
                self.committed.set()
                self._publish_usage()
            self._idle.set()

    # -- consuming (the forwarder)

    async def lease(self, limit: int, after: int = 0) -> list[Row]:
        rows = await self.store.run(lambda c: c.execute(
            "SELECT seq, tenant_id, listener_id, body, received_at FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (after, limit)).fetchall())
        return [Row(*r) for r in rows]

    async def ack(self, rows: list[Row]) -> None:
        seqs = [(r.seq,) for r in rows]
        await self.store.transaction(lambda c: c.executemany("DELETE FROM outbox WHERE seq = ?", seqs))
        self._release(rows)

    async def dead_letter(self, rows: list[Row], status_code: int, response: str) -> None:
        """Move refused rows to the dead-letter table, one entry per listener, in one transaction."""
        now = time.time()
        by_listener: dict[tuple[str, str], list[Row]] = {}
        for row in rows:
            by_listener.setdefault((row.tenant_id, row.listener_id), []).append(row)

        def move(c: sqlite3.Connection) -> None:
            for (tenant_id, listener_id), group in by_listener.items():
                events = b"[" + b",".join(r.body for r in group) + b"]"
                c.execute("INSERT INTO dead_letters (tenant_id, listener_id, status_code, response, failed_at, "
                          "events) VALUES (?, ?, ?, ?, ?, ?)",
                          (tenant_id, listener_id, status_code, response, now, events))
            c.executemany("DELETE FROM outbox WHERE seq = ?", [(r.seq,) for r in rows])

        await self.store.transaction(move)
        self._release(rows)

    def _release(self, rows: list[Row]) -> None:
        self._usage.events -= len(rows)
        self._usage.bytes -= sum(len(r.body) for r in rows)
        self._usage.changed.set()
        self._publish_usage()

    def _publish_usage(self) -> None:
        if self.metrics:
            self.metrics.outbox_depth.set(self._usage.events)
            self.metrics.outbox_bytes.set(self._usage.bytes)

    @property
    def depth(self) -> int:
        return self._usage.events


def _insert(conn: sqlite3.Connection, batch: list[_Pending]) -> None:
    conn.executemany(
        "INSERT INTO outbox (tenant_id, listener_id, event_id, body, received_at) VALUES (?, ?, ?, ?, ?)",
        [(p.tenant_id, p.listener_id, p.event_id, p.body, p.received) for p in batch])
    checkpoints: dict[tuple[str, str], str] = {}
    for item in batch:
        if item.checkpoint is not None:
            checkpoints[(item.tenant_id, item.listener_id)] = item.checkpoint
    for (tenant_id, listener_id), value in checkpoints.items():
        put_checkpoint(conn, tenant_id, listener_id, value)
