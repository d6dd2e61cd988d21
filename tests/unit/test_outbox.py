"""The durable outbox on a real SQLite store: group commit, checkpoints, bounds, lease and ack."""

import asyncio
import sqlite3
import tracemalloc

import orjson

from listenerd.delivery.ids import event_id
from listenerd.delivery.outbox import Outbox
from listenerd.delivery.segments import stored_envelopes
from listenerd.observability import Metrics
from listenerd.store import Store
from listenerd.store_pg import dialect
from tests.harness import Harness, wait_for


async def refuse_outbox_inserts_while_blocked(h: Harness) -> None:
    """A real failure inside the commit's transaction: a trigger aborts outbox inserts while the table `block`
    has a row (it has one at once), in SQLite's or PostgreSQL's syntax: the tests run on both stores."""
    def install(c) -> None:
        c.execute("CREATE TABLE block (x INTEGER)")
        c.execute("INSERT INTO block VALUES (1)")
        if dialect(c) == "postgresql":
            c.execute("CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN IF EXISTS (SELECT 1 FROM block) THEN "
                      "RAISE EXCEPTION 'disk says no'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql")
            c.execute("CREATE TRIGGER refuse BEFORE INSERT ON outbox_segments FOR EACH ROW EXECUTE FUNCTION refuse()")
        else:
            c.execute("CREATE TRIGGER refuse BEFORE INSERT ON outbox_segments WHEN EXISTS (SELECT 1 FROM block) "
                      "BEGIN SELECT RAISE(ABORT, 'disk says no'); END")

    await h.store.run(install)


async def test_append_commits_envelopes_in_order_with_stable_ids(tmp_path):
    async with Harness(tmp_path) as h:
        committed = []
        for n in range(5):
            await h.outbox.append("t1", "L1", "pusher", {"n": n}, key=f"k{n}", on_commit=committed.append)
        await h.outbox.append("t1", "L1", "pusher", {"n": 5})  # no source identity: fresh id
        await h.outbox.flush()
        events = await h.events()
        assert [e["event"]["n"] for e in events] == list(range(6))
        assert [e["id"] for e in events[:5]] == [event_id("t1", "L1", f"k{n}") for n in range(5)]
        assert events[5]["id"] not in {e["id"] for e in events[:5]}
        assert events[0]["received-at"].endswith("Z") and events[0]["source"] == "pusher"
        assert [e["event"]["n"] for e in committed] == list(range(5))
        # the id is a function of tenant, listener and key only
        assert event_id("t1", "L1", "k0") == event_id("t1", "L1", "k0") != event_id("t1", "L2", "k0")


async def test_appends_from_many_listeners_are_group_committed(tmp_path):
    async with Harness(tmp_path) as h:
        commits = []
        h.store._conn.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)

        async def source(lid):
            for n in range(500):
                await h.outbox.append("t", lid, "pusher", {"n": n})

        await asyncio.gather(*(source(f"L{i}") for i in range(4)))
        await h.outbox.flush()
        assert len(await h.events()) == 2000
        assert 1 <= len(commits) < 200, f"{len(commits)} transactions for 2000 events"
        for i in range(4):
            assert [e["event"]["n"] for e in await h.events("t", f"L{i}")] == list(range(500))


async def test_checkpoint_is_committed_with_its_event(tmp_path):
    async with Harness(tmp_path) as h:
        seen = []

        def check(envelope):  # at commit time the checkpoint is already at least this event's
            seen.append(envelope["event"]["replay"])

        for n in range(1, 101):
            await h.outbox.append("t", "sf", "salesforce", {"replay": n}, key=str(n), checkpoint=str(n),
                                  on_commit=check)
        await h.outbox.flush()
        assert await h.store.get_checkpoint("t", "sf") == "100"
        assert seen == list(range(1, 101))


