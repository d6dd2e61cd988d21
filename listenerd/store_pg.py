"""The PostgreSQL store: the same `Store`, its SQL on a shared database (`[store] url`).

The store's interface is small: `run(fn)` and `transaction(fn)` hand `fn` a connection with
`execute(sql, params)` / `executemany`, and the typed queries of `store.py`, `delivery/segments.py`
and `delivery/dead_letters.py` are functions over it. This module gives PostgreSQL that connection
(`PgConnection`, psycopg 3 in autocommit mode so `BEGIN`/`COMMIT` are explicit, as with SQLite's
`isolation_level=None`) on the same one dedicated thread, so nothing above the store changes:

- each statement's text is rewritten once from SQLite's dialect (`translate`, a closed table of
  rewrites, tested statement by statement): `?` placeholders, `ORDER BY rowid`, `INSERT OR
  REPLACE`, `GLOB`, `json_each`, `max(a, b)`, integer sums;
- the two places whose logic differs (allocating segment seqs, an ack without the commit's sync)
  ask `dialect(conn)`;
- errors become `sqlite3.Error` subclasses (`PostgresError`), so the outbox, the forwarder and the
  store's health keep one family of store failure to catch; a broken connection is replaced on the
  next statement outside a transaction (a PostgreSQL restart costs the calls that were in flight).

The schema versions are `schema.STORE_MIGRATIONS` (the same numbers as SQLite's) and, on this
backend only, `schema.CLUSTER_MIGRATIONS`, each counted in `listenerd_schema` and applied under an
advisory lock, so nodes starting together migrate once. API-set secrets are sealed exactly as on
SQLite (`sealing.py`): every node needs the same `[store] secrets-key-file`.

Driver: psycopg 3, measured against asyncpg by `bench/pg_driver.py` (README, "Store backends").
"""

from __future__ import annotations

import re
import sqlite3
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

from listenerd.schema import CLUSTER_MIGRATIONS, STORE_MIGRATIONS, statements
from listenerd.store import Store
from listenerd.store_checks import StoreUnavailable

log = structlog.get_logger("listenerd.store")

_MIGRATION_LOCK = 0x6C697374656E  # pg_advisory_xact_lock key: "listen"


class PostgresError(sqlite3.OperationalError):
    """A PostgreSQL failure, in the store's one family of errors (`sqlite3.Error`)."""


class PostgresIntegrityError(sqlite3.IntegrityError):
    """A constraint PostgreSQL refused (a duplicate key)."""


