"""kill -9 under load, then a restart that must recover from the WAL: as the kill left it, and with `-shm` gone.

The crash runner (crash_runner.py) writes its store in WAL mode, so at a kill the latest commits are
only in `crash.db-wal`. The test reads the killed store through `store_snapshot` (a copy: reading in
place would checkpoint and delete the WAL, and the restart would recover nothing), checks that the
originals are untouched and that the WAL holds commits the main file lacks (else nothing is tested),
then restarts on the files as they are, (a) `-wal` and `-shm` kept, (b) `-shm` removed (SQLite rebuilds
the index from the WAL). Committed = acknowledged to the source, seen at the engine before the kill, or
waiting in the snapshot's outbox; every committed event must reach the engine, each under one id.
"""

import contextlib
import sqlite3

import orjson
import pytest

from listenerd.delivery.segments import stored_envelopes
from listenerd.sim.engine import EngineSim
from listenerd.testing import store_snapshot
from tests.integration.crash_runner import drain_after_restart, kill_under_load, read_acked, reap, spawn

TOTAL = 600
LISTENERS = ("A", "B")


def fingerprint(db):
    files = [db.with_name(db.name + suffix) for suffix in ("", "-wal", "-shm")]
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()}


def committed_view(conn):
    """(waiting envelopes by (listener, n), checkpoints) of a store connection; empty for a store without tables."""
    try:
        envelopes = [orjson.loads(body) for body in stored_envelopes(conn)]
        checkpoints = dict(conn.execute("SELECT listener_id, CAST(value AS INTEGER) FROM checkpoints"))
    except sqlite3.OperationalError:  # the main file alone may not even hold the schema yet
        return {}, {}
    return {(e["listener-id"], e["event"]["n"]): e["id"] for e in envelopes}, checkpoints


def main_file_only(db):
    """What the main database file holds without its WAL (`immutable=1` reads the file alone, changing nothing)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?immutable=1", uri=True)) as conn:
        return committed_view(conn)


@pytest.mark.parametrize("shm", ["kept", "removed"])
async def test_kill_9_under_load_restart_recovers_every_committed_event_from_the_wal(tmp_path, started, shm):
    engine = await started(EngineSim())
    engine.delay = 0.03  # a slow engine: a backlog waits in the outbox at the kill
    db, acked_path = tmp_path / "crash.db", tmp_path / "acked.txt"
    runner = await spawn(db, engine.url, acked_path, TOTAL, LISTENERS)
    try:
        await kill_under_load(runner, acked_path, engine)
        acked_before = read_acked(acked_path)
        before_kill = {(e["listener-id"], e["event"]["n"]): e["id"] for e in engine.received}
        assert len(acked_before) < 2 * TOTAL, "the stream ended before the kill; nothing was tested"

        files = fingerprint(db)
        assert files.get("crash.db-wal", (0,))[0] > 0, "the kill left no WAL; nothing was tested"
        with store_snapshot(db) as conn:
            waiting, checkpoints = committed_view(conn)
        assert fingerprint(db) == files, "reading the killed store changed its files"
        assert waiting, "no backlog at the kill; nothing was tested"
        assert main_file_only(db) != (waiting, checkpoints), "every commit was already in the main file: no WAL test"
        for lid in LISTENERS:  # the resume point never lags what the source side was told is safe
            assert checkpoints[lid] >= max(n for who, n in acked_before if who == lid)
        print(f"at the kill: {len(acked_before)} acknowledged, {len(before_kill)} delivered, {len(waiting)} waiting; "
              f"files {files}")

        if shm == "removed":
            db.with_name("crash.db-shm").unlink()
        engine.delay = 0.0
        runner = await spawn(db, engine.url, acked_path, TOTAL, LISTENERS)
        want = {(lid, n) for lid in LISTENERS for n in range(TOTAL)}
        await drain_after_restart(runner, engine, want)
    finally:
        await reap(runner)

    ids: dict[tuple[str, int], set[str]] = {}
    for envelope in engine.received:
        ids.setdefault((envelope["listener-id"], envelope["event"]["n"]), set()).add(envelope["id"])
    committed = acked_before | set(before_kill) | set(waiting)
    lost = committed - set(ids)
    assert not lost, f"{len(lost)} committed events lost: {sorted(lost)[:10]}"
    assert all(len(v) == 1 for v in ids.values()), "one event delivered under two ids"
    for key, event_id in {**before_kill, **waiting}.items():  # recovered from the WAL under the id committed there
        assert ids[key] == {event_id}
    with store_snapshot(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
