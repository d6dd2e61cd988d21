"""A damaged stored segment never reaches the engine: its checksum fails on lease, it goes to the dead letters.

The damage is real: bytes changed inside the stored blob with plain SQL, and in one test a whole page
of the database file zeroed on disk (which `integrity_check` does not notice). The segments around it
are delivered; the outbox's counts lose exactly what was set aside.
"""

import contextlib
import sqlite3
import time

import orjson

from listenerd.api.dead_letters import dead_letter_json
from listenerd.delivery import segments
from listenerd.delivery.dead_letters import DAMAGED
from listenerd.store import MIGRATIONS
from tests.harness import Harness


async def commit(h, listener_id, numbers, **event):
    """One commit: one segment."""
    for n in numbers:
        await h.outbox.append("t", listener_id, "pusher", {"n": n, **event})
    await h.outbox.flush()


def ns(rows):
    return [orjson.loads(r.body)["event"]["n"] for r in rows]


async def three_segments(h):
    await commit(h, "L1", range(0, 5))
    await commit(h, "L1", range(5, 10))
    await commit(h, "L1", range(10, 15))
    assert await h.store.run(lambda c: [r[0] for r in c.execute("SELECT seq FROM outbox_bodies ORDER BY seq")]) \
        == [1, 2, 3]


async def damage(h, seq, fn):
    """Rewrite segment `seq`'s stored bodies with `fn(bodies)`, its checksum left as it was."""
    def write(c):
        bodies, = c.execute("SELECT bodies FROM outbox_bodies WHERE seq = ?", (seq,)).fetchone()
        c.execute("UPDATE outbox_bodies SET bodies = ? WHERE seq = ?", (fn(bodies), seq))
    await h.store.transaction(write)


async def stored_totals(h):
    events, size, _ = await h.store.run(segments.totals)
    return events, size


def damaged_count(h):
    return h.metrics.registry.get_sample_value("listenerd_store_damaged_events_total")


async def test_a_changed_byte_sets_the_segment_aside_and_delivery_carries_on(tmp_path):
    async with Harness(tmp_path) as h:
        await three_segments(h)
        await damage(h, 2, lambda b: b.replace(b'"n":7', b'"n":8'))  # still JSON: only the checksum knows
        rows = await h.outbox.lease(100)
        assert ns(rows) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
        assert (h.outbox.depth, h.outbox.size_bytes) == await stored_totals(h) == (10, sum(len(r.body) for r in rows))
        assert damaged_count(h) == 5
        letter, = await h.dead_letters.of_tenant("t")
        assert letter.status_code == DAMAGED == 0 and letter.listener_id == "L1"
        assert letter.response.startswith("listenerd: stored segment failed its checksum (seq 2): the store is damaged")
        assert [e["event"]["n"] for e in orjson.loads(letter.events)] == [5, 6, 8, 8, 9]  # as read
        assert ns(await h.outbox.ack(rows)) == ns(rows)
        assert (h.outbox.depth, h.outbox.size_bytes) == (0, 0)
        assert await h.outbox.lease(100) == [] and damaged_count(h) == 5  # set aside once


async def test_zeroed_bytes_keep_the_dead_letter_readable_and_a_retry_sends_only_intact_envelopes(tmp_path):
    async with Harness(tmp_path) as h:
        await three_segments(h)
        envelopes = await h.store.run(segments.stored_envelopes)
        start = sum(len(e) for e in envelopes[:6])  # the second event of segment 2
        await damage(h, 2, lambda b: b[:start - sum(len(e) for e in envelopes[:5]) + 10] + bytes(20)
                     + b[start - sum(len(e) for e in envelopes[:5]) + 30:])
        assert ns(await h.outbox.lease(100)) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
        letter, = await h.dead_letters.of_tenant("t")
        shown = dead_letter_json(letter)["events"]  # the API can still show it
        assert [e["event"]["n"] if isinstance(e, dict) else "damaged" for e in shown] == [5, "damaged", 7, 8, 9]
        assert "\x00" * 20 in shown[1]
        assert await h.dead_letters.requeue("t", letter.id) == 4
        rows = await h.outbox.lease(100)
        assert ns(rows) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 5, 7, 8, 9]
        assert [r.body for r in rows[-4:]] == [envelopes[i] for i in (5, 7, 8, 9)]  # same bytes, same ids
        kept, = await h.dead_letters.of_tenant("t")  # the damaged one stays for the operator, never sent
        assert kept.id == letter.id and orjson.loads(kept.events) == [shown[1]]


async def test_damaged_end_offsets_set_the_whole_segment_aside(tmp_path):
    async with Harness(tmp_path) as h:
        await three_segments(h)
        await h.store.transaction(lambda c: c.execute("UPDATE outbox_bodies SET ends = zeroblob(20) WHERE seq = 2"))
        assert ns(await h.outbox.lease(100)) == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
        letter, = await h.dead_letters.of_tenant("t")
        assert len(orjson.loads(letter.events)) == 1  # the bodies, whole, as one string
        assert (h.outbox.depth, h.outbox.size_bytes) == await stored_totals(h)