async def test_failed_commit_rolls_back_event_and_checkpoint_together_then_retries(tmp_path):
    async with Harness(tmp_path) as h:
        await h.outbox.append("t", "sf", "salesforce", {"replay": 1}, key="1", checkpoint="1")
        await h.outbox.flush()
        await refuse_outbox_inserts_while_blocked(h)
        await h.outbox.append("t", "sf", "salesforce", {"replay": 2}, key="2", checkpoint="2")
        await wait_for(lambda: h.outbox.commit_failures >= 1, what="a failed commit")
        assert await h.store.get_checkpoint("t", "sf") == "1"
        assert [e["event"]["replay"] for e in await h.events()] == [1]
        await h.store.run(lambda c: c.execute("DELETE FROM block"))
        await asyncio.wait_for(h.outbox.flush(), 10)
        assert await h.store.get_checkpoint("t", "sf") == "2"
        assert [e["event"]["replay"] for e in await h.events()] == [1, 2]


async def test_append_waits_at_the_bound_and_resumes_when_rows_are_acked(tmp_path):
    async with Harness(tmp_path, max_events=10) as h:
        waits = []
        appended = 0

        async def source():
            nonlocal appended
            for n in range(30):
                await h.outbox.append("t", "L", "pusher", {"n": n}, on_wait=waits.append)
                appended += 1

        task = asyncio.create_task(source())
        await wait_for(lambda: waits == [True], what="the source to wait")
        await h.outbox.flush()
        assert appended == 10 and h.outbox.depth == 10 and h.outbox.full
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await asyncio.sleep(0.2)  # blocked: nothing may pile up meanwhile
        assert appended == 10 and h.outbox._queued == 0 and not h.outbox._groups
        assert tracemalloc.get_traced_memory()[0] - before < 256 * 1024
        tracemalloc.stop()
        while appended < 30 or h.outbox.depth:
            rows = await h.outbox.lease(5)
            await h.outbox.ack(rows)
            await asyncio.sleep(0)
            await h.outbox.flush()
        await task
        assert waits[:2] == [True, False]
        assert h.metrics.backpressure._value.get() >= 1


async def test_byte_bound_applies_too(tmp_path):
    async with Harness(tmp_path, max_bytes=2000) as h:
        task = asyncio.create_task(h.outbox.append("t", "L", "pusher", {"blob": "x" * 1500}))
        await task  # the first event always fits, whatever its size
        blocked = asyncio.create_task(h.outbox.append("t", "L", "pusher", {"blob": "y" * 1500}))
        await asyncio.sleep(0.05)
        assert not blocked.done()
        await h.outbox.flush()
        await h.outbox.ack(await h.outbox.lease(10))
        await asyncio.wait_for(blocked, 5)


async def test_depth_and_oldest_age_survive_a_restart(tmp_path):
    path = str(tmp_path / "o.db")
    store = Store(path)
    await store.open()
    outbox = Outbox(store, max_events=100, max_bytes=1 << 20)
    await outbox.start()
    for n in range(7):
        await outbox.append("t", "L", "pusher", {"n": n})
    await outbox.close()
    await store.close()

    store = Store(path)
    await store.open()
    metrics = Metrics()
    outbox = Outbox(store, max_events=100, max_bytes=1 << 20, metrics=metrics)
    await outbox.start()
    assert outbox.depth == 7
    assert metrics.outbox_depth._value.get() == 7
    assert outbox.oldest_age() > 0
    rows = await outbox.lease(100)
    await outbox.ack(rows)
    assert outbox.depth == 0 and outbox.oldest_age() == 0
    await outbox.close()
    await store.close()


async def test_outbox_rows_are_raw_envelope_json(tmp_path):
    async with Harness(tmp_path) as h:
        await h.outbox.append("t", "L", "datasift", {"a": [1, 2]}, key="x")
        await h.outbox.flush()
        conn = sqlite3.connect(str(tmp_path / "test.db"))
        body, = stored_envelopes(conn)
        conn.close()
        assert set(orjson.loads(body)) == {"id", "tenant-id", "listener-id", "source", "received-at", "event"}


