"""The outbox on disk: segments and their SQL, as plain functions over one database connection.

A segment is one listener's events of one commit group, stored as one row: `outbox_segments` holds
what changes (`first` undelivered index, `events`/`size` still waiting), `outbox_bodies` what does
not (the envelopes concatenated, `ends` their uint32 little-endian end offsets, NULL for one event,
and `checksum`, the crc32 of both; schema in `listenerd.store.MIGRATIONS`, versions 3 and 5). A
delivered event past `first` becomes a zero-length tombstone, so every event keeps its index and a
`Row.seq` names it for good. A lease checks a segment's checksum before it hands out any of its
events: a damaged page must never reach the engine as envelopes with NUL bytes in them.

This module is where a second store backend (PostgreSQL) plugs in. Nothing here knows about the
event loop, the commit groups or the bounds (`outbox.py`), so a backend provides the same functions
over its own connection, with the same results, and the outbox above them does not change:

- `totals(conn)`: waiting events, their bytes, the oldest segment's receipt time (at start);
- `insert(conn, rows, checkpoints)`: a commit group's `segment_row`s plus its checkpoints, in the
  caller's transaction, seqs never reused;
- `lease(conn, limit, after, damaged, verified)`: waiting events as `Row`s, in commit order, after a
  seq, skipping (and naming in `damaged`) a segment that fails its checksum (`verified`: the segment
  the previous lease checked, whose unchanged bytes need no second checksum);
- `remove(conn, rows)`: delete delivered events, say which were still there;
- `stored_envelopes(conn)`: every waiting envelope (tests and tools read a stopped daemon's store);
- `relaxed(conn, fn, restore)`: an ack's transaction without the per-commit sync (PostgreSQL:
  `SET LOCAL synchronous_commit = off`).

Dead letters keep their own SQL next to them (`dead_letters.py`: `refuse`, `set_aside`, `select`,
`requeue`, `discard`); a backend provides those too.
"""

from __future__ import annotations

import sqlite3
import sys
import zlib
from array import array
from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, NamedTuple

import orjson

from listenerd.store import in_transaction, put_checkpoint
from listenerd.store_pg import dialect

SHIFT = 20  # a Row's seq is (segment seq << SHIFT) | index of the event in its segment
MASK = (1 << SHIFT) - 1  # so a segment holds at most MASK events
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


SegmentRow = tuple[str, str, float, int, int, bytes | None, bytes]  # what `insert` stores for one segment


def waiting(conn: sqlite3.Connection, tenant_id: str, listener_ids: Sequence[str]) -> tuple[int, int]:
    """Waiting events and their bytes of some of a tenant's listeners (a cluster node adopting a group)."""
    if not listener_ids:
        return 0, 0
    return conn.execute("SELECT coalesce(sum(events), 0), coalesce(sum(size), 0) FROM outbox_segments WHERE "
                        "tenant_id = ? AND listener_id IN (SELECT CAST(value AS TEXT) FROM json_each(?))",
                        (tenant_id, orjson.dumps(list(listener_ids)))).fetchone()


def totals(conn: sqlite3.Connection) -> tuple[int, int, float | None]:
    """Waiting events, their bytes, and the receipt time of the oldest segment (None when empty)."""
    return conn.execute(
        "SELECT coalesce(sum(events), 0), coalesce(sum(size), 0), "
        "(SELECT received_at FROM outbox_segments ORDER BY seq LIMIT 1) FROM outbox_segments").fetchone()


def segment_row(tenant_id: str, listener_id: str, received: float, bodies: Sequence[bytes]) -> SegmentRow:
    """One listener's envelopes of one commit, in append order, as `insert` stores them."""
    blob = b"".join(bodies)
    ends = None if len(bodies) == 1 else _ends_bytes(array("I", accumulate(map(len, bodies))))
    return (tenant_id, listener_id, received, len(bodies), len(blob), ends, blob)


def insert(conn: sqlite3.Connection, rows: Sequence[SegmentRow], checkpoints: Sequence[tuple[str, str, str]]) -> None:
    """Insert segments (one row per listener of a commit group) and their listeners' checkpoints.

    Multi-row INSERTs, seqs numbered here from the AUTOINCREMENT counter (never reused): every
    statement costs the store thread a GIL hand-off with the event loop, so a commit is a few
    statements whatever the number of listeners in it.
    """
    if rows:
        if dialect(conn) == "postgresql":  # a shared sequence (other writers): one round trip for all seqs
            numbers = [r[0] for r in conn.execute("SELECT nextval(pg_get_serial_sequence('outbox_segments', 'seq')) "
                                                  "FROM generate_series(1, ?)", (len(rows),)).fetchall()]
        else:
            last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox_segments'").fetchone()
            first = (last[0] if last else 0) + 1
            numbers = range(first, first + len(rows))
        i = 0
        while i < len(rows):
            size = _INSERT_CHUNK
            while size > len(rows) - i:
                size //= 2
            chunk = rows[i:i + size]
            seqs = numbers[i:i + size]
            conn.execute(_insert_sql("outbox_segments (seq, tenant_id, listener_id, received_at, total, events, size)",
                                     7, size),
                         [v for s, r in zip(seqs, chunk, strict=True) for v in (s, r[0], r[1], r[2], r[3], r[3], r[4])])
            conn.execute(_insert_sql("outbox_bodies (seq, ends, bodies, checksum)", 4, size),
                         [v for s, r in zip(seqs, chunk, strict=True) for v in (s, r[5], r[6], checksum(r[5], r[6]))])
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


