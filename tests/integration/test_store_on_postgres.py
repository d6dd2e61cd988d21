"""The store's unit tests again, on PostgreSQL: the same test functions (collected here from
tests/unit) with the store, the harness's store and the bare connection made on a fresh PostgreSQL
database each. What a second backend must reproduce is what SQLite already passes.

Left out are the tests of SQLite itself (its files, PRAGMAs, `quick_check`, its migrations of
old databases, bytes damaged on its pages): `SQLITE_ONLY`, each with why.
"""


import pytest

from listenerd.store_pg import PgConnection, PostgresStore, migrate, redacted, translate
from tests import harness
from tests.unit import (
    test_dead_letters,
    test_outbox,
    test_outbox_segments,
    test_segment_checksum,
    test_segments,
    test_store,
)

MODULES = (test_store, test_segments, test_outbox, test_outbox_segments, test_dead_letters, test_segment_checksum)
SQLITE_ONLY = {
    # the file, its directory and its damage: SQLite's own checks (store_checks.py)
    "test_open_migrates_and_uses_wal", "test_a_missing_directory_is_created_only_where_allowed",
    "test_an_unusable_store_is_one_line_naming_it", "test_refuses_a_newer_schema",
    # upgrades of SQLite databases written by older versions
    "test_migration_4_seeds_listener_ids_from_existing_listeners",
    "test_migration_3_runs_once_and_refuses_nothing_on_an_empty_outbox",
    "test_upgrade_from_the_per_event_outbox_keeps_every_waiting_event_in_order",
    # PRAGMA synchronous (PostgreSQL's relaxed ack is test_relaxed_on_postgres_turns_off_the_commit_sync_... below)
    "test_relaxed_runs_one_transaction_without_full_sync_and_restores_it_even_on_failure",
    "test_with_full_durability_acks_skip_the_fsync_and_the_setting_is_restored",
    # read or damage the SQLite file directly
    "test_outbox_rows_are_raw_envelope_json", "test_a_zeroed_page_on_disk_is_caught_though_integrity_check_passes",
    "test_damaged_end_offsets_set_the_whole_segment_aside",  # zeroblob()
    "test_migration_5_on_a_store_written_before_it",
}

for _module in MODULES:
    for _name, _fn in vars(_module).items():
        if _name.startswith("test_") and callable(_fn) and _name not in SQLITE_ONLY:
            globals()[_name] = _fn


@pytest.fixture(autouse=True)
def on_postgres(monkeypatch, postgres):
    """Every `Store(path, ...)` the tests make is a PostgresStore on a database of its own (one per path,
    so a test that reopens a path reopens the same database)."""
    urls: dict[str, str] = {}

    def store(path, synchronous="NORMAL", create_directory=False, sealer=None):
        url = urls.get(path) or urls.setdefault(path, postgres.database())
        return PostgresStore(url, synchronous, sealer=sealer)

    for module in (harness, *MODULES):
        if hasattr(module, "Store"):
            monkeypatch.setattr(module, "Store", store)
    yield
    for url in urls.values():
        postgres.drop(url)


@pytest.fixture
def conn(pg_url):
    """test_segments' bare connection, on PostgreSQL."""
    connection = PgConnection(pg_url)
    migrate(connection)
    yield connection
    connection.close()


def test_relaxed_on_postgres_turns_off_the_commit_sync_for_its_transaction_only(conn):
    test_segments.put(conn, "A", range(3))
    rows = test_segments.lease(conn, 100, 0)
    seen = []
    test_segments.relaxed(conn, lambda c: seen.append(c.execute("SHOW synchronous_commit").fetchone()[0])
                          or test_segments.remove(c, rows[:1]), "FULL")
    assert seen == ["off"] and conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    assert test_segments.ns(test_segments.lease(conn, 100, 0)) == [1, 2]


def test_every_statement_of_the_sqlite_dialect_is_said_in_postgresql():
    assert translate("SELECT a FROM t WHERE b = ? AND c LIKE '%x' ORDER BY rowid") == \
        "SELECT a FROM t WHERE b = %s AND c LIKE '%%x' ORDER BY pos"
    assert translate("INSERT OR REPLACE INTO tenants (id, name, managed_by) VALUES (?, ?, 'config')") == \
        ("INSERT INTO tenants (id, name, managed_by) VALUES (%s, %s, 'config') ON CONFLICT (id) DO UPDATE SET "
         "name = excluded.name, managed_by = excluded.managed_by")
    assert "greatest(listener_ids.last, excluded.last)" in translate(
        "INSERT INTO listener_ids (tenant_id, last) VALUES (?, ?) ON CONFLICT (tenant_id) "
        "DO UPDATE SET last = max(last, excluded.last)")
    assert translate("SELECT id FROM listeners WHERE id GLOB 'LI[0-9]*'") == \
        "SELECT id FROM listeners WHERE id ~ '^LI[0-9]'"
    assert translate("DELETE FROM x WHERE seq IN (SELECT value FROM json_each(?))") == \
        ("DELETE FROM x WHERE seq IN (SELECT value::bigint FROM "
         "json_array_elements_text(convert_from(%s, 'UTF8')::json))")
    assert translate("SELECT coalesce(sum(events), 0) FROM s") == "SELECT coalesce(sum(events)::bigint, 0) FROM s"
    assert translate("BEGIN IMMEDIATE") == "BEGIN"


def test_the_url_password_never_appears_in_what_the_store_names(pg_url):
    with_password = pg_url.replace("postgres@", "postgres:hunter2secret@")
    store = PostgresStore(with_password)
    assert "hunter2secret" not in store.path and "***" in store.path
    assert redacted("postgresql://u@h/db") == "postgresql://u@h/db"


async def test_an_unreachable_database_is_one_line_naming_it_without_its_password():
    from listenerd.store_checks import StoreUnavailable
    from listenerd.testing_pg import _free_port as free_port

    store = PostgresStore(f"postgresql://u:sekrit-pw@127.0.0.1:{free_port()}/db", connect_timeout=1)
    with pytest.raises(StoreUnavailable) as raised:
        await store.open()
    assert "sekrit-pw" not in str(raised.value) and "127.0.0.1" in str(raised.value)
    await store.close()
