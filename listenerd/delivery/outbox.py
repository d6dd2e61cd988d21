"""The durable outbox: every event is committed here before it counts as received.

Appends from all listeners are queued and group-committed by one writer task: while one
transaction is on disk the next batch gathers, so a busy daemon commits thousands of events per
transaction and an idle one commits each event at once. A Salesforce checkpoint rides in the same
transaction as the events before it, so a crash can never leave the checkpoint ahead of the
outbox. The outbox is bounded (events and bytes); at the bound `append` waits, which stops the
calling source from reading its socket (back-pressure), and nothing is dropped. Events not yet
committed are bounded too, in bytes (`UNCOMMITTED_MAX_BYTES`): a store that cannot commit (disk
full) or falls behind holds no more than that in memory, and `append` waits the same way. Every
store failure goes to `health` (metric, one log line per episode, statuses, readiness).

Ages and deadlines use `ids.receipt_clock()`, not the wall clock (why: there).

How the events lie on disk is `segments.py`; ids and timestamps are `ids.py`; refused batches go
to `dead_letters.py`. This module is the in-memory side: commit groups, bounds, lease and ack.
(Over 400 lines because those four share one set of counters: depth, bytes and uncommitted bytes
change together under the event loop, and splitting them would hand those counters across modules.)
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from listenerd.backoff import backoff_delay
from listenerd.delivery import dead_letters, segments
from listenerd.delivery.ids import age, event_id, receipt_clock, received_at
from listenerd.delivery.segments import MASK, Row
from listenerd.store import Store, in_transaction
from listenerd.store_health import StoreHealth

if TYPE_CHECKING:
    from listenerd.observability import Metrics

log = structlog.get_logger("listenerd.outbox")


GROUP_BYTES = 8 << 20  # a commit group (so a segment, whose offsets are uint32) stays well below 4 GiB
UNCOMMITTED_MAX_BYTES = 4 * GROUP_BYTES  # memory holds at most this much waiting for a commit (then sources pause)
OVERSIZED = 413  # a dead letter's status code when listenerd set an event aside as too large to send
OVERSIZED_KEEP = 64 * 1024  # bytes of an oversized envelope kept for inspection
_SETTLE_TIMEOUT = 1.0  # seconds a shutdown waits for a commit under way to end, to count what it wrote


class _Segment:
    """One listener's events in one commit group: envelope bytes in append order (one segment on disk)."""

    __slots__ = ("tenant_id", "listener_id", "received", "bodies", "checkpoint")

    def __init__(self, tenant_id: str, listener_id: str, received: float):
        self.tenant_id = tenant_id
        self.listener_id = listener_id
        self.received = received
        self.bodies: list[bytes] = []
        self.checkpoint: str | None = None


class Fenced(Exception):
    """A commit held events of listeners whose groups this node no longer holds (`Outbox.fence`)."""

    def __init__(self, listeners: set[tuple[str, str]]):
        super().__init__(f"{len(listeners)} listener(s) fenced")
        self.listeners = listeners


class _Lane:
    """What append needs per listener, looked up once: the envelope's bytes between id and receipt time."""

    __slots__ = ("prefix", "listener")

    def __init__(self, prefix: bytes, listener: tuple[str, str]):
        self.prefix = prefix
        self.listener = listener  # (tenant, listener): a commit group's key for this listener's segment


class _Group:
    """What one transaction commits: a segment per listener, and who to tell once it is on disk."""

    __slots__ = ("seq", "segments", "events", "bytes", "sealed", "callbacks", "counters", "on_disk")

    def __init__(self, seq: int) -> None:
        self.seq = seq  # groups are numbered in append order: `flush` waits for the newest one at its call
        self.segments: dict[tuple[str, str], _Segment] = {}
        self.events = 0
        self.bytes = 0
        self.sealed = False  # the writer has taken it (or it is full): appends open the next group
        self.callbacks: list[tuple[Callable[[dict[str, Any]], None], bytes]] = []
        self.counters: dict[Callable[[int], None], int] = {}
        self.on_disk = False  # set on the store thread once its COMMIT returned: what a shutdown may not count lost


