"""Dead letters: batches the engine refused, kept whole for an operator to retry or discard.

The forwarder refuses rows through `Outbox.dead_letter`, which runs `refuse` here in one transaction
with their removal from the outbox. Everything else (list, get, retry, discard) is `DeadLetters`,
which the daemon owns and the API calls; it answers plain `DeadLetter`s (the JSON shape is the
API's). A retry goes back into the outbox with the same envelope bytes, so the same ids, and tells
the outbox what it added (`Outbox.requeued`) so depth, bytes and the forwarder follow.
The SQL functions are plain functions over a connection, like `segments.py`: a second store backend
provides them too.

A stored segment that fails its checksum is set aside here too (`set_aside`), never sent: status
code `DAMAGED` (0, no engine answered) and a response saying so, its events as read from the disk.
An event whose bytes are no longer a JSON object is kept as a JSON string of those bytes, so the
dead letter still reads as JSON; a retry sends only the intact envelopes and keeps the rest.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from listenerd.delivery.ids import received_epoch
from listenerd.delivery.segments import MASK, Row, insert, remove, segment_row, split
from listenerd.store import Store

DAMAGED = 0  # a dead letter's status code when listenerd set it aside: the store, not the engine, refused it


class Requeued(Protocol):
    """What a retry tells the outbox (`Outbox.requeued`): events and bytes added, the oldest receipt time."""

    def requeued(self, events: int, size: int, received: float) -> None: ...


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One refused batch of one listener: `events` is the JSON array of its envelopes, as sent."""

    id: int
    listener_id: str
    status_code: int
    response: str
    failed_at: float
    events: bytes


class DeadLetters:
    """The operator's side of dead letters, over the store; `outbox` is told what a retry queued."""

    def __init__(self, store: Store, outbox: Requeued):
        self.store = store
        self.outbox = outbox

    async def of_tenant(self, tenant_id: str, listener_id: str | None = None, *, after: int | None = None,
                        limit: int | None = None, status_code: int | None = None,
                        listener_ids: Sequence[str] | None = None) -> list[DeadLetter]:
        """A tenant's dead letters (or one listener's, some listeners', or those of one status code), oldest
        first: with `after` and `limit`, up to `limit` of those with a greater id (a page, read through the index)."""
        return await self.store.run(lambda c: select(c, tenant_id, listener_id, after=after, limit=limit,
                                                     status_code=status_code, listener_ids=listener_ids))

    async def get(self, tenant_id: str, dead_letter_id: int) -> DeadLetter | None:
        letters = await self.store.run(lambda c: select(c, tenant_id, dead_letter_id=dead_letter_id))
        return letters[0] if letters else None

    async def requeue(self, tenant_id: str, dead_letter_id: int) -> int | None:
        """Put a dead letter's events back into the outbox (same ids), in one transaction.

        Returns how many events were queued, or None when there is no such dead letter. The events
        go to the back of the outbox: an operator retry is a new delivery, after what is waiting.
        The bound is not applied: the operator asked for it, and these events were counted before.
        """
        moved = await self.store.transaction(lambda c: requeue(c, tenant_id, dead_letter_id))
        if moved is None:
            return None
        count, size, received = moved
        self.outbox.requeued(count, size, received)
        return count

    async def discard(self, tenant_id: str, dead_letter_id: int) -> bool:
        return await self.store.transaction(lambda c: discard(c, tenant_id, dead_letter_id))


# -- SQL


def refuse(conn: sqlite3.Connection, rows: Sequence[Row], status_code: int, response: str,
           failed_at: float) -> set[int] | None:
    """Move refused rows from the outbox to dead letters, one entry per listener; `remove`'s answer.

    A row acked meanwhile (sent twice) is gone from the outbox and was not refused: it is left out.
    """
    by_listener: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        by_listener.setdefault((row.tenant_id, row.listener_id), []).append(row)
    gone = remove(conn, rows)
    for (tenant_id, listener_id), group in by_listener.items():
        group = [r for r in group if gone is None or r.seq in gone]
        if not group:
            continue
        events = b"[" + b",".join(r.body for r in group) + b"]"
        conn.execute("INSERT INTO dead_letters (tenant_id, listener_id, status_code, response, failed_at, "
                     "events) VALUES (?, ?, ?, ?, ?, ?)",
                     (tenant_id, listener_id, status_code, response, failed_at, events))
    return gone


def keep(conn: sqlite3.Connection, tenant_id: str, listener_id: str, status_code: int, response: str,
         failed_at: float, pieces: Sequence[bytes]) -> None:
    """A dead letter of one listener made by listenerd itself (never sent): `pieces` are JSON values."""
    conn.execute("INSERT INTO dead_letters (tenant_id, listener_id, status_code, response, failed_at, events) "
                 "VALUES (?, ?, ?, ?, ?, ?)", (tenant_id, listener_id, status_code, response, failed_at,
                                               b"[" + b",".join(pieces) + b"]"))


