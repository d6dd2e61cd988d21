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
import sys
import time
import uuid
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import accumulate
from typing import Any, NamedTuple

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
    at a fraction of their cost, because this runs once per event on the hot path: fresh ids are
    formatted in bulk from one `os.urandom` call, and the SHA-1 of a listener's namespace prefix is
    computed once and copied per key.
    """
    if key is None:
        if not _fresh:
            _fresh.extend(_fresh_ids(4096))
        return _fresh.pop()
    hasher = _hashers.get((tenant_id, listener_id))
    if hasher is None:
        if len(_hashers) > 10_000:
            _hashers.clear()
        hasher = _hashers[(tenant_id, listener_id)] = hashlib.sha1(
            _NAMESPACE_BYTES + f"{tenant_id}\x00{listener_id}\x00".encode(), usedforsecurity=False)
    hasher = hasher.copy()
    hasher.update(key.encode())
    x = hasher.hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122 variant: top bits 10
_hashers: dict[tuple[str, str], Any] = {}
_fresh: list[str] = []


os.register_at_fork(after_in_child=_fresh.clear)  # a forked child must never hand out its parent's ids


def _fresh_ids(n: int) -> list[str]:
    """`n` random (version 4) UUIDs from one system call, laid out column by column in C (strided
    slice copies), not formatted one by one."""
    digits = os.urandom(16 * n).hex().encode()
    text = bytearray(b"-" * (36 * n))
    for k, at in enumerate(_DIGIT_AT):
        text[at::36] = digits[k::32]
    text[14::36] = b"4" * n  # version
    text[19::36] = digits[16::32].translate(_VARIANT_BYTES)  # variant: top bits 10
    ids = text.decode()
    return [ids[i:i + 36] for i in range(0, 36 * n, 36)]


_DIGIT_AT = [k + (k >= 8) + (k >= 12) + (k >= 16) + (k >= 20) for k in range(32)]  # hex digit -> 8-4-4-4-12
_VARIANT_BYTES = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")


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


GROUP_BYTES = 8 << 20  # a commit group (so a segment, whose offsets are uint32) stays well below 4 GiB
SHIFT = 20  # a Row's seq is (segment seq << SHIFT) | index of the event in its segment
_MASK = (1 << SHIFT) - 1
_BIG_ENDIAN = sys.byteorder == "big"


class Row(NamedTuple):
    """One leased event: the envelope exactly as it will be sent.

    `seq` orders events (commit order) and names this one: its segment's seq shifted left by
    SHIFT, or'ed with its index in the segment. `received` is its segment's first receipt time.
    A named tuple: leases make one per event, and a tuple is the cheapest object to make.
    """

    seq: int
    tenant_id: str
    listener_id: str
    body: bytes
    received: float


class _Segment:
    """One listener's events in one commit group: envelope bytes in append order."""

    __slots__ = ("tenant_id", "listener_id", "received", "bodies", "checkpoint")

    def __init__(self, tenant_id: str, listener_id: str, received: float):
        self.tenant_id = tenant_id
        self.listener_id = listener_id
        self.received = received
        self.bodies: list[bytes] = []
        self.checkpoint: str | None = None


class _Lane:
    """What append needs per listener, looked up once: the envelope's bytes between id and receipt time."""

    __slots__ = ("prefix", "listener")

    def __init__(self, prefix: bytes, listener: tuple[str, str]):
        self.prefix = prefix
        self.listener = listener  # (tenant, listener): a commit group's key for this listener's segment


class _Group:
    """What one transaction commits: a segment per listener, and who to tell once it is on disk."""

    __slots__ = ("segments", "events", "bytes", "sealed", "callbacks", "counters")

    def __init__(self) -> None:
        self.segments: dict[tuple[str, str], _Segment] = {}
        self.events = 0
        self.bytes = 0
        self.sealed = False  # the writer has taken it (or it is full): appends open the next group
        self.callbacks: list[tuple[Callable[[dict[str, Any]], None], bytes]] = []
        self.counters: dict[Callable[[int], None], int] = {}


