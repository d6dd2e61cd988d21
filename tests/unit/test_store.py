"""Store: WAL, versioned migrations, config objects synced, typed queries by key, checkpoints."""

import sqlite3

import pytest
from structlog.testing import capture_logs

from listenerd.store import MIGRATIONS, Row, Store, StoreUnavailable, migrate


async def test_open_migrates_and_uses_wal(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    assert await store.run(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert await store.run(lambda c: c.execute("PRAGMA user_version").fetchone()[0]) == len(MIGRATIONS)
    await store.close()
    store = Store(str(tmp_path / "s.db"))  # reopening runs nothing twice
    await store.open()
    await store.close()


async def test_a_missing_directory_is_created_only_where_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    path = tmp_path / "volume" / "s.db"
    with pytest.raises(StoreUnavailable, match="directory .*volume does not exist; mount the volume"):
        await Store(str(path)).open()
    assert not path.parent.exists()
    for store, why in ((Store(str(path), create_directory=True), "[store] create-directory"),
                       (Store(str(tmp_path / "state" / "s.db")), "systemd StateDirectory")):
        monkeypatch.setenv("STATE_DIRECTORY", f"/elsewhere:{tmp_path / 'state'}")
        with capture_logs() as logs:
            await store.open()
        await store.close()
        assert [(e["event"], e["path"], e["schema"], e["directory_created"]) for e in logs] == [
            ("new store: empty, nothing waiting", store.path, len(MIGRATIONS), why)]
    with capture_logs() as logs:  # no longer new
        store = Store(str(path))
        await store.open()
        await store.close()
    assert logs == []


async def test_an_unusable_store_is_one_line_naming_it(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    (tmp_path / "dir.db").mkdir()
    for name, problem in (("junk.db", "is not a SQLite database"), ("dir.db", "is a directory, not a database file")):
        with pytest.raises(StoreUnavailable) as raised:
            await Store(str(tmp_path / name)).open()
        assert str(raised.value).startswith(f"store {tmp_path / name}: {problem}; ")
        assert "\n" not in str(raised.value)


def test_refuses_a_newer_schema(tmp_path):
    conn = sqlite3.connect(tmp_path / "n.db", isolation_level=None)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    with pytest.raises(RuntimeError, match="newer than this listenerd"):
        migrate(conn)


async def test_config_objects_replace_only_config_rows(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    await store.put_listener("t", "API1", {"id": "API1"}, "api")
    await store.sync_config_objects([("t", "T")], [("t", "pusher", {"key": "k"})], [("t", "C1", {"id": "C1"})])
    await store.sync_config_objects([("t", "T")], [], [("t", "C2", {"id": "C2"})])
    rows = await store.all_listeners()
    assert [(r[1], r[3]) for r in rows] == [("API1", "api"), ("C2", "config")]
    assert await store.all_integrations() == []
    assert await store.delete_listener("t", "API1")
    assert not await store.delete_listener("t", "API1")
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
        await store.put_listener("t", lid, {"id": lid}, "api")
    await store.close()
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 3, as a database from before it
    conn.execute("DROP TABLE listener_ids")
    conn.execute("ALTER TABLE outbox_bodies DROP COLUMN checksum")  # migration 5's
    conn.execute("PRAGMA user_version = 3")
    assert migrate(conn) == len(MIGRATIONS)
    assert conn.execute("SELECT tenant_id, last FROM listener_ids").fetchall() == [("t", 5)]
    conn.close()
    store = Store(path)
    await store.open()
    assert await store.insert_listener("t", None, lambda lid: {"id": lid}) == "LI6"
    assert await store.insert_listener("t", "LI6", lambda lid: {"id": lid}) is None
    await store.close()


async def test_typed_queries_read_one_tenant_or_one_key(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    await store.put_listener("t", "A", {"id": "A", "v": 1})
    await store.put_listener("u", "A", {"id": "A", "v": 2})
    await store.put_listener("t", "B", {"id": "B"})
    await store.put_listener("t", "A", {"id": "A", "v": 3})  # an update keeps its place in the order
    assert await store.get_listener("t", "A") == Row("t", "A", {"id": "A", "v": 3}, "api")
    assert await store.get_listener("t", "C") is None
    assert [r.key for r in await store.listeners("t")] == ["A", "B"]
    assert [(r.tenant_id, r.key) for r in await store.all_listeners()] == [("t", "A"), ("u", "A"), ("t", "B")]
    await store.put_integration("t", "pusher", {"key": "k"})
    await store.sync_config_objects([("u", "")], [("u", "pusher", {"key": "c"})], [])
    assert await store.get_integration("t", "pusher") == Row("t", "pusher", {"key": "k"}, "api")
    assert await store.get_integration("t", "datasift") is None
    assert await store.integrations("u") == [Row("u", "pusher", {"key": "c"}, "config")]
    assert len(await store.all_integrations()) == 2
    await store.close()


async def test_deleting_a_listener_deletes_its_checkpoint_only(tmp_path):
    store = Store(str(tmp_path / "s.db"))
    await store.open()
    for lid in ("A", "B"):
        await store.put_listener("t", lid, {"id": lid})
        await store.set_checkpoint("t", lid, "7")
    assert await store.delete_listener("t", "A")
    assert await store.get_checkpoint("t", "A") is None
    assert await store.get_checkpoint("t", "B") == "7"
    await store.close()
