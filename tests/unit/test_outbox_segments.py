"""The outbox over segments: one row per listener per commit, event-exact leases and acks, and the upgrade.

Events of one listener appended in one commit share one `outbox_segments` row. Everything the
per-event outbox guaranteed must still hold event by event through the `Outbox`: order, ids, partial
and duplicate acks, restarts, and a database written by the per-event outbox (schema 2) must deliver
every waiting event after the upgrade. The segment functions alone are `test_segments.py`.
"""

import sqlite3
import time

import orjson

from listenerd.delivery.dead_letters import DeadLetters
from listenerd.delivery.outbox import Outbox
from listenerd.delivery.segments import SHIFT, stored_envelopes
from listenerd.store import MIGRATIONS, Store
from tests.harness import Harness


async def append(h, listener_id, numbers, **kw):
    for n in numbers:
        await h.outbox.append("t", listener_id, "pusher", {"n": n}, **kw)
    await h.outbox.flush()


def ns(rows):
    return [orjson.loads(r.body)["event"]["n"] for r in rows]


async def test_envelope_bytes_are_what_orjson_gives_the_envelope_dict(tmp_path):
    async with Harness(tmp_path) as h:
        event = {"text": "ü \"quoted\" \n\u2028", "n": [1, 2.5, None, True], "nested": {"a": {}}}
        await h.outbox.append("tenant \"1\"", "L/ü", "salesforce", event, key="k")
        await h.outbox.flush()
        row, = await h.outbox.lease(10)
        envelope = orjson.loads(row.body)
        assert list(envelope) == ["id", "tenant-id", "listener-id", "source", "received-at", "event"]
        assert envelope["tenant-id"] == "tenant \"1\"" and envelope["listener-id"] == "L/ü"
        assert envelope["event"] == event
        assert row.body == orjson.dumps(envelope)


async def test_one_commit_is_one_row_per_listener(tmp_path):
    async with Harness(tmp_path) as h:
        counts = []
        for n in range(60):
            await h.outbox.append("t", f"L{n % 3}", "pusher", {"n": n}, on_commit_count=counts.append)
        await h.outbox.flush()
        segments = await h.store.run(lambda c: c.execute(
            "SELECT listener_id, events FROM outbox_segments ORDER BY seq").fetchall())
        assert sum(e for _, e in segments) == 60 == sum(counts)
        assert len(segments) < 60, "every event in a row of its own: nothing was grouped"
        assert len(counts) < 60, "the count callback should run once per commit, not per event"
        for i in range(3):
            assert [orjson.loads(b)["event"]["n"] for b in await h.store.run(stored_envelopes)
                    if orjson.loads(b)["listener-id"] == f"L{i}"] == list(range(i, 60, 3))


async def test_leases_continue_inside_a_segment_and_acks_may_be_partial_or_out_of_order(tmp_path):
    async with Harness(tmp_path) as h:
        await append(h, "L", range(10))
        rows = await h.outbox.lease(10)
        assert len({r.seq >> SHIFT for r in rows}) == 1, "ten events appended at once should share a segment"
        assert ns(await h.outbox.lease(3, after=rows[4].seq)) == [5, 6, 7]
        # an ack of the middle (an earlier batch's ack failed and will be re-sent): tombstones
        assert ns(await h.outbox.ack(rows[3:6])) == [3, 4, 5]
        assert ns(await h.outbox.lease(100)) == [0, 1, 2, 6, 7, 8, 9]
        assert ns(await h.outbox.lease(2, after=rows[2].seq)) == [6, 7]
        assert h.outbox.depth == 7 and h.outbox.size_bytes == sum(len(r.body) for r in rows[:3] + rows[6:])
        # the same rows acked again (sent twice): nothing counted twice
        assert await h.outbox.ack(rows[3:6]) == []
        assert h.outbox.depth == 7
        # the head, delivered: `first` moves past it
        assert ns(await h.outbox.ack(rows[:3])) == [0, 1, 2]
        assert ns(await h.outbox.lease(100)) == [6, 7, 8, 9]
        ids = [orjson.loads(r.body)["id"] for r in rows]
    # a restart sees exactly what is waiting, same bytes
    async with Harness(tmp_path) as h:
        assert h.outbox.depth == 4 and h.outbox.size_bytes == sum(len(r.body) for r in rows[6:])
        again = await h.outbox.lease(100)
        assert [r.body for r in again] == [r.body for r in rows[6:]]
        assert [orjson.loads(r.body)["id"] for r in again] == ids[6:]
        await append(h, "L", [10])
        assert ns(await h.outbox.lease(100)) == [6, 7, 8, 9, 10]
        assert ns(await h.outbox.ack(await h.outbox.lease(100))) == [6, 7, 8, 9, 10]
        assert h.outbox.depth == 0 and h.outbox.size_bytes == 0
        for table in ("outbox_segments", "outbox_bodies"):  # nothing left behind
            assert await h.store.run(lambda c, t=table: c.execute(f"SELECT count(*) FROM {t}").fetchone()[0]) == 0