@dataclass
class _Usage:
    events: int = 0
    bytes: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Outbox:
    def __init__(self, store: Store, *, max_events: int, max_bytes: int, metrics: Any = None,
                 max_batch: int = 1000):
        if not 0 < max_batch <= _MASK:
            raise ValueError(f"max_batch must be 1..{_MASK}")
        self.store = store
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.max_batch = max_batch  # events per transaction (so per segment at most)
        self._groups: list[_Group] = []  # oldest first; only the last one, unsealed, takes appends
        self._queued = 0  # events appended, not yet committed
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._usage = _Usage()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.committed = asyncio.Event()  # set after each commit; the forwarder waits on it
        self.commit_failures = 0
        self._head_received: float | None = None  # receipt time of the oldest waiting event
        self._lanes: dict[tuple[str, str, str], _Lane] = {}  # per listener: its envelope prefix
        if metrics is not None:
            metrics.outbox_oldest_age.set_function(self.oldest_age)

    async def start(self) -> None:
        events, size, head = await self.store.run(lambda c: c.execute(
            "SELECT coalesce(sum(events), 0), coalesce(sum(size), 0), "
            "(SELECT received_at FROM outbox_segments ORDER BY seq LIMIT 1) FROM outbox_segments").fetchone())
        self._usage.events, self._usage.bytes = events, size
        if events:
            self._head_received = head
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
                      events=self._queued)
            self._groups.clear()
            self._queued = 0
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
                     on_wait: Callable[[bool], None] | None = None,
                     on_commit_count: Callable[[int], None] | None = None) -> None:
        """Queue one event; it counts as received once its group is committed.

        `on_commit(envelope)` is called per event after its commit (the envelope is decoded again
        from the stored bytes: for tests and tools). `on_commit_count(n)` is the cheap form sources
        use: called once per commit with how many of this caller's events it held.
        """
        if self._closed:
            raise RuntimeError("outbox is closed")
        now = time.time()
        lane = self._lanes.get((tenant_id, listener_id, source))
        if lane is None:
            lane = self._lane(tenant_id, listener_id, source)
        # the bytes orjson.dumps gives the envelope dict {"id", "tenant-id", "listener-id", "source",
        # "received-at", "event"}, built without the dict (the constant middle is encoded once)
        body = b"".join((b'{"id":"', event_id(tenant_id, listener_id, key).encode(), lane.prefix,
                         received_at(now).encode(), b'","event":', orjson.dumps(event), b"}"))
        usage = self._usage
        if usage.events >= self.max_events or (usage.events and usage.bytes + len(body) > self.max_bytes):
            await self._wait_for_room(len(body), on_wait)
        if usage.events == 0:
            self._head_received = now
        usage.events += 1
        usage.bytes += len(body)
        groups = self._groups
        if groups and not groups[-1].sealed:
            group = groups[-1]
        else:
            group = _Group()
            groups.append(group)
        segment = group.segments.get(lane.listener)
        if segment is None:
            segment = group.segments[lane.listener] = _Segment(tenant_id, listener_id, now)
        segment.bodies.append(body)
        if checkpoint is not None:
            segment.checkpoint = checkpoint
        if on_commit is not None:
            group.callbacks.append((on_commit, body))
        if on_commit_count is not None:
            group.counters[on_commit_count] = group.counters.get(on_commit_count, 0) + 1
        group.events += 1
        group.bytes += len(body)
        if group.events >= self.max_batch or group.bytes >= GROUP_BYTES:
            group.sealed = True
        self._queued += 1
        self._idle.clear()
        self._wake.set()

    def _lane(self, tenant_id: str, listener_id: str, source: str) -> _Lane:
        if len(self._lanes) > 10_000:  # listeners come and go: never grow without bound
            self._lanes.clear()
        prefix = (b'","tenant-id":' + orjson.dumps(tenant_id) + b',"listener-id":' + orjson.dumps(listener_id)
                  + b',"source":' + orjson.dumps(source) + b',"received-at":"')
        lane = self._lanes[(tenant_id, listener_id, source)] = _Lane(prefix, (tenant_id, listener_id))
        return lane

    def set_bounds(self, max_events: int, max_bytes: int) -> None:
        """New bounds from a reload; sources waiting for room re-check at once."""
        self.max_events, self.max_bytes = max_events, max_bytes
        self._usage.changed.set()

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
        while self._groups or not self._idle.is_set():
            await self._idle.wait()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._groups:
                group = self._groups[0]
                group.sealed = True  # appends made while it commits go to the next group
                await self._commit(group)
                if not self._groups or self._groups[0] is not group:  # closed meanwhile (timeout)
                    continue
                del self._groups[0]
                self._queued -= group.events
                for callback, count in group.counters.items():
                    callback(count)
                for callback, body in group.callbacks:
                    callback(orjson.loads(body))
                self.committed.set()
                self._publish_usage()
            self._idle.set()

    async def _commit(self, group: _Group) -> None:
        """Commit one group, retrying until it is on disk.

        A failed transaction (disk full, I/O error) rolls back events and checkpoints together, so
        nothing counts as received and no checkpoint moves past it; the group stays queued (sources
        block at the bound meanwhile) and is retried with back-off instead of being dropped.
        """
        attempt = 0
        rows = [_segment_row(s) for s in group.segments.values()]
        checkpoints = [(s.tenant_id, s.listener_id, s.checkpoint) for s in group.segments.values()
                       if s.checkpoint is not None]
        while True:
            try:
                await self.store.transaction(lambda c: _insert(c, rows, checkpoints))
                if attempt:
                    log.info("outbox commit recovered", attempts=attempt + 1)
                return
            except sqlite3.Error as exc:
                attempt += 1
                self.commit_failures += 1
                log.error("outbox commit failed; retrying", error=str(exc), events=group.events, attempt=attempt)
                await asyncio.sleep(backoff_delay(attempt, 0.05, 5.0))

    # -- consuming (the forwarder)

    async def lease(self, limit: int, after: int = 0) -> list[Row]:
        """Up to `limit` waiting events in commit order, after the event whose seq is `after`."""
        rows = await self.store.run(lambda c: _lease(c, limit, after))
        if rows and after == 0:
            self._head_received = rows[0].received
        return rows

    async def ack(self, rows: list[Row], *, whole_range: bool = False) -> list[Row]:
        """Delete delivered rows; returns those that were still there (a row sent twice is acked once).

        `whole_range` is accepted for callers of the per-event outbox; segments make every ack cheap.
        """
        if self.store.synchronous == "FULL":
            gone = await self.store.run(lambda c: _relaxed(c, lambda c: _remove(c, rows), "FULL"))
        else:
            gone = await self.store.transaction(lambda c: _remove(c, rows))
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
            gone = _remove(c, rows)
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
        self._usage.bytes -= sum([len(r.body) for r in rows])
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
        def move(c: sqlite3.Connection) -> tuple[int, int, float] | None:
            row = c.execute("SELECT listener_id, events FROM dead_letters WHERE tenant_id = ? AND id = ?",
                            (tenant_id, dead_letter_id)).fetchone()
            if row is None:
                return None
            listener_id, events = row
            envelopes = orjson.loads(events)
            by_listener: dict[str, list[dict[str, Any]]] = {}  # a dead letter is one listener's: kept general
            for envelope in envelopes:
                by_listener.setdefault(envelope.get("listener-id", listener_id), []).append(envelope)
            count = size = 0
            for lid, group in by_listener.items():
                for i in range(0, len(group), _MASK):
                    chunk = group[i:i + _MASK]
                    segment = _Segment(tenant_id, lid, _epoch(chunk[0].get("received-at")))
                    segment.bodies = [orjson.dumps(e) for e in chunk]
                    size += sum(len(b) for b in segment.bodies)
                    _insert(c, [_segment_row(segment)], [])
            count = len(envelopes)
            c.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
            return count, size, _epoch(envelopes[0].get("received-at")) if envelopes else time.time()

        moved = await self.store.transaction(move)
        if moved is None:
            return None
        count, size, received = moved
        if self._usage.events == 0 and count:
            self._head_received = received
        self._usage.events += count
        self._usage.bytes += size
        self._publish_usage()
        self.committed.set()
        return count

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

    def oldest_age(self) -> float:
        """Seconds the oldest waiting event has waited (0 when the outbox is empty).

        Per segment: from the first receipt of the oldest segment still waiting, so at most one commit
        group's span more than its oldest undelivered event."""
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