def checksum(ends: bytes | None, bodies: bytes) -> int:
    """A segment's crc32: of its bodies, then of its end offsets (C speed, about 55 ns per 220-byte event)."""
    crc = zlib.crc32(bodies)
    return crc if ends is None else zlib.crc32(ends, crc)


def lease(conn: sqlite3.Connection, limit: int, after: int, damaged: list[int] | None = None,
          verified: dict[int, tuple[bytes | None, bytes]] | None = None,
          keep: Callable[[str, str], bool] | None = None) -> list[Row]:
    """Split waiting segments into Rows, in order, skipping delivered events, until `limit`.

    A segment whose stored bytes fail their checksum gives no Row: its seq goes to `damaged` for
    the caller to set aside (`dead_letters.set_aside`), and the lease carries on past it. A
    checksum of NULL (a segment stored before schema 5) is not checked.

    `verified` (the caller's, kept between leases) holds the last segment this lease checked: a
    batch usually ends inside a segment, and the next lease reads it again; bytes equal to those
    already checked need no second crc32 (a comparison costs a fraction of it, and the store thread
    bounds delivery). Bytes that differ in any way are checked again.

    `keep(tenant, listener)` (a cluster node: the listeners of the groups it holds) leaves out the
    other nodes' segments.
    """
    out: list[Row] = []
    if limit <= 0:
        return out
    last_checked: tuple[int, bytes | None, bytes] | None = None
    after_segment, after_index = after >> SHIFT, after & MASK
    cursor = _waiting_segments(conn, after_segment, limit)
    try:
        for seq, tenant_id, listener_id, received, first, total, events, blob, bodies, check in cursor:
            start = max(first, after_index + 1) if after and seq == after_segment else first
            if start >= total or (keep is not None and not keep(tenant_id, listener_id)):
                continue
            if check is not None:
                known = verified.get(seq) if verified is not None else None
                unchanged = known is not None and known[0] == blob and known[1] == bodies
                if not unchanged and checksum(blob, bodies) != check:
                    if damaged is not None:
                        damaged.append(seq)
                    continue
                last_checked = (seq, blob, bodies)
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
        if verified is not None and last_checked is not None:
            verified.clear()
            verified[last_checked[0]] = last_checked[1:]


_LEASE_SQL = ("SELECT s.seq, tenant_id, listener_id, received_at, first, total, events, ends, bodies, checksum "
              "FROM outbox_segments s JOIN outbox_bodies b ON b.seq = s.seq WHERE s.seq >= ? ORDER BY s.seq")


class _Pages:
    """Waiting segments from a seq on, a page at a time (PostgreSQL: a client-side cursor would fetch the
    whole outbox for every lease; SQLite's steps lazily and stops where the lease does)."""

    def __init__(self, conn: Any, after_segment: int, page: int):
        self.conn, self.next_seq, self.page = conn, after_segment, page

    def __iter__(self) -> Any:
        while True:
            rows = self.conn.execute(_LEASE_SQL + " LIMIT ?", (self.next_seq, self.page)).fetchall()
            yield from rows
            if len(rows) < self.page:
                return
            self.next_seq = rows[-1][0] + 1
            self.page = min(self.page * 4, 4096)

    def close(self) -> None:
        pass


def _waiting_segments(conn: Any, after_segment: int, limit: int) -> Any:
    if dialect(conn) == "postgresql":
        return _Pages(conn, after_segment, 8)  # segments, not events: a segment often holds hundreds
    return conn.execute(_LEASE_SQL, (after_segment,))


def remove(conn: sqlite3.Connection, rows: Sequence[Row]) -> set[int] | None:
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
            by_segment[seq >> SHIFT] = [seq & MASK]
        else:
            indexes.append(seq & MASK)
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
        bodies, check = conn.execute("SELECT bodies, checksum FROM outbox_bodies WHERE seq = ?",
                                     (segment,)).fetchone()
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
        new_blob, new_bodies = _ends_bytes(new_ends), b"".join(kept)
        if check is not None:  # rewritten from bytes that were already damaged: keep a checksum that fails
            check = checksum(new_blob, new_bodies) if check == checksum(blob, bodies) else -1
        conn.execute("UPDATE outbox_bodies SET ends = ?, bodies = ?, checksum = ? WHERE seq = ?",
                     (new_blob, new_bodies, check, segment))
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


def split(ends: bytes | None, bodies: bytes, first: int, total: int) -> list[bytes]:
    """A segment's waiting events from `first` on, as stored, however damaged: when its end offsets
    no longer describe its bodies, the whole of its bodies is one piece."""
    if first >= total:
        return []
    if ends is None:
        return [bodies]
    offsets = _ends(ends, len(bodies)) if len(ends) == 4 * total else None
    if offsets is None or offsets[-1] != len(bodies) or any(b < a for a, b in zip(offsets, offsets[1:], strict=False)):
        return [bodies]
    start = offsets[first - 1] if first else 0
    return [bodies[a:b] for a, b in zip([start, *offsets[first:-1]], offsets[first:], strict=True) if b != a]


def relaxed(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], Any], restore: str) -> Any:
    """Run one transaction without the per-commit fsync of FULL, then set `restore` again.

    Used for acks only: losing an ack to a power cut means the engine sees those events again
    (at least once still holds), and the WAL is sequential, so the next FULL commit syncs this one
    too. Appends, checkpoints and dead letters keep their fsync.
    """
    if dialect(conn) == "postgresql":  # the same trade, for this transaction only
        return in_transaction(conn, lambda c: (c.execute("SET LOCAL synchronous_commit = off"), fn(c))[1])
    conn.execute("PRAGMA synchronous=NORMAL")
    try:
        return in_transaction(conn, fn)
    finally:
        conn.execute(f"PRAGMA synchronous={restore}")


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
