"""The cluster's status records on PostgreSQL: each node reads only the records written since its last read
(not the whole table every second), and a listener's record goes when the listener does."""

import asyncio

import pytest

from listenerd.cluster import read_statuses, write_statuses
from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.store_pg import PgConnection, PostgresStore
from listenerd.testing import wait_for
from tests.daemon import running_daemon
from tests.integration.test_cluster import KEY, SECRET, TENANTS, node_config

BODY = {"type": "pusher", "options": {"channel": "c"}}


@pytest.fixture
async def store(pg_url):
    opened = PostgresStore(pg_url)
    await opened.open()
    for listener_id in ("L1", "L2", "L3"):
        await opened.put_listener("t", listener_id, {**BODY, "id": listener_id})
    yield opened
    await opened.close()


def keys(rows):
    return sorted((t, lid) for t, lid, _, _ in rows)


async def test_a_read_fetches_only_the_records_written_since_the_last_one_even_those_committed_late(store, pg_url):
    writer, reader = PgConnection(pg_url), PgConnection(pg_url)
    try:
        write_statuses(writer, "a", [("t", lid, b'{"status": "started"}') for lid in ("L1", "L2", "L3")])
        since, rows = read_statuses(reader, None)
        assert keys(rows) == [("t", "L1"), ("t", "L2"), ("t", "L3")]
        since, rows = read_statuses(reader, since)
        assert rows == [], "nothing written since: nothing fetched"
        write_statuses(writer, "a", [("t", "L2", b'{"status": "retrying"}')])
        since, rows = read_statuses(reader, since)
        assert rows == [("t", "L2", "a", b'{"status": "retrying"}')]
        since, rows = read_statuses(reader, since)
        assert rows == []
        # a write whose transaction is still open when a read runs (its clock time is older than that read)
        writer.execute("BEGIN")
        write_statuses(writer, "a", [("t", "L3", b'{"status": "failed"}')])
        await asyncio.sleep(0.05)
        since, rows = read_statuses(reader, since)
        assert rows == [], "not committed yet: not visible"
        writer.execute("COMMIT")
        since, rows = read_statuses(reader, since)
        assert rows == [("t", "L3", "a", b'{"status": "failed"}')], "committed after the read began: read next time"
        since, rows = read_statuses(reader, since)
        assert rows == []
    finally:
        writer.close()
        reader.close()


async def test_a_listeners_record_goes_with_it_and_none_is_written_for_a_listener_that_is_gone(store, pg_url):
    async def recorded():
        return keys((await store.run(lambda c: read_statuses(c, None)))[1])

    await store.run(lambda c: write_statuses(c, "a", [("t", lid, b"{}") for lid in ("L1", "L2", "L3", "L9")]))
    assert await recorded() == [("t", "L1"), ("t", "L2"), ("t", "L3")], "L9 was never a listener"
    assert await store.delete_listener("t", "L2")
    assert await recorded() == [("t", "L1"), ("t", "L3")]
    # the config's listeners replaced: those it no longer declares go, with their records
    await store.sync_config_objects([("t", "")], [], [("t", "C1", {**BODY, "id": "C1"})])
    await store.run(lambda c: write_statuses(c, "a", [("t", "C1", b"{}")]))
    assert await recorded() == [("t", "C1"), ("t", "L1"), ("t", "L3")]
    await store.sync_config_objects([("t", "")], [], [])
    assert await recorded() == [("t", "L1"), ("t", "L3")]


async def test_a_node_reads_only_changed_records_every_second_and_drops_a_deleted_listeners(tmp_path, pg_url,
                                                                                            started):
    """In-process node: its per-second status reads fetch no unchanged record (counted by the node and seen in
    the statements it runs); a change is fetched; a deleted listener's record is gone from the table."""
    engine = await started(EngineSim())
    pusher = await started(PusherSim("1", KEY, SECRET))
    text = node_config(tmp_path, "a", pg_url, engine, pusher)
    async with running_daemon(tmp_path, text) as (daemon, api):
        cluster = daemon.cluster

        async def every_one_started():
            codes = [await api.call("GET", f"/1.0/tenants/{t}/listeners/{lid}/status")
                     for t in TENANTS for lid in ("P1", "P2")]
            return all(code == 200 and body["status"] == "started" for code, body in codes)
        await wait_for(every_one_started, timeout=30, what="every listener started")

        async def table():
            return keys((await daemon.store.run(lambda c: read_statuses(c, None)))[1])
        await wait_for(lambda: _equals(table(), sorted((t, lid) for t in TENANTS for lid in ("P1", "P2"))),
                       timeout=10, what="a record per listener")

        statements: list[str] = []
        daemon.store._conn.set_trace_callback(statements.append)

        async def reads_fetching_nothing(rounds=2):
            """`rounds` reads in a row that fetched no record (and, seen from its statements, no full read)."""
            begin = dict(cluster.status_reads)
            statements.clear()

            def quiet():
                nonlocal begin
                now = cluster.status_reads
                if now["delta_rows"] != begin["delta_rows"] or now["full"] != begin["full"]:
                    begin = dict(now)  # something changed meanwhile: count again from here
                    statements.clear()
                    return False
                return now["delta"] >= begin["delta"] + rounds
            await wait_for(quiet, timeout=15, interval=0.1, what=f"{rounds} status reads fetching nothing")
            reads = [s for s in statements if "FROM cluster_status" in s and s.lstrip().startswith("SELECT")]
            assert len(reads) >= rounds and all("WHERE written >=" in s for s in reads), reads

        await reads_fetching_nothing(3)
        before = dict(cluster.status_reads)
        assert (await api.call("POST", "/1.0/tenants/t1/listeners/P1/restart"))[0] == 202
        await wait_for(lambda: cluster.status_reads["delta_rows"] > before["delta_rows"], timeout=5,
                       what="the restarted listener's record read")
        await reads_fetching_nothing()

        code, created = await api.call("POST", "/1.0/tenants/t2/listeners",
                                       {"id": "P3", "type": "pusher", "options": {"channel": "t2-c"}})
        assert code == 201, created
        await wait_for(lambda: _has(table(), ("t2", "P3")), timeout=10, what="P3's record")
        assert (await api.call("DELETE", "/1.0/tenants/t2/listeners/P3"))[0] == 204
        assert ("t2", "P3") not in await table()
        # the config without t3's P2: a reload deletes its record too
        t3_p2 = '[[tenants.listeners]]\nid = "P2"\ntype = "pusher"\noptions = { channel = "t3-b" }\n'
        assert t3_p2 in text
        (tmp_path / "listenerd.toml").write_text(text.replace(t3_p2, ""))
        assert await daemon.reload()
        assert ("t3", "P2") not in await table() and ("t3", "P1") in await table()


async def _equals(awaitable, expected):
    return await awaitable == expected


async def _has(awaitable, key):
    return key in await awaitable