# -- segments on disk


def _ends_bytes(ends: array) -> bytes:
    if _BIG_ENDIAN:
        ends = array("I", ends)
        ends.byteswap()
    return ends.tobytes()


def _ends(blob: bytes | None, size: int) -> array:
    """End offsets of a segment's events in its `bodies` (a one-event segment stores NULL)."""
    ends = array("I")
    if blob is None:
        ends.append(size)
    else:
        ends.frombytes(blob)
        if _BIG_ENDIAN:
            ends.byteswap()
    return ends


def _segment_row(segment: _Segment) -> tuple[Any, ...]:
    bodies = segment.bodies
    blob = b"".join(bodies)
    ends = None if len(bodies) == 1 else _ends_bytes(array("I", accumulate(map(len, bodies))))
    return (segment.tenant_id, segment.listener_id, segment.received, len(bodies), len(blob), ends, blob)


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]],
            checkpoints: list[tuple[str, str, str]]) -> None:
    """Insert segments (one row per listener of a commit group) and their listeners' checkpoints.

    Multi-row INSERTs, seqs numbered here from the AUTOINCREMENT counter (never reused): every
    statement costs the store thread a GIL hand-off with the event loop, so a commit is a few
    statements whatever the number of listeners in it.
    """
    if rows:
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox_segments'").fetchone()
        seq = last[0] if last else 0
        i = 0
        while i < len(rows):
            size = _INSERT_CHUNK
            while size > len(rows) - i:
                size //= 2
            chunk = rows[i:i + size]
            seqs = range(seq + 1, seq + 1 + size)
            conn.execute(_insert_sql("outbox_segments (seq, tenant_id, listener_id, received_at, total, events, size)",
                                     7, size),
                         [v for s, r in zip(seqs, chunk, strict=True) for v in (s, r[0], r[1], r[2], r[3], r[3], r[4])])
            conn.execute(_insert_sql("outbox_bodies (seq, ends, bodies)", 3, size),
                         [v for s, r in zip(seqs, chunk, strict=True) for v in (s, r[5], r[6])])
            seq += size
            i += size
    for tenant_id, listener_id, value in checkpoints:
        put_checkpoint(conn, tenant_id, listener_id, value)


