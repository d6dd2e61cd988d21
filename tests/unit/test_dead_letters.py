"""Dead letters: refused rows moved out of the outbox, listed, requeued with their ids and order, discarded.

The SQL functions run alone on a bare connection; `DeadLetters` runs over a real store and outbox
(a requeue must count its events back into the outbox and wake the forwarder); the JSON shape is
the API's (`listenerd.api.dead_letters.dead_letter_json`).
"""

import contextlib
import json
import sqlite3

import orjson

from listenerd.api.dead_letters import dead_letter_json
from listenerd.delivery import dead_letters, segments
from listenerd.delivery.dead_letters import DeadLetter
from listenerd.store import migrate
from tests.harness import Harness


async def shown(h, tenant_id):
    """A tenant's dead letters as the API answers them."""
    return [dead_letter_json(letter) for letter in await h.dead_letters.of_tenant(tenant_id)]


def ns(rows):
    return [orjson.loads(r.body)["event"]["n"] for r in rows]


async def test_dead_letters_listed_requeued_with_same_ids_and_discarded(tmp_path):
    async with Harness(tmp_path) as h:
        for n in range(4):
            await h.outbox.append("t", "L1" if n % 2 else "L2", "pusher", {"n": n}, key=str(n))
        await h.outbox.append("other", "L1", "pusher", {"n": 99})
        await h.outbox.flush()
        rows = await h.outbox.lease(4)
        await h.outbox.dead_letter(rows, 400, '{"error": "bad event"}')
        assert h.outbox.depth == 1
        letters = await shown(h, "t")
        assert [d["listener-id"] for d in letters] == ["L2", "L1"]  # one per listener, first seen first
        first = letters[0]
        assert first["status-code"] == 400 and first["response"] == '{"error": "bad event"}'
        assert first["failed-at"].endswith("Z")
        assert [e["event"]["n"] for e in first["events"]] == [0, 2]
        assert await shown(h, "other") == []
        assert await h.dead_letters.requeue("other", int(first["id"])) is None  # tenant-scoped

        assert await h.dead_letters.requeue("t", int(first["id"])) == 2
        queued = await h.events("t", "L2")
        assert [e["id"] for e in queued] == [e["id"] for e in first["events"]]
        assert queued[0]["received-at"] == first["events"][0]["received-at"]
        assert h.outbox.depth == 3
        assert [d["id"] for d in await shown(h, "t")] == [letters[1]["id"]]

        assert await h.dead_letters.discard("t", int(letters[1]["id"]))
        assert not await h.dead_letters.discard("t", int(letters[1]["id"]))
        assert await shown(h, "t") == []


async def test_dead_letter_of_part_of_a_segment_and_requeue_with_the_same_ids(tmp_path):
    async with Harness(tmp_path) as h:
        for n in range(6):
            await h.outbox.append("t", "L", "pusher", {"n": n})
        await h.outbox.flush()
        rows = await h.outbox.lease(6)
        await h.outbox.dead_letter(rows[2:4], 400, "no")
        assert ns(await h.outbox.lease(100)) == [0, 1, 4, 5]
        letter, = await shown(h, "t")
        assert [e["event"]["n"] for e in letter["events"]] == [2, 3]
        assert await h.dead_letters.requeue("t", int(letter["id"])) == 2
        again = await h.outbox.lease(100)
        assert ns(again) == [0, 1, 4, 5, 2, 3]
        assert [orjson.loads(r.body)["id"] for r in again[4:]] == [orjson.loads(r.body)["id"] for r in rows[2:4]]
        assert h.outbox.depth == 6 and h.outbox.size_bytes == sum(len(r.body) for r in again)


async def test_a_requeue_counts_its_events_back_into_the_outbox_and_wakes_the_forwarder(tmp_path):
    async with Harness(tmp_path) as h:
        for n in range(5):
            await h.outbox.append("t", "L", "pusher", {"n": n}, key=str(n))
        await h.outbox.flush()
        rows = await h.outbox.lease(5)
        await h.outbox.dead_letter(rows, 422, "no")
        assert h.outbox.depth == 0 and h.outbox.size_bytes == 0 and h.outbox.oldest_age() == 0
        assert h.metrics.outbox_depth._value.get() == 0
        letter, = await h.dead_letters.of_tenant("t")
        h.outbox.committed.clear()  # what the forwarder waits on

        assert await h.dead_letters.requeue("t", letter.id) == 5
        assert h.outbox.committed.is_set()
        assert h.outbox.depth == 5 and h.outbox.size_bytes == sum(len(r.body) for r in rows)
        assert h.metrics.outbox_depth._value.get() == 5 and h.metrics.outbox_bytes._value.get() == h.outbox.size_bytes
        assert h.outbox.oldest_age() > 0  # from the events' first receipt, not from the requeue
        again = await h.outbox.lease(100)
        assert [r.body for r in again] == [r.body for r in rows]  # same bytes: same ids, same order
        await h.outbox.ack(again)
        assert h.outbox.depth == 0 and await h.dead_letters.of_tenant("t") == []