def set_aside(conn: sqlite3.Connection, seq: int, failed_at: float) -> tuple[int, int] | None:
    """Move a segment that failed its checksum to the dead letters, its waiting events as read.

    Returns the events and bytes it held in the outbox's counts (None when it is gone already).
    """
    row = conn.execute("SELECT tenant_id, listener_id, first, total, events, size, ends, bodies FROM outbox_segments s "
                       "JOIN outbox_bodies b ON b.seq = s.seq WHERE s.seq = ?", (seq,)).fetchone()
    if row is None:
        return None
    tenant_id, listener_id, first, total, events, size, ends, bodies = row
    pieces = split(ends, bodies, first, total)
    envelopes = [piece if _is_object(piece) else orjson.dumps(piece.decode("utf-8", "backslashreplace"))
                 for piece in pieces]
    conn.execute("DELETE FROM outbox_segments WHERE seq = ?", (seq,))
    conn.execute("DELETE FROM outbox_bodies WHERE seq = ?", (seq,))
    conn.execute("INSERT INTO dead_letters (tenant_id, listener_id, status_code, response, failed_at, events) "
                 "VALUES (?, ?, ?, ?, ?, ?)",
                 (tenant_id, listener_id, DAMAGED, f"listenerd: stored segment failed its checksum (seq {seq}): the "
                  "store is damaged; events as read, a damaged one as a string", failed_at,
                  b"[" + b",".join(envelopes) + b"]"))
    return events, size


def _is_object(piece: bytes) -> bool:
    try:
        return isinstance(orjson.loads(piece), dict)
    except orjson.JSONDecodeError:
        return False


def select(conn: sqlite3.Connection, tenant_id: str, listener_id: str | None = None, *,
           dead_letter_id: int | None = None, after: int | None = None, limit: int | None = None,
           status_code: int | None = None, listener_ids: Sequence[str] | None = None) -> list[DeadLetter]:
    """A tenant's dead letters, oldest first, narrowed to one listener, some listeners, one id or one status
    code; with `after`/`limit`, a page of those above the id `after` (keyset on `dead_letters_tenant`)."""
    sql = "SELECT id, listener_id, status_code, response, failed_at, events FROM dead_letters WHERE tenant_id = ?"
    params: tuple[Any, ...] = (tenant_id,)
    if listener_id is not None:
        sql += " AND listener_id = ?"
        params += (listener_id,)
    if listener_ids is not None:
        sql += f" AND listener_id IN ({', '.join('?' * len(listener_ids))})"  # both backends' SQL; never empty
        params += tuple(listener_ids)
    if dead_letter_id is not None:
        sql += " AND id = ?"
        params += (dead_letter_id,)
    if status_code is not None:
        sql += " AND status_code = ?"
        params += (status_code,)
    if after is not None:
        sql += " AND id > ?"
        params += (after,)
    sql += " ORDER BY id"
    if limit is not None:
        sql += " LIMIT ?"
        params += (limit,)
    return [DeadLetter(*row) for row in conn.execute(sql, params)]


def requeue(conn: sqlite3.Connection, tenant_id: str, dead_letter_id: int) -> tuple[int, int, float] | None:
    """Move a dead letter's envelopes back into the outbox, unchanged; (events, bytes, receipt time
    of the first) or None when the tenant has no such dead letter."""
    row = conn.execute("SELECT listener_id, events FROM dead_letters WHERE tenant_id = ? AND id = ?",
                       (tenant_id, dead_letter_id)).fetchone()
    if row is None:
        return None
    listener_id, events = row
    envelopes = orjson.loads(events)
    damaged = [e for e in envelopes if not isinstance(e, dict)]  # bytes a damaged store gave: never sent
    envelopes = [e for e in envelopes if isinstance(e, dict)]
    by_listener: dict[str, list[dict[str, Any]]] = {}  # a dead letter is one listener's: kept general
    for envelope in envelopes:
        by_listener.setdefault(envelope.get("listener-id", listener_id), []).append(envelope)
    size = 0
    for lid, group in by_listener.items():
        for i in range(0, len(group), MASK):
            chunk = group[i:i + MASK]
            bodies = [orjson.dumps(e) for e in chunk]
            size += sum(len(b) for b in bodies)
            insert(conn, [segment_row(tenant_id, lid, _received(chunk[0]), bodies)], [])
    if damaged:
        conn.execute("UPDATE dead_letters SET events = ? WHERE id = ?", (orjson.dumps(damaged), dead_letter_id))
    else:
        conn.execute("DELETE FROM dead_letters WHERE id = ?", (dead_letter_id,))
    return len(envelopes), size, _received(envelopes[0]) if envelopes else time.time()


def discard(conn: sqlite3.Connection, tenant_id: str, dead_letter_id: int) -> bool:
    cursor = conn.execute("DELETE FROM dead_letters WHERE tenant_id = ? AND id = ?", (tenant_id, dead_letter_id))
    return cursor.rowcount > 0


def _received(envelope: dict[str, Any]) -> float:
    """An envelope's `received-at` in seconds (now, when it is missing or not ours)."""
    stamp = envelope.get("received-at")
    if not stamp:
        return time.time()
    try:
        return received_epoch(stamp)
    except ValueError:
        return time.time()