_INSERT_CHUNK = 256  # rows per statement (powers of two: at most nine statements are ever prepared per table)
_INSERT_SQL: dict[tuple[str, int], str] = {}


def _insert_sql(table: str, columns: int, size: int) -> str:
    sql = _INSERT_SQL.get((table, size))
    if sql is None:
        values = "(" + ", ".join(["?"] * columns) + ")"
        sql = _INSERT_SQL[(table, size)] = f"INSERT INTO {table} VALUES " + ", ".join([values] * size)
    return sql


_new_row = tuple.__new__  # Row(...) without the Python-level __new__ of a named tuple


def _lease(conn: sqlite3.Connection, limit: int, after: int) -> list[Row]:
    """Split waiting segments into Rows, in order, skipping delivered events, until `limit`."""
    out: list[Row] = []
    if limit <= 0:
        return out
    after_segment, after_index = after >> SHIFT, after & _MASK
    cursor = conn.execute("SELECT s.seq, tenant_id, listener_id, received_at, first, events, ends, bodies "
                          "FROM outbox_segments s JOIN outbox_bodies b ON b.seq = s.seq WHERE s.seq >= ? "
                          "ORDER BY s.seq", (after_segment,))
    try:
        for seq, tenant_id, listener_id, received, first, events, blob, bodies in cursor:  # a blob at a time
            start = max(first, after_index + 1) if after and seq == after_segment else first
            if blob is None:  # one event
                if start == 0:
                    out.append(_new_row(Row, (seq << SHIFT, tenant_id, listener_id, bodies, received)))
                    if len(out) >= limit:
                        return out
                continue
            ends = _ends(blob, len(bodies))
            base = seq << SHIFT
            count = len(ends)
            if events == count - first:  # no tombstones (the usual case): slice every event at C speed
                stop = min(count, start + limit - len(out))
                if stop <= start:
                    continue
                upper = ends[start:stop]
                lower = [ends[start - 1] if start else 0]
                lower.extend(upper[:-1])
                out.extend([_new_row(Row, (base | i, tenant_id, listener_id, bodies[a:b], received))
                            for i, a, b in zip(range(start, stop), lower, upper, strict=True)])
                if len(out) >= limit:
                    return out
                continue
            prev = ends[start - 1] if start else 0
            for index in range(start, len(ends)):
                end = ends[index]
                if end != prev:
                    out.append(_new_row(Row, (base | index, tenant_id, listener_id, bodies[prev:end], received)))
                    if len(out) >= limit:
                        return out
                prev = end
        return out
    finally:
        cursor.close()