async def test_with_full_durability_acks_skip_the_fsync_and_the_setting_is_restored(tmp_path):
    store = Store(str(tmp_path / "full.db"), "FULL")
    await store.open()
    outbox = Outbox(store, max_events=100, max_bytes=1 << 20)
    await outbox.start()
    syncs = []
    store._conn.set_trace_callback(lambda sql: syncs.append(sql) if "synchronous" in sql else None)
    for n in range(10):
        await outbox.append("t", "L", "pusher", {"n": n})
    await outbox.flush()
    rows = await outbox.lease(4)
    await outbox.ack(rows)
    assert syncs == ["PRAGMA synchronous=NORMAL", "PRAGMA synchronous=FULL"]
    assert await store.run(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2  # FULL
    rest = await outbox.lease(100)
    assert [orjson.loads(r.body)["event"]["n"] for r in rest] == list(range(4, 10))
    assert all(r.seq > rows[-1].seq for r in rest)
    await outbox.close()
    await store.close()


async def test_chunked_inserts_keep_append_order_across_chunk_sizes(tmp_path):
    async with Harness(tmp_path) as h:
        for total in (1, 255, 256, 257, 777):
            for n in range(total):
                await h.outbox.append("t", f"L{total}", "pusher", {"n": n})
            await h.outbox.flush()
        rows = await h.outbox.lease(10_000)
        assert [r.seq for r in rows] == sorted({r.seq for r in rows})  # strictly increasing
        for total in (1, 255, 256, 257, 777):
            assert [e["event"]["n"] for e in await h.events("t", f"L{total}")] == list(range(total))


async def test_close_with_a_timeout_does_not_hang_on_a_failing_store(tmp_path):
    async with Harness(tmp_path) as h:
        await refuse_outbox_inserts_while_blocked(h)
        committed = []
        await h.outbox.append("t", "sf", "salesforce", {"replay": 1}, key="1", checkpoint="1",
                              on_commit=committed.append)
        await wait_for(lambda: h.outbox.commit_failures >= 1, what="a failed commit")
        await asyncio.wait_for(h.outbox.close(timeout=0.2), 5)
        assert committed == [] and await h.store.get_checkpoint("t", "sf") is None


async def test_flush_waits_for_what_came_before_it_not_for_everyone_elses_traffic(tmp_path):
    """A source flushing before it reads its resume point returns once its own appends are committed, while
    other listeners keep appending without a pause (the writer is never idle then)."""
    cap = 200_000
    async with Harness(tmp_path) as h:
        flushed = asyncio.Event()
        others = 0

        async def busy_listener() -> None:
            nonlocal others
            while not flushed.is_set() and others < cap:
                await h.outbox.append("t", "busy", "pusher", {"n": others})
                others += 1
                await asyncio.sleep(0)

        busy = asyncio.create_task(busy_listener())
        await wait_for(lambda: others >= 100, what="the busy listener appending")
        mine = []
        await h.outbox.append("t", "sf", "salesforce", {"replay": 7}, key="7", checkpoint="7", on_commit=mine.append)
        await asyncio.wait_for(h.outbox.flush(), 30)
        flushed.set()
        at_flush = others
        await busy
        assert [e["event"]["replay"] for e in mine] == [7] and await h.store.get_checkpoint("t", "sf") == "7"
        assert at_flush < cap, "flush waited for the other listener to stop appending"
        await h.outbox.flush()  # and what is left lands too
        assert len(await h.events("t", "busy")) == others


async def test_a_fenced_commit_writes_only_the_listeners_whose_groups_this_node_still_holds(tmp_path):
    """A cluster node's fence (cluster.Cluster._fence, checked inside the commit's transaction) refuses the
    listeners of groups it no longer holds: their events are never written nor counted as received, and
    their checkpoint does not move; the others in the same commit are written."""
    async with Harness(tmp_path) as h:
        await h.store.set_checkpoint("t", "lost", "0")
        checked = []

        def fence(conn, listeners):
            checked.append(sorted(listeners))
            return {key for key in listeners if key[1] == "lost"}

        h.outbox.fence = fence
        committed = []
        for n in range(1, 4):
            for lid in ("kept", "lost"):
                await h.outbox.append("t", lid, "salesforce", {"replay": n}, key=f"{lid}{n}", checkpoint=str(n),
                                      on_commit=lambda e, lid=lid: committed.append((lid, e["event"]["replay"])))
        await h.outbox.flush()
        assert any(("t", "lost") in c for c in checked), checked
        assert [(e["listener-id"], e["event"]["replay"]) for e in await h.events()] == [("kept", 1), ("kept", 2),
                                                                                      ("kept", 3)]
        assert committed == [("kept", 1), ("kept", 2), ("kept", 3)] and h.outbox.fenced == 3
        assert await h.store.get_checkpoint("t", "kept") == "3" and await h.store.get_checkpoint("t", "lost") == "0"
