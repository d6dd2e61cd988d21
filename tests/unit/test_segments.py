"""The segment format and its SQL (`listenerd.delivery.segments`) alone: a bare sqlite3 connection with
the store's schema, no Outbox, no event loop. What a second store backend must reproduce."""

import sqlite3

from listenerd.store import MIGRATIONS, migrate


def test_migration_3_runs_once_and_refuses_nothing_on_an_empty_outbox(tmp_path):
    conn = sqlite3.connect(tmp_path / "x.db", isolation_level=None)
    assert migrate(conn) == len(MIGRATIONS)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"outbox_segments", "outbox_bodies"} <= tables and "outbox" not in tables
    assert migrate(conn) == len(MIGRATIONS)
    conn.close()
