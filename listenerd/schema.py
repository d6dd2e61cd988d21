"""The store's schema, once, for both backends: each version's SQL and how PostgreSQL says it.

A version is written in SQLite's dialect (the embedded default, whose databases already carry
versions 1-5 in `PRAGMA user_version`); `Migration.postgresql` derives PostgreSQL's text by mapping
the column types (BLOB -> BYTEA, REAL -> DOUBLE PRECISION, INTEGER -> BIGINT, AUTOINCREMENT keys ->
BIGSERIAL) and adds what SQLite has implicitly (`rowid`, as `pos`, the order lists are read in).
Where a statement itself differs, the version names its PostgreSQL text (`pg=`). Both backends so
run the same numbered versions, in order, once each (`store.migrate`, `store_pg.migrate`).

`CLUSTER_MIGRATIONS` exist on PostgreSQL only: node membership, group leases with their fencing
epochs, and the status records every node reads (a cluster needs a shared store; SQLite is one node).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TYPES = [
    (re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"), "BIGSERIAL PRIMARY KEY"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
]


@dataclass(frozen=True)
class Migration:
    """One schema version: its SQLite text, and PostgreSQL's when a statement (not only a type) differs."""

    sqlite: str
    pg: str | None = None

    @property
    def postgresql(self) -> str:
        sql = self.pg if self.pg is not None else self.sqlite
        for pattern, replacement in _TYPES:
            sql = pattern.sub(replacement, sql)
        for table in ROWID_TABLES:  # SQLite's implicit rowid, which lists are ordered by, made explicit
            sql = sql.replace(f"CREATE TABLE {table} (", f"CREATE TABLE {table} (\n        pos BIGSERIAL NOT NULL,")
        return sql


ROWID_TABLES = ("integrations", "listeners")  # read `ORDER BY rowid` (SQLite) / `ORDER BY pos` (PostgreSQL)


def statements(script: str) -> list[str]:
    """A version's statements (no statement of the schema holds a semicolon in a literal)."""
    return [s for s in script.split(";") if s.strip()]


