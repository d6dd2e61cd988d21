"""Store: WAL, versioned migrations, config objects synced, checkpoints."""

import sqlite3

import pytest

from listenerd.store import MIGRATIONS, Store, migrate


async def test_open_migrates_and_uses_wal(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    assert await store.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert await store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS)
    await store.close()
    store = Store(str(tmp_path / "s.db"))  # reopening runs nothing twice
    await store.open()
    await store.close()


def test_refuses_a_newer_schema(tmp_path):
    conn = sqlite3.connect(tmp_path / "n.db", isolation_level=None)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this listenerd"):
        migrate(conn)


async def test_config_objects_replace_only_config_rows(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    await store.put_object("listeners", "t", "API1", {"id": "API1"}, "api")
    await store.sync_config_objects([("t", "T")], [("t", "pusher", {"key": "k"})], [("t", "C1", {"id": "C1"})])
    await store.sync_config_objects([("t", "T")], [], [("t", "C2", {"id": "C2"})])
    rows = await store.objects("listeners")
    assert [(r[1], r[3]) for r in rows] == [("API1", "api"), ("C2", "config")]
    assert await store.objects("integrations") == []
    assert await store.delete_object("listeners", "t", "API1")
    assert not await store.delete_object("listeners", "t", "API1")
    await store.set_checkpoint("t", "C2", "42")
    assert await store.get_checkpoint("t", "C2") == "42"
    await store.set_checkpoint("t", "C2", None)
    assert await store.get_checkpoint("t", "C2") is None
    await store.close()


async def test_migration_4_seeds_listener_ids_from_existing_listeners(tmp_path):
    path = str(tmp_path / "s.db")
    store = Store(path)
    await store.open()
    for lid in ("LI5", "LI12x", "other"):
        await store.put_object("listeners", "t", lid, {"id": lid}, "api")
    await store.close()
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 3, as a database from before it
    conn.execute("DROP TABLE listener_ids")
    conn.execute("PRAGMA user_version = 3")
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.execute("SELECT tenant_id, last FROM listener_ids").fetchall() == [("t", 5)]
    conn.close()
    store = Store(path)
    await store.open()
    assert await store.insert_listener("t", None, lambda lid: {"id": lid}) == "LI6"
    assert await store.insert_listener("t", "LI6", lambda lid: {"id": lid}) is None
    await store.close()
