"""The segment format and its SQL (`listenerd.delivery.segments`) alone: a bare sqlite3 connection with
the store's schema, no Outbox, no event loop. What a second store backend must reproduce."""

import contextlib
import random
import sqlite3
import struct

import orjson
import pytest

from listenerd.delivery.segments import (
    MASK,
    SHIFT,
    Row,
    insert,
    lease,
    relaxed,
    remove,
    segment_row,
    stored_envelopes,
    totals,
)
from listenerd.store import MIGRATIONS, migrate


@pytest.fixture
def conn(tmp_path):
    with contextlib.closing(sqlite3.connect(tmp_path / "segments.db", isolation_level=None)) as conn:
        migrate(conn)
        yield conn


def body(listener_id, n):
    return orjson.dumps({"listener-id": listener_id, "n": n})


def put(conn, listener_id, numbers, received=1.0, checkpoint=None):
    """One commit of one listener: one segment."""
    insert(conn, [segment_row("t", listener_id, received, [body(listener_id, n) for n in numbers])],
           [("t", listener_id, checkpoint)] if checkpoint else [])


def ns(rows):
    return [orjson.loads(r.body)["n"] for r in rows]


def stored(conn):
    return conn.execute("SELECT s.seq, first, total, events, size, ends, bodies FROM outbox_segments s "
                        "JOIN outbox_bodies b ON b.seq = s.seq ORDER BY s.seq").fetchall()


def test_migration_3_runs_once_and_refuses_nothing_on_an_empty_outbox(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    assert migrate(conn) == len(MIGRATIONS)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"outbox_segments", "outbox_bodies"} <= tables and "outbox" not in tables
    assert migrate(conn) == len(MIGRATIONS)
    conn.close()


def test_a_segment_row_is_the_concatenated_bodies_and_their_little_endian_end_offsets(conn):
    bodies = [b'{"a":1}', b'{"bb":22}', b"{}"]
    assert segment_row("t", "L", 5.0, bodies) == ("t", "L", 5.0, 3, 18, struct.pack("<3I", 7, 16, 18), b"".join(bodies))
    assert segment_row("t", "L", 5.0, [b"{}"]) == ("t", "L", 5.0, 1, 2, None, b"{}")  # one event: no offsets
    put(conn, "L", range(3))
    put(conn, "M", [7])
    (seq, first, total, events, size, ends, blob), (_, _, _, _, _, one_ends, one_blob) = stored(conn)
    assert (first, total, events, size) == (0, 3, 3, len(blob)) and one_ends is None and one_blob == body("M", 7)
    assert struct.unpack("<3I", ends)[-1] == len(blob)


def test_insert_numbers_segments_in_order_and_writes_checkpoints_with_them(conn):
    for count in (1, 255, 256, 257, 777):  # across the multi-row INSERT chunk sizes
        insert(conn, [segment_row("t", f"L{i}", 1.0, [body(f"L{i}", i)]) for i in range(count)],
               [("t", "cp", str(count))])
    rows = lease(conn, 10_000, 0)
    assert len(rows) == 1 + 255 + 256 + 257 + 777
    assert [r.seq >> SHIFT for r in rows] == list(range(1, len(rows) + 1))
    assert conn.execute("SELECT value FROM checkpoints WHERE listener_id = 'cp'").fetchone() == ("777",)
    remove(conn, rows)
    put(conn, "L", [0])
    newer, = lease(conn, 10, 0)
    assert newer.seq >> SHIFT == len(rows) + 1, "a seq is never reused, even with the outbox empty"


def test_lease_splits_segments_into_rows_in_order_after_a_cursor_up_to_a_limit(conn):
    put(conn, "A", range(5), received=10.0)
    put(conn, "B", [100], received=11.0)
    put(conn, "A", range(5, 8), received=12.0)
    rows = lease(conn, 100, 0)
    assert ns(rows) == [0, 1, 2, 3, 4, 100, 5, 6, 7]
    assert all(type(r) is Row for r in rows)
    assert [(r.tenant_id, r.listener_id, r.received) for r in rows[4:7]] == [
        ("t", "A", 10.0), ("t", "B", 11.0), ("t", "A", 12.0)]
    assert [r.seq & MASK for r in rows] == [0, 1, 2, 3, 4, 0, 0, 1, 2]
    assert ns(lease(conn, 3, 0)) == [0, 1, 2]
    assert ns(lease(conn, 3, rows[1].seq)) == [2, 3, 4]  # inside a segment
    assert ns(lease(conn, 2, rows[4].seq)) == [100, 5]  # from a segment's last event on
    assert ns(lease(conn, 100, rows[5].seq)) == [5, 6, 7]  # after a one-event segment
    assert lease(conn, 100, rows[-1].seq) == [] and lease(conn, 0, 0) == []


def test_an_ack_of_a_whole_segment_deletes_it_and_of_its_head_moves_first(conn):
    put(conn, "A", range(6))
    put(conn, "B", range(2))
    rows = lease(conn, 100, 0)
    assert remove(conn, rows[6:]) is None  # all there: the usual answer
    assert remove(conn, rows[:2]) is None
    (seq, first, total, events, size, ends, blob), = stored(conn)
    assert (first, total, events) == (2, 6, 4) and size == sum(len(r.body) for r in rows[2:6])
    assert len(blob) == sum(len(r.body) for r in rows[:6]), "a delivered head keeps its bytes"
    assert ns(lease(conn, 100, 0)) == [2, 3, 4, 5]
    assert [r.seq for r in lease(conn, 100, 0)] == [r.seq for r in rows[2:6]]
    assert totals(conn) == (4, size, 1.0)
    assert remove(conn, rows[2:6]) is None
    assert stored(conn) == [] and totals(conn) == (0, 0, None)
    assert conn.execute("SELECT count(*) FROM outbox_bodies").fetchone() == (0,)


