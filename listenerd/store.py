"""The SQLite store: objects made through the API, checkpoints, the outbox and dead letters.

One connection, used only from one dedicated thread, so the event loop never blocks on disk and
sqlite3 never sees two threads. WAL mode lets that writer commit while readers (backups, the
`sqlite3` shell) look on. The schema is versioned with `PRAGMA user_version`; each migration runs
once, in order, inside a transaction.

Opening checks the store before anything runs on it: a path that cannot work, a missing directory
(a volume that failed to mount must not become a new empty store), a damaged file (`quick_check`) or
a newer schema is refused with `StoreUnavailable` (`store_checks.py`), one line naming the path,
the problem and what to do, which the CLI prints instead of a traceback.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import orjson
import structlog

from listenerd.schema import STORE_MIGRATIONS
from listenerd.sealing import PREFIX, Sealer, SealError
from listenerd.store_checks import StoreUnavailable, prepare_location, private_file, salvage, unusable

T = TypeVar("T")
log = structlog.get_logger("listenerd.store")

MIGRATIONS: list[str] = [m.sqlite for m in STORE_MIGRATIONS]  # the SQLite text of each version


class Row(NamedTuple):
    """One stored listener or integration: `key` is the listener id or the integration type."""

    tenant_id: str
    key: str
    body: dict[str, Any]
    managed_by: str


class Store:
    """Async front of one SQLite database. `run(fn)` executes `fn(conn)` on the store thread."""

    def __init__(self, path: str, synchronous: str = "NORMAL", create_directory: bool = False,
                 sealer: Callable[[], Sealer] | None = None):
        self.path = path
        self._make_sealer = sealer  # made once the directory is there (a generated key lives beside the store)
        self.sealer: Sealer | None = None  # None: integration secrets are stored as given (tests' own stores)
        self.synchronous = synchronous
        self.create_directory = create_directory  # else only systemd's StateDirectory is created
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="listenerd-store")
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle

    async def open(self) -> None:
        """Open and migrate (once: opening an open store does nothing); StoreUnavailable when it cannot be used."""
        if self._conn is None:
            await self._call(self._open)

    def _open(self) -> None:
        created = None
        new = True
        if self.path != ":memory:":
            path = Path(self.path)
            created = prepare_location(path, self.create_directory)
            new = not path.exists() or path.stat().st_size == 0
            private_file(path)
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=5000")
                # deleted and replaced rows are zeroed on the pages that are written anyway: a credential an
                # older version stored in plain text, once sealed or dropped, is not left in the file
                conn.execute("PRAGMA secure_delete=FAST")
                problems = [row[0] for row in conn.execute("PRAGMA quick_check(3)")]
                if problems != ["ok"]:
                    raise StoreUnavailable(self.path, f"is damaged (quick_check: {'; '.join(problems)})",
                                           salvage(self.path))
                version = migrate(conn)
            except BaseException:
                conn.close()
                raise
        except sqlite3.Error as exc:
            raise unusable(self.path, exc) from exc
        if self.path != ":memory:":
            private_file(Path(self.path), narrow=True)
        if self._make_sealer is not None:  # once the store is known good: a damaged one is the one line to print
            try:
                self.sealer = self._make_sealer()
            except (ValueError, OSError) as exc:
                conn.close()
                raise StoreUnavailable(self.path, f"cannot load the secrets key ({exc})",
                                       "check [store] secrets-key-file and secrets-old-key-files") from None
        if new and self.path != ":memory:":
            log.info("new store: empty, nothing waiting", path=self.path, schema=version, directory_created=created)
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._call(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    @property
    def is_open(self) -> bool:
        return self._conn is not None

    # -- execution

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on the store thread."""
        return await self._call(lambda: fn(self._require()))

    async def transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` inside BEGIN IMMEDIATE ... COMMIT on the store thread."""
        return await self._call(lambda: in_transaction(self._require(), fn))

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("store is not open")
        return self._conn

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # -- listeners and integrations: one query per question, each on its own table

    async def get_listener(self, tenant_id: str, listener_id: str) -> Row | None:
        return await self._one("SELECT tenant_id, id, spec, managed_by FROM listeners WHERE tenant_id = ? AND id = ?",
                               (tenant_id, listener_id))

    async def listeners(self, tenant_id: str) -> list[Row]:
        """One tenant's listeners, oldest first."""
        return await self._rows("SELECT tenant_id, id, spec, managed_by FROM listeners WHERE tenant_id = ? "
                                "ORDER BY rowid", (tenant_id,))

    async def all_listeners(self) -> list[Row]:
        """Every tenant's listeners, oldest first: what the daemon reconciles against."""
        return await self._rows("SELECT tenant_id, id, spec, managed_by FROM listeners ORDER BY rowid", ())

    async def get_listener_stored(self, tenant_id: str, listener_id: str) -> tuple[bytes, str] | None:
        """One listener as stored: the definition's JSON bytes and managed-by, or None."""
        return await self.run(lambda c: c.execute("SELECT spec, managed_by FROM listeners WHERE tenant_id = ? AND "
                                                  "id = ?", (tenant_id, listener_id)).fetchone())

    async def all_listeners_stored(self) -> list[tuple[str, str, bytes, str]]:
        """Every tenant's listeners as stored (tenant id, id, the definition's JSON bytes, managed-by), oldest
        first: for a reader that parses only what changed since it last looked."""
        return await self.run(lambda c: c.execute("SELECT tenant_id, id, spec, managed_by FROM listeners "
                                                  "ORDER BY rowid").fetchall())

    async def put_listener(self, tenant_id: str, listener_id: str, body: dict[str, Any],
                           managed_by: str = "api") -> None:
        now = time.time()
        await self.transaction(lambda c: c.execute(
            "INSERT INTO listeners (tenant_id, id, spec, managed_by, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant_id, id) DO UPDATE SET spec = excluded.spec, managed_by = excluded.managed_by, "
            "updated_at = excluded.updated_at", (tenant_id, listener_id, orjson.dumps(body), managed_by, now, now)))

    async def insert_listener(self, tenant_id: str, listener_id: str | None, build: Callable[[str], dict[str, Any]],
                              managed_by: str = "api", max_count: int | None = None) -> str | None:
        """Insert a new listener in one transaction; None when the id is taken (never an upsert).

        With `max_count`, raise `TenantFull` when the tenant already has that many listeners (counted in the
        same transaction, so concurrent creates cannot overshoot it).

        Without an id, the next `LI<n>` is assigned: above every id this tenant ever had. `build(id)` gives
        the stored body for the id.
        """
        now = time.time()

        def put(c: sqlite3.Connection, new_id: str) -> bool:  # DO NOTHING: PostgreSQL aborts on a violation
            return c.execute("INSERT INTO listeners (tenant_id, id, spec, managed_by, created_at, updated_at) "
                             "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant_id, id) DO NOTHING",
                             (tenant_id, new_id, orjson.dumps(build(new_id)), managed_by, now, now)).rowcount == 1

        def insert(c: sqlite3.Connection) -> str | None:
            if max_count is not None:
                (count,) = c.execute("SELECT count(*) FROM listeners WHERE tenant_id = ?", (tenant_id,)).fetchone()
                if count >= max_count:
                    raise TenantFull(count)
            row = c.execute("SELECT last FROM listener_ids WHERE tenant_id = ?", (tenant_id,)).fetchone()
            last = row[0] if row else 0
            if listener_id is not None:
                new_id = listener_id
                if not put(c, new_id):
                    return None
            elif put(c, f"LI{last + 1}"):  # the usual case: one lookup by key, whatever the tenant's size
                new_id = f"LI{last + 1}"
            else:  # taken by a listener the counter has not seen (declared in the config): above every LI<n>
                ids = [r[0] for r in c.execute("SELECT id FROM listeners WHERE tenant_id = ? AND id GLOB 'LI[0-9]*'",
                                               (tenant_id,))]
                last = max([last, *(int(i[2:]) for i in ids if i[2:].isdigit())])
                new_id = f"LI{last + 1}"
                put(c, new_id)
            if new_id.startswith("LI") and new_id[2:].isdigit() and len(new_id) < 20:  # an INTEGER holds it
                last = max(last, int(new_id[2:]))
            c.execute("INSERT INTO listener_ids (tenant_id, last) VALUES (?, ?) ON CONFLICT (tenant_id) "
                      "DO UPDATE SET last = max(last, excluded.last)", (tenant_id, last))
            return new_id

        return await self.transaction(insert)

    async def delete_listener(self, tenant_id: str, listener_id: str) -> bool:
        """Delete a listener and its checkpoint in one transaction; False when there was none."""
        def delete(c: sqlite3.Connection) -> bool:
            c.execute("DELETE FROM checkpoints WHERE tenant_id = ? AND listener_id = ?", (tenant_id, listener_id))
            gone = c.execute("DELETE FROM listeners WHERE tenant_id = ? AND id = ?",
                             (tenant_id, listener_id)).rowcount > 0
            self._listeners_deleted(c, (tenant_id, listener_id))
            return gone

        return await self.transaction(delete)

    def _listeners_deleted(self, conn: sqlite3.Connection, key: tuple[str, str] | None) -> None:
        """In the transaction that deleted a listener (`key`) or replaced the config's listeners (None): what the
        backend keeps of listeners besides their rows goes too (PostgreSQL: cluster status records)."""

    async def get_integration(self, tenant_id: str, kind: str) -> Row | None:
        row = await self._one("SELECT tenant_id, type, fields, managed_by FROM integrations "
                              "WHERE tenant_id = ? AND type = ?", (tenant_id, kind))
        return self._opened(row) if row else None

    async def integrations(self, tenant_id: str) -> list[Row]:
        return [self._opened(r) for r in await self._rows(
            "SELECT tenant_id, type, fields, managed_by FROM integrations WHERE tenant_id = ? ORDER BY rowid",
            (tenant_id,))]

    async def all_integrations(self) -> list[Row]:
        return [self._opened(r) for r in await self._rows(
            "SELECT tenant_id, type, fields, managed_by FROM integrations ORDER BY rowid", ())]

    def _opened(self, row: Row) -> Row:
        """The row with its sealed secrets opened; one no configured key opens is logged and left out (the
        integration then fails validation and counts as absent: set it again through the API)."""
        if self.sealer is None:
            return row
        try:
            return row._replace(body=self.sealer.open(row.tenant_id, row.key, row.body))
        except SealError as exc:
            log.error("stored integration secrets cannot be opened; set the integration again",
                      tenant=row.tenant_id, type=row.key, problem=str(exc))
            return row._replace(body={k: v for k, v in row.body.items() if not str(v).startswith(PREFIX)})

    async def reseal(self) -> int:
        """Seal every API-made integration's secrets with the current key (plain ones from older versions,
        ones sealed with an old key after a rotation); how many rows were rewritten."""
        if self.sealer is None:
            return 0
        stale = [r for r in await self._rows("SELECT tenant_id, type, fields, managed_by FROM integrations "
                                             "WHERE managed_by = 'api'", ()) if self.sealer.stale(r.key, r.body)]
        for row in stale:
            await self.put_integration(row.tenant_id, row.key, self._opened(row).body)
        return len(stale)

    async def put_integration(self, tenant_id: str, kind: str, body: dict[str, Any], managed_by: str = "api") -> None:
        if self.sealer is not None:
            body = self.sealer.seal(tenant_id, kind, body)
        now = time.time()
        await self.transaction(lambda c: c.execute(
            "INSERT INTO integrations (tenant_id, type, fields, managed_by, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (tenant_id, type) DO UPDATE SET fields = excluded.fields, managed_by = excluded.managed_by, "
            "updated_at = excluded.updated_at", (tenant_id, kind, orjson.dumps(body), managed_by, now)))

    async def _one(self, sql: str, params: tuple[Any, ...]) -> Row | None:
        row = await self.run(lambda c: c.execute(sql, params).fetchone())
        return Row(row[0], row[1], orjson.loads(row[2]), row[3]) if row else None

    async def _rows(self, sql: str, params: tuple[Any, ...]) -> list[Row]:
        rows = await self.run(lambda c: c.execute(sql, params).fetchall())
        return [Row(t, k, orjson.loads(b), m) for t, k, b, m in rows]

    async def sync_config_objects(self, tenants: list[tuple[str, str]],
                                  integrations: list[tuple[str, str, dict]],
                                  listeners: list[tuple[str, str, dict]]) -> None:
        """Make the config-managed rows exactly the config's objects, in one transaction."""
        now = time.time()

        def sync(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM tenants WHERE managed_by = 'config'")
            c.executemany("INSERT OR REPLACE INTO tenants (id, name, managed_by) VALUES (?, ?, 'config')", tenants)
            c.execute("DELETE FROM integrations WHERE managed_by = 'config'")
            c.executemany("INSERT OR REPLACE INTO integrations (tenant_id, type, fields, managed_by, updated_at) "
                          "VALUES (?, ?, ?, 'config', ?)",
                          [(t, k, orjson.dumps(b), now) for t, k, b in integrations])
            c.execute("DELETE FROM listeners WHERE managed_by = 'config'")
            c.executemany("INSERT OR REPLACE INTO listeners (tenant_id, id, spec, managed_by, created_at, updated_at) "
                          "VALUES (?, ?, ?, 'config', ?, ?)",
                          [(t, k, orjson.dumps(b), now, now) for t, k, b in listeners])
            # a declared LI<n> counts as handed out: the API's next LI<n> is above it, even once it leaves the config
            c.executemany("INSERT INTO listener_ids (tenant_id, last) VALUES (?, ?) ON CONFLICT (tenant_id) "
                          "DO UPDATE SET last = max(last, excluded.last)",
                          [(t, int(k[2:])) for t, k, _ in listeners if k.startswith("LI") and k[2:].isdigit()
                           and len(k) < 20])
            self._listeners_deleted(c, None)

        await self.transaction(sync)

    # -- checkpoints

    async def get_checkpoint(self, tenant_id: str, listener_id: str) -> str | None:
        row = await self.run(lambda c: c.execute(
            "SELECT value FROM checkpoints WHERE tenant_id = ? AND listener_id = ?",
            (tenant_id, listener_id)).fetchone())
        return row[0] if row else None

    async def set_checkpoint(self, tenant_id: str, listener_id: str, value: str | None) -> None:
        def write(c: sqlite3.Connection) -> None:
            if value is None:
                c.execute("DELETE FROM checkpoints WHERE tenant_id = ? AND listener_id = ?", (tenant_id, listener_id))
            else:
                put_checkpoint(c, tenant_id, listener_id, value)

        await self.transaction(write)


class TenantFull(Exception):
    """A tenant has as many listeners as its bound allows (`insert_listener`'s `max_count`)."""

    def __init__(self, count: int):
        super().__init__(f"the tenant has {count} listeners")
        self.count = count


def put_checkpoint(conn: sqlite3.Connection, tenant_id: str, listener_id: str, value: str) -> None:
    conn.execute("INSERT INTO checkpoints (tenant_id, listener_id, value, updated_at) VALUES (?, ?, ?, ?) "
                 "ON CONFLICT (tenant_id, listener_id) DO UPDATE SET value = excluded.value, "
                 "updated_at = excluded.updated_at", (tenant_id, listener_id, value, time.time()))


def in_transaction(conn: sqlite3.Connection, fn: Callable[[sqlite3.Connection], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn(conn)
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
    return result


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to the newest version; returns it. Refuses a database from the future."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):
        path = conn.execute("PRAGMA database_list").fetchone()[2] or ":memory:"
        raise StoreUnavailable(path, f"schema version {version} is newer than this listenerd (knows up to "
                                     f"{len(MIGRATIONS)})", "upgrade listenerd, or restore a backup this version wrote")
    for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in filter(str.strip, script.split(";")):
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    return len(MIGRATIONS)