STORE_MIGRATIONS: list[Migration] = [
    # 1: objects, checkpoints, outbox, dead letters
    Migration("""
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL DEFAULT '',
        managed_by TEXT NOT NULL
    );
    CREATE TABLE integrations (
        tenant_id TEXT NOT NULL,
        type TEXT NOT NULL,
        fields BLOB NOT NULL,
        managed_by TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant_id, type)
    );
    CREATE TABLE listeners (
        tenant_id TEXT NOT NULL,
        id TEXT NOT NULL,
        spec BLOB NOT NULL,
        managed_by TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant_id, id)
    );
    CREATE TABLE checkpoints (
        tenant_id TEXT NOT NULL,
        listener_id TEXT NOT NULL,
        value TEXT NOT NULL,
        updated_at REAL NOT NULL,
        PRIMARY KEY (tenant_id, listener_id)
    );
    CREATE TABLE outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id TEXT NOT NULL,
        listener_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        body BLOB NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX outbox_listener ON outbox (tenant_id, listener_id, seq);
    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id TEXT NOT NULL,
        listener_id TEXT NOT NULL,
        status_code INTEGER NOT NULL,
        response TEXT NOT NULL,
        failed_at REAL NOT NULL,
        events BLOB NOT NULL
    );
    CREATE INDEX dead_letters_tenant ON dead_letters (tenant_id, id);
    """),
    # 2: the outbox is read and deleted only by seq (its primary key); the per-listener index cost a
    # third of every append's insert time and served no query
    Migration("""
    DROP INDEX IF EXISTS outbox_listener;
    """),
    # 3: the outbox stores one row per group-committed *segment* (one listener's events of one commit),
    # so insert, lease and ack cost a row per segment, not per event. `outbox_segments` holds what
    # changes, in small rows: `total` events stored, `first` the index of the first undelivered one,
    # `events`/`size` what is still undelivered. `outbox_bodies` holds what does not: the envelopes
    # concatenated in `bodies`, `ends` their end offsets (uint32 little-endian; NULL for a one-event
    # segment; a delivered event past `first` is a zero-length tombstone). A partial ack so rewrites a
    # small row, never the envelopes. Existing rows become one-event segments keeping their seq (so
    # their order) and their bytes (so their ids).
    Migration("""
    CREATE TABLE outbox_segments (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        tenant_id TEXT NOT NULL,
        listener_id TEXT NOT NULL,
        received_at REAL NOT NULL,
        total INTEGER NOT NULL,
        events INTEGER NOT NULL,
        size INTEGER NOT NULL,
        first INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE outbox_bodies (
        seq INTEGER PRIMARY KEY,
        ends BLOB,
        bodies BLOB NOT NULL
    );
    INSERT INTO outbox_segments (seq, tenant_id, listener_id, received_at, total, events, size, first)
        SELECT seq, tenant_id, listener_id, received_at, 1, 1, length(body), 0 FROM outbox ORDER BY seq;
    INSERT INTO outbox_bodies (seq, ends, bodies) SELECT seq, NULL, body FROM outbox ORDER BY seq;
    DROP TABLE outbox;
    """),
    # 4: listener ids assigned by the API (LI<n>) only grow, so a deleted listener's id, and with it its
    # dead letters and event ids, is never handed to a new one
    Migration("""
    CREATE TABLE listener_ids (
        tenant_id TEXT PRIMARY KEY,
        last INTEGER NOT NULL
    );
    INSERT INTO listener_ids (tenant_id, last)
        SELECT tenant_id, max(CAST(substr(id, 3) AS INTEGER)) FROM listeners
        WHERE id GLOB 'LI[0-9]*' AND substr(id, 3) NOT GLOB '*[^0-9]*' GROUP BY tenant_id;
    """, pg="""
    CREATE TABLE listener_ids (
        tenant_id TEXT PRIMARY KEY,
        last INTEGER NOT NULL
    );
    INSERT INTO listener_ids (tenant_id, last)
        SELECT tenant_id, max(CAST(substr(id, 3) AS INTEGER)) FROM listeners
        WHERE id ~ '^LI[0-9]+$' AND length(id) < 20 GROUP BY tenant_id;
    """),
    # 5: a checksum of each segment's stored bytes (zlib.crc32 of `bodies`, then of `ends`), checked
    # before any of its events is leased, so a damaged page never reaches the engine; NULL (rows
    # written before this version) is not checked
    Migration("""
    ALTER TABLE outbox_bodies ADD COLUMN checksum INTEGER;
    """),
]


CLUSTER_MIGRATIONS: list[str] = [
    # 1: members (each node's heartbeat and API address), the lease of each connection group (owner,
    # fencing epoch, expiry on the database's clock, so nodes' clocks never matter), and the status
    # record of each listener written by its owner, which every node's API reads
    """
    CREATE TABLE cluster_nodes (
        node TEXT PRIMARY KEY,
        advertise TEXT NOT NULL DEFAULT '',
        seen_at TIMESTAMPTZ NOT NULL,
        draining BOOLEAN NOT NULL DEFAULT false
    );
    CREATE TABLE cluster_leases (
        group_key TEXT PRIMARY KEY,
        node TEXT,
        epoch BIGINT NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    );
    CREATE TABLE cluster_status (
        tenant_id TEXT NOT NULL,
        listener_id TEXT NOT NULL,
        node TEXT NOT NULL,
        record BYTEA NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (tenant_id, listener_id)
    );
    """,
    # 2: the transaction that last wrote each status record (its id, `written`), indexed: a node reads only
    # the records written since its last read (`cluster.read_statuses`), not the whole table every second
    """
    ALTER TABLE cluster_status ADD COLUMN written xid8 NOT NULL DEFAULT pg_current_xact_id();
    CREATE INDEX cluster_status_written ON cluster_status (written);
    """,
]