def schema_2_database(path, rows):
    """A database exactly as the per-event outbox (schema version 2) left it."""
    conn = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:2], start=1):
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    for tenant_id, listener_id, event_id, body, received in rows:
        conn.execute("INSERT INTO outbox (tenant_id, listener_id, event_id, body, received_at) VALUES (?, ?, ?, ?, ?)",
                     (tenant_id, listener_id, event_id, body, received))
    conn.execute("DELETE FROM outbox WHERE seq = 2")  # a gap, as acks leave them
    conn.close()


async def test_upgrade_from_the_per_event_outbox_keeps_every_waiting_event_in_order(tmp_path):
    now = time.time()
    old = []
    for n in range(6):
        envelope = {"id": f"id-{n}", "tenant-id": "t", "listener-id": f"L{n % 2}", "source": "pusher",
                    "received-at": "2026-11-23T04:00:00.000000Z", "event": {"n": n}}
        old.append(("t", f"L{n % 2}", envelope["id"], orjson.dumps(envelope), now - 60 + n))
    schema_2_database(tmp_path / "test.db", old)
    waiting = [o for i, o in enumerate(old) if i != 1]  # seq 2 was acked before the upgrade

    async with Harness(tmp_path) as h:
        assert await h.store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS)
        assert h.outbox.depth == 5 and h.outbox.size_bytes == sum(len(o[3]) for o in waiting)
        assert 55 < h.outbox.oldest_age() < 120
        rows = await h.outbox.lease(100)
        assert [r.body for r in rows] == [o[3] for o in waiting]  # same bytes, so same ids, same order
        assert [(r.tenant_id, r.listener_id, r.received) for r in rows] == [(o[0], o[1], o[4]) for o in waiting]
        await append(h, "L0", [100])  # new events go after the upgraded ones
        later = await h.outbox.lease(100, after=rows[-1].seq)
        assert ns(later) == [100]
        await h.outbox.ack(rows[:2])
        await h.outbox.dead_letter(rows[2:3], 400, "bad")
        assert ns(await h.outbox.lease(100)) == [4, 5, 100]
        assert h.outbox.depth == 3