@dataclass
class _Usage:
    events: int = 0
    bytes: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class Outbox:
    def __init__(self, store: Store, *, max_events: int, max_bytes: int, metrics: Metrics | None = None,
                 max_batch: int = 1000, health: StoreHealth | None = None, max_event_bytes: int = 1 << 20):
        if not 0 < max_batch <= MASK:
            raise ValueError(f"max_batch must be 1..{MASK}")
        self.store = store
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.max_event_bytes = max_event_bytes  # a larger envelope is set aside (`set_aside_oversized`), never sent
        self.metrics = metrics
        self.health = health or StoreHealth(metrics, store.path)
        self.max_batch = max_batch  # events per transaction (so per segment at most)
        self._groups: list[_Group] = []  # oldest first; only the last one, unsealed, takes appends
        self._queued = 0  # events appended, not yet committed
        self._queued_bytes = 0
        self.never_written = 0  # events given up at a shutdown while the store could not commit them
        self._wake = asyncio.Event()
        self._opened = 0  # seq of the newest group
        self._landed = 0  # seq of the newest group committed (or given up at close): all before it landed too
        self._landing = asyncio.Event()  # set, then replaced, as each group lands: what `flush` waits on
        self._usage = _Usage()
        self._writer: asyncio.Task[None] | None = None
        self._closed = False
        self.committed = asyncio.Event()  # set after each commit; the forwarder waits on it
        self.commit_failures = 0
        self._head_received: float | None = None  # receipt_clock() stamp of the oldest waiting event
        self._lanes: dict[tuple[str, str, str], _Lane] = {}  # per listener: its envelope prefix
        self._verified: dict[int, tuple[bytes | None, bytes]] = {}  # the segment the last lease checked
        # a cluster node (cluster.py): `fence(conn, listeners)` names, inside a commit's transaction, the
        # listeners whose groups this node no longer holds; `keep(tenant, listener)` what its leases hand out
        self.fence: Callable[[Any, set[tuple[str, str]]], set[tuple[str, str]]] | None = None
        self.keep: Callable[[str, str], bool] | None = None
        self.fenced = 0  # events refused by the fence: never committed
        if metrics is not None:
            metrics.outbox_oldest_age.set_function(self.oldest_age)

    async def start(self, count_waiting: bool = True) -> None:
        """Start the writer; count what the store holds (a cluster node counts only its groups', as it takes
        them: `count_waiting=False`, then `adopt`)."""
        events, size, head = await self.store.run(segments.totals) if count_waiting else (0, 0, None)
        self._usage.events, self._usage.bytes = events, size
        if events:
            self._head_received = head
        self._publish_usage()
        self._writer = asyncio.create_task(self._write_loop(), name="outbox-writer")

    async def close(self, timeout: float | None = None) -> None:
        """Commit what is queued, then stop the writer.

        With `timeout`, give up waiting after that long (a store that keeps failing must not hang
        shutdown): what is still queued was never committed, so it never counted as received and no
        checkpoint moved past it. Those events are counted in `never_written` and logged, and leave
        `depth`, which so stays what the store holds.
        """
        self._closed = True
        try:
            await asyncio.wait_for(self.flush(), timeout)
        except TimeoutError:
            pass
        if self._writer:
            self._writer.cancel()
            try:
                await self._writer
            except asyncio.CancelledError:
                pass
        if self._groups:
            with contextlib.suppress(Exception):  # a commit under way on the store thread ends (and says so) first
                await asyncio.wait_for(self.store.run(lambda c: None), _SETTLE_TIMEOUT)
            lost = [g for g in self._groups if not g.on_disk]
            self.never_written = sum(g.events for g in lost)
            self._usage.events -= self.never_written
            self._usage.bytes -= sum(g.bytes for g in lost)
            if self.never_written:
                log.error("the store could not commit before shutdown: events held only in memory were never "
                          "written (they never counted as received; no checkpoint moved past them)",
                          events=self.never_written, error=self.health.problem)
            self._groups.clear()
            self._queued = self._queued_bytes = 0
            self._land(self._opened)
            self._publish_usage()

    # -- appending

    async def append(self, tenant_id: str, listener_id: str, source: str, event: dict[str, Any], *,
                     key: str | None = None, checkpoint: str | None = None,
                     on_commit: Callable[[dict[str, Any]], None] | None = None,
                     on_wait: Callable[[bool], None] | None = None,
                     on_commit_count: Callable[[int], None] | None = None) -> bool:
        """Queue one event; it counts as received once its group is committed.

        False when its envelope is larger than `max_event_bytes`: then it is set aside in its listener's
        dead letters instead (`set_aside_oversized`), and its checkpoint does not move.

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
        if len(body) > self.max_event_bytes:
            await self.set_aside_oversized(tenant_id, listener_id, len(body), body[:OVERSIZED_KEEP])
            return False
        usage = self._usage
        queued = self._queued_bytes
        if (usage.events >= self.max_events or (usage.events and usage.bytes + len(body) > self.max_bytes)
                or (queued and queued + len(body) > UNCOMMITTED_MAX_BYTES)):
            await self._wait_for_room(len(body), on_wait)
        if usage.events == 0:
            self._head_received = receipt_clock()
        usage.events += 1
        usage.bytes += len(body)
        groups = self._groups
        if groups and not groups[-1].sealed:
            group = groups[-1]
        else:
            self._opened += 1
            group = _Group(self._opened)
            groups.append(group)
        segment = group.segments.get(lane.listener)
        if segment is None:
            segment = group.segments[lane.listener] = _Segment(tenant_id, listener_id, receipt_clock())
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
        self._queued_bytes += len(body)
        self._wake.set()
        return True

    async def set_aside_oversized(self, tenant_id: str, listener_id: str, size: int, head: bytes | None) -> None:
        """Keep an event too large to send in its listener's dead letters: counted, logged, never sent.

        What is kept is a JSON string (the envelope's first `OVERSIZED_KEEP` bytes, or a note when the
        mapping was stopped before the event was built), so a retry of that dead letter never sends it,
        and it is that listener's own entry: no other listener's events are touched.
        """
        if self.metrics:
            self.metrics.oversized_events.inc()
        log.warning("event larger than engine.max-event-bytes: set aside in the listener's dead letters, not sent",
                    tenant=tenant_id, listener=listener_id, bytes=size, limit=self.max_event_bytes)
        kept = (head.decode("utf-8", "replace") if head is not None else
                f"(not built: the mapping's output passed {size} bytes and was stopped there)")
        response = (f"listenerd: the event is {'at least ' if head is None else ''}{size} bytes, above "
                    f"engine.max-event-bytes ({self.max_event_bytes}); set aside, never sent")
        try:
            await self.store.transaction(lambda c: dead_letters.keep(c, tenant_id, listener_id, OVERSIZED, response,
                                                                     time.time(), [orjson.dumps(kept)]))
        except sqlite3.Error as exc:
            self.health.failed("dead-letter", exc)
            log.error("an oversized event could not be set aside; it is dropped", tenant=tenant_id,
                      listener=listener_id, error=str(exc))
            return
        self.health.succeeded("dead-letter")

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
        return (usage.events >= self.max_events or (usage.events > 0 and usage.bytes + size > self.max_bytes)
                or (self._queued_bytes > 0 and self._queued_bytes + size > UNCOMMITTED_MAX_BYTES))

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

    def room(self) -> int:
        """Events the outbox takes before its event bound (0 at any bound): what a pull-based source may ask for."""
        return 0 if self._full(0) else self.max_events - self._usage.events

    async def wait_for_room(self, on_wait: Callable[[bool], None] | None = None) -> None:
        """Return once the outbox is below its bounds (at once when it is)."""
        if self._full(0):
            await self._wait_for_room(0, on_wait)

    async def flush(self) -> None:
        """Wait until everything appended before this call is committed.

        Not until the writer is idle: under steady appends from other listeners it may never be, and a
        source that flushes before reading its resume point must not wait on everyone else's traffic."""
        if not self._groups:
            return
        target = self._groups[-1].seq
        while self._landed < target:
            await self._landing.wait()

    def _land(self, seq: int) -> None:
        """Groups up to `seq` are on disk (or given up): wake the flushes waiting for them."""
        self._landed = seq
        self._landing.set()
        self._landing = asyncio.Event()

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._groups:
                group = self._groups[0]
                group.sealed = True  # appends made while it commits go to the next group
                await self._commit(group)
                del self._groups[0]
                self._queued -= group.events
                self._queued_bytes -= group.bytes
                self._usage.changed.set()  # a source held at the uncommitted bound goes on
                for callback, count in group.counters.items():
                    callback(count)
                for callback, body in group.callbacks:
                    callback(orjson.loads(body))
                self.committed.set()
                self._publish_usage()
                self._land(group.seq)

    async def _commit(self, group: _Group) -> None:
        """Commit one group, retrying until it is on disk.

        A failed transaction (disk full, I/O error) rolls back events and checkpoints together, so
        nothing counts as received and no checkpoint moves past it; the group stays queued and is
        retried with back-off instead of being dropped, and sources pause once the queued events
        reach `UNCOMMITTED_MAX_BYTES` (or the outbox bounds).
        """
        attempt = 0
        rows = [segments.segment_row(s.tenant_id, s.listener_id, s.received, s.bodies)
                for s in group.segments.values()]
        checkpoints = [(s.tenant_id, s.listener_id, s.checkpoint) for s in group.segments.values()
                       if s.checkpoint is not None]

        def commit(conn: sqlite3.Connection) -> None:
            def write(c: sqlite3.Connection) -> None:
                if self.fence is not None:  # a cluster node: only for the groups it still holds, checked here
                    refused = self.fence(c, {(r[0], r[1]) for r in rows})
                    if refused:
                        raise Fenced(refused)
                segments.insert(c, rows, checkpoints)

            in_transaction(conn, write)
            group.on_disk = True

        while True:
            try:
                await self.store.run(commit)
                self.health.succeeded("commit")
                return
            except Fenced as fenced:
                self._drop_fenced(group, fenced.listeners)
                rows = [segments.segment_row(s.tenant_id, s.listener_id, s.received, s.bodies)
                        for s in group.segments.values()]
                checkpoints = [(s.tenant_id, s.listener_id, s.checkpoint) for s in group.segments.values()
                               if s.checkpoint is not None]
                if not rows:
                    return
            except sqlite3.Error as exc:
                attempt += 1
                self.commit_failures += 1
                self.health.failed("commit", exc)
                self._publish_usage()  # the depth gauge counts what memory holds meanwhile: it must not freeze
                await asyncio.sleep(backoff_delay(attempt, 0.05, 5.0))

    def _drop_fenced(self, group: _Group, listeners: set[tuple[str, str]]) -> None:
        """Take the events of groups this node no longer holds out of a commit: never written, never counted
        as received, their checkpoints not moved (the new owner resumes from the stored one)."""
        dropped = [group.segments.pop(key) for key in listeners if key in group.segments]
        bodies = {id(b) for segment in dropped for b in segment.bodies}
        events, size = sum(len(s.bodies) for s in dropped), sum(len(b) for s in dropped for b in s.bodies)
        group.callbacks = [(c, b) for c, b in group.callbacks if id(b) not in bodies]
        group.events -= events
        group.bytes -= size
        self._queued -= events
        self._queued_bytes -= size
        self.fenced += events
        self._release_counts(events, size)
        log.error("events not committed: this node no longer holds their connection group (fenced)",
                  listeners=sorted(f"{t}/{lid}" for t, lid in listeners), events=events)

    def adopt(self, events: int, size: int) -> None:
        """Count a group's waiting events as this outbox's (a cluster node took the group over)."""
        self._usage.events += events
        self._usage.bytes += size
        if events and self._head_received is None:
            self._head_received = receipt_clock()
        self._usage.changed.set()
        self._publish_usage()

    def disown(self, events: int, size: int) -> None:
        """Stop counting a group's waiting events (a cluster node handed the group over)."""
        self._release_counts(min(events, self._usage.events), min(size, self._usage.bytes))

    # -- consuming (the forwarder)

    async def lease(self, limit: int, after: int = 0) -> list[Row]:
        """Up to `limit` waiting events in commit order, after the event whose seq is `after`.

        A segment that fails its checksum is never leased: it goes to the dead letters here.
        """
        damaged: list[int] = []
        try:
            keep = self.keep
            if keep is None:
                rows = await self.store.run(lambda c: segments.lease(c, limit, after, damaged, verified=self._verified))
            else:  # a cluster node: its groups' segments only
                rows = await self.store.run(lambda c: segments.lease(c, limit, after, damaged, verified=self._verified,
                                                                     keep=keep))
        except sqlite3.Error as exc:
            self.health.failed("lease", exc)
            raise
        self.health.succeeded("lease")
        for seq in damaged:
            await self._set_aside(seq)
        if rows and after == 0:
            self._head_received = rows[0].received
        return rows

    async def _set_aside(self, seq: int) -> None:
        """Move a damaged segment to the dead letters and out of the counts; if that fails, a later lease retries."""
        try:
            held = await self.store.transaction(lambda c: dead_letters.set_aside(c, seq, time.time()))
        except sqlite3.Error as exc:
            self.health.failed("dead-letter", exc)
            log.error("a damaged stored segment could not be set aside; it is skipped", seq=seq, error=str(exc))
            return
        self.health.succeeded("dead-letter")
        if held is None:
            return
        events, size = held
        log.error("stored segment failed its checksum: the store is damaged; its events are in the dead letters "
                  "(status code 0), not sent", seq=seq, events=events)
        if self.metrics:
            self.metrics.damaged_events.inc(events)
        self._release_counts(events, size)

    async def ack(self, rows: list[Row]) -> list[Row]:
        """Delete delivered rows; returns those that were still there (a row sent twice is acked once)."""
        try:
            if self.store.synchronous == "FULL":
                gone = await self.store.run(lambda c: segments.relaxed(c, lambda c: segments.remove(c, rows), "FULL"))
            else:
                gone = await self.store.transaction(lambda c: segments.remove(c, rows))
        except sqlite3.Error as exc:
            self.health.failed("ack", exc)
            raise
        self.health.succeeded("ack")
        if gone is not None:
            rows = [r for r in rows if r.seq in gone]
        self._release(rows)
        return rows

    async def dead_letter(self, rows: list[Row], status_code: int, response: str) -> None:
        """Move refused rows to the dead letters, one entry per listener, in one transaction."""
        now = time.time()
        try:
            gone = await self.store.transaction(lambda c: dead_letters.refuse(c, rows, status_code, response, now))
        except sqlite3.Error as exc:
            self.health.failed("dead-letter", exc)
            raise
        self.health.succeeded("dead-letter")
        self._release(rows if gone is None else [r for r in rows if r.seq in gone])

    def requeued(self, events: int, size: int, received: float) -> None:
        """Count events put back by a dead-letter retry (already committed) and wake the forwarder."""
        if self._usage.events == 0 and events:
            self._head_received = received
        self._usage.events += events
        self._usage.bytes += size
        self._publish_usage()
        self.committed.set()

    def _release(self, rows: list[Row]) -> None:
        self._release_counts(len(rows), sum([len(r.body) for r in rows]))

    def _release_counts(self, events: int, size: int) -> None:
        # never below 0: a cluster node also forwards events it never counted (a deleted listener's)
        self._usage.events = max(0, self._usage.events - events)
        self._usage.bytes = max(0, self._usage.bytes - size)
        if self._usage.events <= 0:
            self._head_received = None
        self._usage.changed.set()
        self._publish_usage()

    def _publish_usage(self) -> None:
        if self.metrics:
            self.metrics.outbox_depth.set(self._usage.events)
            self.metrics.outbox_bytes.set(self._usage.bytes)

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
        group's span more than its oldest undelivered event; on `receipt_clock()`, so a wall clock step
        does not move it."""
        head = self._head_received
        return age(head) if head is not None and self._usage.events > 0 else 0.0