def database(tmp_path):
    conn = sqlite3.connect(tmp_path / "dl.db", isolation_level=None)
    migrate(conn)
    return contextlib.closing(conn)


def envelope(listener_id, n):
    return orjson.dumps({"id": f"id-{listener_id}-{n}", "tenant-id": "t", "listener-id": listener_id,
                         "source": "pusher", "received-at": "2026-11-23T04:00:00.250000Z", "event": {"n": n}})


def test_refuse_moves_rows_out_of_the_outbox_one_letter_per_listener(tmp_path):
    with database(tmp_path) as conn:
        segments.insert(conn, [segments.segment_row("t", "A", 1.0, [envelope("A", n) for n in range(4)]),
                               segments.segment_row("t", "B", 1.0, [envelope("B", n) for n in range(2)])], [])
        rows = segments.lease(conn, 100, 0)
        assert dead_letters.refuse(conn, [rows[1], rows[4], rows[2]], 400, "bad", 99.0) is None
        assert [r.body for r in segments.lease(conn, 100, 0)] == [rows[0].body, rows[3].body, rows[5].body]
        letters = dead_letters.select(conn, "t")
        assert [(d.listener_id, d.status_code, d.response, d.failed_at) for d in letters] == [
            ("A", 400, "bad", 99.0), ("B", 400, "bad", 99.0)]
        assert letters[0].events == b"[" + rows[1].body + b"," + rows[2].body + b"]"  # as sent, in order
        assert dead_letters.select(conn, "t", "B") == [letters[1]]
        assert dead_letters.select(conn, "t", dead_letter_id=letters[0].id) == [letters[0]]
        assert dead_letters.select(conn, "other") == []


def test_rows_acked_meanwhile_are_not_refused(tmp_path):
    with database(tmp_path) as conn:
        segments.insert(conn, [segments.segment_row("t", "A", 1.0, [envelope("A", n) for n in range(3)])], [])
        rows = segments.lease(conn, 100, 0)
        segments.remove(conn, rows[:2])  # the first send's ack landed after all
        assert dead_letters.refuse(conn, rows, 400, "bad", 1.0) == {rows[2].seq}
        letter, = dead_letters.select(conn, "t")
        assert letter.events == b"[" + rows[2].body + b"]"
        assert dead_letters.refuse(conn, rows[:2], 400, "bad", 1.0) == set()  # nothing left: no empty letter
        assert len(dead_letters.select(conn, "t")) == 1


def test_requeue_puts_the_same_bytes_back_at_the_end_and_discard_is_tenant_scoped(tmp_path):
    with database(tmp_path) as conn:
        bodies = [envelope("A", n) for n in range(5)]
        segments.insert(conn, [segments.segment_row("t", "A", 1.0, bodies)], [])
        rows = segments.lease(conn, 100, 0)
        dead_letters.refuse(conn, rows[1:4], 400, "bad", 1.0)
        segments.insert(conn, [segments.segment_row("t", "A", 2.0, [envelope("A", 9)])], [])
        letter, = dead_letters.select(conn, "t")
        assert dead_letters.requeue(conn, "other", letter.id) is None
        count, size, received = dead_letters.requeue(conn, "t", letter.id)
        assert (count, size) == (3, sum(map(len, bodies[1:4])))
        assert received == 1795406400.25  # the first envelope's received-at
        waiting = segments.lease(conn, 100, 0)
        assert [r.body for r in waiting] == [bodies[0], bodies[4], envelope("A", 9), *bodies[1:4]]
        assert waiting[-1].received == received
        assert dead_letters.select(conn, "t") == []

        dead_letters.refuse(conn, waiting[:1], 500, "x", 1.0)
        letter, = dead_letters.select(conn, "t")
        assert not dead_letters.discard(conn, "other", letter.id)
        assert dead_letters.discard(conn, "t", letter.id)
        assert not dead_letters.discard(conn, "t", letter.id)


def test_the_api_shape_of_a_dead_letter():
    letter = DeadLetter(7, "LI1", 400, '{"error": "no"}', 1763870400.25, b'[{"id":"a","event":{"n":1}}]')
    assert json.dumps(dead_letter_json(letter)) == (
        '{"id": "7", "listener-id": "LI1", "status-code": 400, "response": "{\\"error\\": \\"no\\"}", '
        '"failed-at": "2025-11-23T04:00:00.250Z", "events": [{"id": "a", "event": {"n": 1}}]}')
