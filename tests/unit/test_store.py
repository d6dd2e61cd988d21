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