def test_an_ack_with_a_hole_leaves_zero_length_tombstones_and_stable_seqs(conn):
    put(conn, "A", range(8))
    rows = lease(conn, 100, 0)
    assert remove(conn, [rows[5], rows[3], rows[4]]) is None  # out of order, not a prefix
    (seq, first, total, events, size, ends, blob), = stored(conn)
    offsets = struct.unpack("<8I", ends)
    assert [offsets[i] - (offsets[i - 1] if i else 0) == 0 for i in range(8)] == [
        False, False, False, True, True, True, False, False]
    assert blob == b"".join(r.body for r in rows[:3] + rows[6:]) and (first, total, events) == (0, 8, 5)
    waiting = lease(conn, 100, 0)
    assert [r.seq for r in waiting] == [r.seq for r in rows[:3] + rows[6:]]
    assert ns(lease(conn, 100, rows[2].seq)) == [6, 7]  # a cursor on either side of the hole
    assert ns(lease(conn, 100, rows[4].seq)) == [6, 7]
    assert [orjson.loads(b)["n"] for b in stored_envelopes(conn)] == [0, 1, 2, 6, 7]
    assert remove(conn, rows[:3]) is None  # the head up to the hole: `first` moves past the tombstones
    assert stored(conn)[0][1:4] == (6, 8, 2)
    assert ns(lease(conn, 100, 0)) == [6, 7]
    assert remove(conn, rows[6:]) is None and stored(conn) == []


def test_rows_already_gone_are_reported_not_counted_twice(conn):
    put(conn, "A", range(4))
    put(conn, "B", [9])
    rows = lease(conn, 100, 0)
    assert remove(conn, rows[1:3]) is None
    # sent twice: its first ack landed; now some of the rows are gone, one segment entirely
    assert remove(conn, rows[4:]) is None
    assert remove(conn, rows) == {rows[0].seq, rows[3].seq}
    assert stored(conn) == []
    assert remove(conn, rows) == set()  # nothing left at all
    ghost = Row(((99 << SHIFT) | 3), "t", "A", b"{}", 1.0)  # a segment that never existed
    put(conn, "A", [5])
    live, = lease(conn, 10, 0)
    assert remove(conn, [ghost, live, live]) == {live.seq}  # the same row twice is deleted once


def test_relaxed_runs_one_transaction_without_full_sync_and_restores_it_even_on_failure(conn):
    conn.execute("PRAGMA synchronous=FULL")
    put(conn, "A", range(3))
    rows = lease(conn, 100, 0)
    seen = []
    assert relaxed(conn, lambda c: seen.append(c.execute("PRAGMA synchronous").fetchone()[0])
                   or remove(c, rows[:1]), "FULL") is None
    assert seen == [1] and conn.execute("PRAGMA synchronous").fetchone() == (2,)  # NORMAL inside, FULL after
    assert ns(lease(conn, 100, 0)) == [1, 2]

    def fail(c):
        remove(c, rows[1:])
        raise RuntimeError("mid-ack")

    with pytest.raises(RuntimeError):
        relaxed(conn, fail, "FULL")
    assert conn.execute("PRAGMA synchronous").fetchone() == (2,) and not conn.in_transaction
    assert ns(lease(conn, 100, 0)) == [1, 2], "a failed ack rolls back"


def test_random_inserts_leases_and_removes_agree_with_a_per_event_model(conn):
    rng = random.Random(20261130)
    waiting: dict[int, bytes] = {}
    counter = 0
    for step in range(300):
        op = rng.random()
        if op < 0.35 or not waiting:
            group = []
            for listener_id in rng.sample("ABC", rng.randint(1, 3)):
                numbers = range(counter, counter + rng.randint(1, 9))
                counter = numbers[-1] + 1
                group.append(segment_row("t", listener_id, float(step), [body(listener_id, n) for n in numbers]))
            before = set(waiting)
            insert(conn, group, [])
            waiting.update({r.seq: r.body for r in lease(conn, 1_000_000, 0) if r.seq not in before})
        else:
            after = rng.choice([0, *waiting])
            leased = lease(conn, rng.randint(1, 20), after)
            assert [r.seq for r in leased] == sorted(s for s in waiting if s > after)[:len(leased)], step
            chosen = rng.sample(leased, rng.randint(0, len(leased)))
            acked_before = rng.sample(sorted(waiting), rng.randint(0, min(2, len(waiting))))
            stale = [Row(s, "t", "A", b"", 0.0) for s in acked_before]
            for r in stale:
                del waiting[r.seq]
            remove(conn, stale)
            gone = remove(conn, chosen + stale)
            expected = {r.seq for r in chosen} - {r.seq for r in stale}
            assert gone == (expected if stale else None), step  # None: every row was there
            for r in chosen:
                waiting.pop(r.seq, None)
        everything = lease(conn, 1_000_000, 0)
        assert {r.seq: r.body for r in everything} == waiting, step
        assert [r.seq for r in everything] == sorted(waiting), step
        assert stored_envelopes(conn) == [r.body for r in everything], step
        assert totals(conn)[:2] == (len(waiting), sum(map(len, waiting.values()))), step