async def test_a_segment_without_a_checksum_is_leased(tmp_path):
    async with Harness(tmp_path) as h:
        await three_segments(h)
        await h.store.transaction(lambda c: c.execute("UPDATE outbox_bodies SET checksum = NULL WHERE seq = 2"))
        await damage(h, 2, lambda b: b.replace(b'"n":7', b'"n":8'))  # not checked: as before schema 5
        assert ns(await h.outbox.lease(100)) == [0, 1, 2, 3, 4, 5, 6, 8, 8, 9, 10, 11, 12, 13, 14]
        assert await h.dead_letters.of_tenant("t") == []


async def test_a_hole_rewrite_keeps_the_checksum_true_and_does_not_launder_damage(tmp_path):
    async with Harness(tmp_path) as h:
        await three_segments(h)
        rows = await h.outbox.lease(100)
        await h.outbox.ack([rows[1], rows[6]])  # not a prefix: segments 1 and 2 are rewritten with tombstones
        assert ns(await h.outbox.lease(100)) == [0, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14]
        rows = await h.outbox.lease(100)
        by_n = {n: r for n, r in zip(ns(rows), rows, strict=True)}
        await damage(h, 2, lambda b: b.replace(b'"n":8', b'"n":9'))  # after this lease checked it
        await h.outbox.ack([by_n[2]])  # more holes: segments 1 and 3 rewritten from sound bytes,
        await h.outbox.ack([by_n[11]])
        await h.outbox.ack([by_n[7]])  # segment 2 from damaged ones
        assert ns(await h.outbox.lease(100)) == [0, 3, 4, 10, 12, 13, 14]
        letter, = await h.dead_letters.of_tenant("t")
        assert [e["event"]["n"] for e in orjson.loads(letter.events)] == [5, 9, 9]
        assert (h.outbox.depth, h.outbox.size_bytes) == await stored_totals(h)


def zero_page(path, marker):
    """Zero the page of the database file that holds `marker`."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    with open(path, "r+b") as f:
        page = f.read().index(marker) // page_size
        f.seek(page * page_size)
        f.write(bytes(page_size))


async def test_a_zeroed_page_on_disk_is_caught_though_integrity_check_passes(tmp_path):
    async with Harness(tmp_path) as h:
        await commit(h, "L1", [0])
        await commit(h, "L1", [1], pad="A" * 30_000, tail="END-OF-THE-BIG-ONE")  # overflow pages
        await commit(h, "L1", [2])
    path = tmp_path / "test.db"  # closed: the WAL is checkpointed into the file
    zero_page(path, b"END-OF-THE-BIG-ONE")  # the last overflow page of the big envelope
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    async with Harness(tmp_path) as h:
        assert h.outbox.depth == 3
        rows = await h.outbox.lease(100)
        assert ns(rows) == [0, 2] and b"\x00" not in b"".join(r.body for r in rows)
        letter, = await h.dead_letters.of_tenant("t")
        assert "(seq 2)" in letter.response and "\x00" in orjson.loads(letter.events)[0]
        assert (h.outbox.depth, h.outbox.size_bytes) == (2, sum(len(r.body) for r in rows))


async def test_migration_5_on_a_store_written_before_it(tmp_path):
    conn = sqlite3.connect(tmp_path / "test.db", isolation_level=None)
    for number, script in enumerate(MIGRATIONS[:4], start=1):
        for statement in filter(str.strip, script.split(";")):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {number}")
    old = [orjson.dumps({"id": f"id-{n}", "event": {"n": n}}) for n in range(3)]
    tenant, listener, received, count, size, ends, blob = segments.segment_row("t", "L1", time.time(), old)
    conn.execute("INSERT INTO outbox_segments (seq, tenant_id, listener_id, received_at, total, events, size) "
                 "VALUES (1, ?, ?, ?, ?, ?, ?)", (tenant, listener, received, count, count, size))
    conn.execute("INSERT INTO outbox_bodies (seq, ends, bodies) VALUES (1, ?, ?)", (ends, blob))
    conn.close()
    async with Harness(tmp_path) as h:
        assert await h.store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS) == 5
        await commit(h, "L1", [3])
        assert await h.store.run(lambda c: c.execute("SELECT seq, checksum IS NULL FROM outbox_bodies").fetchall()) \
            == [(1, 1), (2, 0)]  # the old segment is not verified, the new one is
        rows = await h.outbox.lease(100)
        assert [r.body for r in rows[:3]] == old and ns(rows[3:]) == [3]


async def test_a_segment_split_across_leases_is_checksummed_once_unless_its_bytes_changed(tmp_path, monkeypatch):
    calls = []
    checksum = segments.checksum
    monkeypatch.setattr(segments, "checksum", lambda ends, bodies: calls.append(bodies) or checksum(ends, bodies))
    async with Harness(tmp_path) as h:
        await three_segments(h)
        calls.clear()
        first = await h.outbox.lease(3)  # ends inside segment 1
        second = await h.outbox.lease(3, after=first[-1].seq)  # segment 1 again, then into segment 2
        assert ns(first + second) == [0, 1, 2, 3, 4, 5]
        assert len(calls) == 2  # segments 1 and 2, each once
        await damage(h, 2, lambda b: b.replace(b'"n":7', b'"n":8'))  # segment 2 changed since it was checked
        third = await h.outbox.lease(10, after=second[-1].seq)
        assert ns(third) == list(range(10, 15))  # checked again: set aside, never sent
        assert damaged_count(h) == 5