def _remove(conn: sqlite3.Connection, rows: list[Row]) -> set[int] | None:
    """Delete these events; None when all were there (the usual case), else the seqs actually deleted.

    An event can be gone already when it was sent twice (after a failed ack) and the first ack
    landed; counting it again would make the outbox's usage drift. A segment whose every waiting
    event goes is deleted; one that keeps some moves its `first` past a delivered head, or (rarely:
    an ack that is not a prefix) is rewritten with zero-length tombstones, so indexes stay stable.
    """
    by_segment: dict[int, list[int]] = {}
    for row in rows:
        seq = row.seq
        indexes = by_segment.get(seq >> SHIFT)
        if indexes is None:
            by_segment[seq >> SHIFT] = [seq & _MASK]
        else:
            indexes.append(seq & _MASK)
    missing = False
    gone: set[int] = set()
    whole: list[int] = []
    # one statement for every segment involved (each statement costs the store thread a GIL hand-off)
    state = {seq: rest for seq, *rest in conn.execute(
        "SELECT seq, first, total, events, size FROM outbox_segments WHERE seq IN (SELECT value FROM json_each(?))",
        (orjson.dumps(list(by_segment)),))} if by_segment else {}
    for segment, indexes in by_segment.items():
        found = state.get(segment)
        if found is None:
            missing = True
            continue
        first, count, events, size = found
        indexes.sort()
        if (len(indexes) == events == count - first and indexes[0] == first and indexes[-1] == count - 1
                and len(set(indexes)) == len(indexes)):
            whole.append(segment)  # all of it: the usual case
            gone.update((segment << SHIFT) | i for i in indexes)
            continue
        blob, = conn.execute("SELECT ends FROM outbox_bodies WHERE seq = ?", (segment,)).fetchone()
        ends = _ends(blob, size)
        hit = {i for i in indexes if first <= i < count and ends[i] != (ends[i - 1] if i else 0)}
        if len(hit) != len(indexes):
            missing = True
        if not hit:
            continue
        gone.update((segment << SHIFT) | i for i in hit)
        left = events - len(hit)
        if not left:
            _drop(conn, segment)
            continue
        new_size = size - sum(ends[i] - (ends[i - 1] if i else 0) for i in hit)
        head = first  # the first event still waiting once these go
        while head < count and (head in hit or ends[head] == (ends[head - 1] if head else 0)):
            head += 1
        if max(hit) < head:  # a delivered head (the usual partial ack): the bytes stay, `first` moves
            conn.execute("UPDATE outbox_segments SET first = ?, events = ?, size = ? WHERE seq = ?",
                         (head, left, new_size, segment))
            continue
        # a hole (an ack that is not a prefix: rare): rewrite with zero-length tombstones, indexes stable
        bodies, = conn.execute("SELECT bodies FROM outbox_bodies WHERE seq = ?", (segment,)).fetchone()
        kept = []
        new_ends = array("I")
        offset = 0
        prev = 0
        for i in range(count):
            end = ends[i]
            if i >= head and end != prev and i not in hit:
                kept.append(bodies[prev:end])
                offset += end - prev
            new_ends.append(offset)
            prev = end
        conn.execute("UPDATE outbox_segments SET first = ?, events = ?, size = ? WHERE seq = ?",
                     (head, left, new_size, segment))
        conn.execute("UPDATE outbox_bodies SET ends = ?, bodies = ? WHERE seq = ?",
                     (_ends_bytes(new_ends), b"".join(kept), segment))
    if whole:
        seqs = orjson.dumps(whole)
        conn.execute("DELETE FROM outbox_segments WHERE seq IN (SELECT value FROM json_each(?))", (seqs,))
        conn.execute("DELETE FROM outbox_bodies WHERE seq IN (SELECT value FROM json_each(?))", (seqs,))
    return gone if missing else None


def _drop(conn: sqlite3.Connection, segment: int) -> None:
    conn.execute("DELETE FROM outbox_segments WHERE seq = ?", (segment,))
    conn.execute("DELETE FROM outbox_bodies WHERE seq = ?", (segment,))


def stored_envelopes(conn: sqlite3.Connection) -> list[bytes]:
    """Every waiting envelope's bytes, in order, read straight from a database (tests, tools)."""
    out = []
    for first, blob, bodies in conn.execute("SELECT first, ends, bodies FROM outbox_segments s JOIN outbox_bodies b "
                                            "ON b.seq = s.seq ORDER BY s.seq"):
        ends = _ends(blob, len(bodies))
        for i in range(first, len(ends)):
            start = ends[i - 1] if i else 0
            if ends[i] != start:
                out.append(bodies[start:ends[i]])
    return out