def redacted(url: str) -> str:
    """The URL without its password: what logs, metrics and errors name."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def dialect(conn: Any) -> str:
    """`"postgresql"` for a `PgConnection`, `"sqlite"` for anything else (sqlite3 and its test wrappers)."""
    return getattr(conn, "dialect", "sqlite")


# -- SQLite's dialect, as PostgreSQL says it

_UPSERT_KEYS = {"tenants": ("id",), "integrations": ("tenant_id", "type"), "listeners": ("tenant_id", "id")}
_REPLACE = re.compile(r"INSERT OR REPLACE INTO (\w+) \(([^)]*)\) VALUES (\(.*\))", re.S)
_REWRITES: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\bBEGIN IMMEDIATE\b"), "BEGIN"),
    (re.compile(r"\bORDER BY rowid\b"), "ORDER BY pos"),
    (re.compile(r"SELECT CAST\(value AS TEXT\) FROM json_each\(\?\)"),
     "SELECT value FROM json_array_elements_text(convert_from(?, 'UTF8')::json)"),
    (re.compile(r"SELECT value FROM json_each\(\?\)"),
     "SELECT value::bigint FROM json_array_elements_text(convert_from(?, 'UTF8')::json)"),
    (re.compile(r"\bmax\(last, excluded\.last\)"), "greatest(listener_ids.last, excluded.last)"),
    (re.compile(r"\bGLOB 'LI\[0-9\]\*'"), "~ '^LI[0-9]'"),
    (re.compile(r"\bsum\((\w+)\)"), r"sum(\1)::bigint"),
]
_TRANSLATED: dict[str, str] = {}


def translate(sql: str) -> str:
    """A statement of the store's (SQLite) dialect as PostgreSQL's, cached by text."""
    done = _TRANSLATED.get(sql)
    if done is not None:
        return done
    text = sql
    replace = _REPLACE.fullmatch(text.strip())
    if replace:
        table, columns, values = replace.groups()
        keys = _UPSERT_KEYS[table]
        names = [c.strip() for c in columns.split(",")]
        updates = ", ".join(f"{c} = excluded.{c}" for c in names if c not in keys)
        text = (f"INSERT INTO {table} ({columns}) VALUES {values} ON CONFLICT ({', '.join(keys)}) "
                f"DO UPDATE SET {updates}")
    for pattern, replacement in _REWRITES:
        text = pattern.sub(replacement, text)
    text = text.replace("%", "%%").replace("?", "%s")
    if len(_TRANSLATED) < 4096:
        _TRANSLATED[sql] = text
    return text


class PgCursor:
    """What callers use of a sqlite3 cursor: fetchone, fetchall, iteration, rowcount, close."""

    __slots__ = ("_cursor", "rowcount")

    def __init__(self, cursor: Any):
        self._cursor = cursor
        self.rowcount = cursor.rowcount

    def fetchone(self) -> Any:
        return self._cursor.fetchone() if self._cursor.description else None

    def fetchall(self) -> list[Any]:
        return self._cursor.fetchall() if self._cursor.description else []

    def __iter__(self) -> Any:
        return iter(self.fetchall())

    def close(self) -> None:
        self._cursor.close()


class PgConnection:
    """One psycopg connection used as the store code uses a sqlite3 one; reconnects when broken."""

    dialect = "postgresql"

    def __init__(self, url: str, connect_timeout: float = 5.0, settings: dict[str, str] | None = None):
        self.url = url
        self.connect_timeout = connect_timeout
        self.settings = settings if settings is not None else {}  # SET on every (re)connection
        self._conn: Any = None
        self._in_transaction = False
        self._trace: Any = None

    def set_trace_callback(self, trace: Any) -> None:
        """As sqlite3's: `trace(sql)` for every statement run (tests count commits with it)."""
        self._trace = trace

    def connection(self) -> Any:
        import psycopg

        if self._conn is not None and (self._conn.closed or self._conn.broken) and not self._in_transaction:
            self._conn = None
        if self._conn is None:
            try:
                self._conn = psycopg.connect(self.url, autocommit=True, application_name="listenerd",
                                             connect_timeout=max(1, int(self.connect_timeout)))
            except psycopg.Error as exc:
                raise PostgresError(f"cannot connect to {redacted(self.url)}: {_first_line(exc)}") from None
            try:
                for name, value in self.settings.items():
                    self._conn.execute(f"SET {name} = '{value}'")
            except psycopg.Error as exc:
                raise PostgresError(_first_line(exc)) from None
        return self._conn

    def apply(self, name: str, value: str) -> None:
        """A session setting, now and on every reconnection."""
        self.settings[name] = value
        self.execute(f"SET {name} = '{value}'")

    def execute(self, sql: str, params: Any = ()) -> PgCursor:
        import psycopg

        text = translate(sql)
        word = text.lstrip()[:8].upper()
        if self._trace is not None:
            self._trace(text)
        try:
            cursor = self.connection().execute(text, params or None)
        except psycopg.IntegrityError as exc:
            raise PostgresIntegrityError(_first_line(exc)) from None
        except psycopg.Error as exc:
            if word.startswith(("COMMIT", "ROLLBACK")):
                self._in_transaction = False
            raise PostgresError(_first_line(exc)) from None
        if word.startswith("BEGIN"):
            self._in_transaction = True
        elif word.startswith(("COMMIT", "ROLLBACK")):
            self._in_transaction = False
        return PgCursor(cursor)

    def executemany(self, sql: str, params: Any) -> PgCursor:
        import psycopg

        params = list(params)
        try:
            cursor = self.connection().cursor()
            if params:
                cursor.executemany(translate(sql), params)
        except psycopg.IntegrityError as exc:
            raise PostgresIntegrityError(_first_line(exc)) from None
        except psycopg.Error as exc:
            raise PostgresError(_first_line(exc)) from None
        return PgCursor(cursor)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class PostgresStore(Store):
    """`Store` on PostgreSQL: the same typed queries, a shared database (`[store] url`)."""

    def __init__(self, url: str, synchronous: str = "NORMAL", sealer: Any = None, connect_timeout: float = 5.0):
        super().__init__(redacted(url), synchronous, sealer=sealer)
        self.url = url
        self.connect_timeout = connect_timeout

    def _open(self) -> None:
        conn = PgConnection(self.url, self.connect_timeout)
        try:
            migrate(conn)
            if self.synchronous == "NORMAL":  # as SQLite's NORMAL: a commit does not wait for the disk flush
                conn.apply("synchronous_commit", "off")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreUnavailable(self.path, str(exc), "check [store] url, that PostgreSQL runs and the role may "
                                                        "create tables in that database") from None
        if self._make_sealer is not None:
            try:
                self.sealer = self._make_sealer()
            except (ValueError, OSError) as exc:
                conn.close()
                raise StoreUnavailable(self.path, f"cannot load the secrets key ({exc})",
                                       "check [store] secrets-key-file and secrets-old-key-files") from None
        self._conn = conn  # type: ignore[assignment]

    def _listeners_deleted(self, conn: Any, key: tuple[str, str] | None) -> None:
        drop_statuses(conn, key)  # a deleted listener's cluster status record (one, or all whose listener is gone)


def drop_statuses(conn: Any, key: tuple[str, str] | None = None) -> None:
    """Delete the cluster status record of this deleted listener, or (None) of every listener that no longer
    exists (`cluster.py` writes and reads them)."""
    if key is not None:
        conn.execute("DELETE FROM cluster_status WHERE tenant_id = ? AND listener_id = ?", key)
    else:
        conn.execute("DELETE FROM cluster_status s WHERE NOT EXISTS (SELECT 1 FROM listeners l WHERE "
                     "l.tenant_id = s.tenant_id AND l.id = s.listener_id)")


def migrate(conn: PgConnection) -> tuple[int, int]:
    """Bring both schemas to their newest versions (store, cluster); refuses a database from the future."""
    conn.execute("CREATE TABLE IF NOT EXISTS listenerd_schema (name TEXT PRIMARY KEY, version BIGINT NOT NULL)")
    done = []
    for name, scripts in (("store", [m.postgresql for m in STORE_MIGRATIONS]), ("cluster", CLUSTER_MIGRATIONS)):
        conn.execute("BEGIN")
        try:
            conn.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            row = conn.execute("SELECT version FROM listenerd_schema WHERE name = ?", (name,)).fetchone()
            version = row[0] if row else 0
            if version > len(scripts):
                raise PostgresError(f"{name} schema version {version} is newer than this listenerd (knows up to "
                                    f"{len(scripts)}): upgrade listenerd")
            for script in scripts[version:]:
                for statement in statements(script):
                    conn.execute(statement)
            conn.execute("INSERT INTO listenerd_schema (name, version) VALUES (?, ?) ON CONFLICT (name) "
                         "DO UPDATE SET version = excluded.version", (name, len(scripts)))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        done.append(len(scripts))
    return done[0], done[1]