async def test_a_restarted_outbox_counts_segments_left_partly_delivered(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    outbox = Outbox(store, max_events=100, max_bytes=1 << 20)
    await outbox.start()
    for n in range(8):
        await outbox.append("t", "L", "pusher", {"n": n})
    await outbox.flush()
    rows = await outbox.lease(8)
    await outbox.ack(rows[:3])
    await outbox.ack(rows[5:6])
    await outbox.close()
    again = Outbox(store, max_events=100, max_bytes=1 << 20)
    await again.start()
    assert again.depth == 4 and again.size_bytes == sum(len(r.body) for r in rows[3:5] + rows[6:])
    assert ns(await again.lease(100)) == [3, 4, 6, 7]
    await again.close()
    await store.close()


async def test_random_leases_acks_and_dead_letters_agree_with_a_per_event_model(tmp_path):
    """Random appends, leases from random cursors, partial and out-of-order acks, duplicate acks,
    dead letters and restarts: what waits is always exactly the events never acked, in order per
    listener, with the outbox's counts matching."""
    import random

    rng = random.Random(20261123)
    store = Store(str(tmp_path / "model.db"))
    await store.open()
    outbox = Outbox(store, max_events=1_000_000, max_bytes=1 << 30, max_batch=7)
    await outbox.start()
    dead_letters = DeadLetters(store, outbox)
    waiting: dict[int, bytes] = {}  # seq -> body, for every event neither acked nor dead-lettered
    counter = 0
    leased: list = []

    async def arrived(count):  # the new rows are exactly those the model does not know yet
        new = {r.seq: r.body for r in await outbox.lease(1_000_000) if r.seq not in waiting}
        assert len(new) == count
        waiting.update(new)

    for step in range(400):
        op = rng.random()
        if op < 0.3 or not waiting:
            added = rng.randint(1, 20)
            for _ in range(added):
                counter += 1
                await outbox.append("t", rng.choice(["A", "B", "C"]), "pusher", {"n": counter})
            await outbox.flush()
            await arrived(added)
        elif op < 0.5:
            after = rng.choice([0] + [r.seq for r in leased]) if leased else 0
            leased = await outbox.lease(rng.randint(1, 15), after=after)
            assert all(r.seq > after for r in leased)
            assert [r.seq for r in leased] == sorted(s for s in waiting if s > after)[:len(leased)], step
        elif op < 0.8 and leased:
            pick = sorted(rng.sample(range(len(leased)), rng.randint(1, len(leased))))
            chosen = [leased[i] for i in pick]
            gone = await outbox.ack(chosen)
            assert gone == [r for r in chosen if r.seq in waiting], step
            for r in gone:
                assert waiting.pop(r.seq) == r.body
        elif op < 0.9 and leased:
            chosen = leased[: rng.randint(1, len(leased))]
            await outbox.dead_letter(chosen, 400, "no")
            for r in chosen:
                waiting.pop(r.seq, None)
            letters = await dead_letters.of_tenant("t")
            if letters and rng.random() < 0.5:
                letter = rng.choice(letters)
                events = len(orjson.loads(letter.events))
                assert await dead_letters.requeue("t", letter.id) == events
                await arrived(events)
        else:
            await outbox.close()
            outbox = Outbox(store, max_events=1_000_000, max_bytes=1 << 30, max_batch=7)
            await outbox.start()
            dead_letters = DeadLetters(store, outbox)
            leased = []
        everything = await outbox.lease(1_000_000)
        assert {r.seq: r.body for r in everything} == waiting, step
        assert [r.seq for r in everything] == sorted(waiting), step
        assert outbox.depth == len(waiting) and outbox.size_bytes == sum(map(len, waiting.values())), step
    await outbox.close()
    await store.close()


async def test_big_events_split_commit_groups_by_bytes(tmp_path):
    from listenerd.delivery import outbox as module

    async with Harness(tmp_path) as h:
        text = "x" * (module.GROUP_BYTES // 3)
        h.outbox.max_event_bytes = module.GROUP_BYTES  # events this big pass only a raised engine.max-event-bytes
        for n in range(7):
            await h.outbox.append("t", "L", "pusher", {"n": n, "text": text})
        await h.outbox.flush()
        sizes = await h.store.run(lambda c: c.execute("SELECT size FROM outbox_segments ORDER BY seq").fetchall())
        assert len(sizes) >= 3 and all(size < 2 * module.GROUP_BYTES for (size,) in sizes)
        assert ns(await h.outbox.lease(100)) == list(range(7))


async def test_a_commit_of_many_listeners_keeps_each_listeners_order_and_seqs_are_never_reused(tmp_path):
    async with Harness(tmp_path) as h:
        for n in range(2):
            for i in range(300):  # more listeners than one multi-row INSERT takes
                await h.outbox.append("t", f"L{i}", "pusher", {"n": n, "i": i})
        await h.outbox.flush()
        rows = await h.outbox.lease(10_000)
        assert len(rows) == 600 and [r.seq for r in rows] == sorted({r.seq for r in rows})
        for i in (0, 255, 256, 299):
            assert [orjson.loads(r.body)["event"]["n"] for r in rows if r.listener_id == f"L{i}"] == [0, 1]
        await h.outbox.ack(rows)
        await append(h, "L0", [2])
        newer, = await h.outbox.lease(10)
        assert newer.seq > rows[-1].seq
