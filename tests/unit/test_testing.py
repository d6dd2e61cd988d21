"""`listenerd.testing.store_snapshot`: reading a killed daemon's store leaves its WAL as the kill left it.

A child process writes in WAL mode and SIGKILLs itself, as `kill -9` leaves a daemon's store: the
committed rows are only in `-wal`. The snapshot must see them, and the originals must keep their
bytes and mtimes (the bug it replaces: a plain connect-and-close checkpointed and deleted the WAL, so
every crash test restarted on an already recovered store).
"""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys

import pytest

from listenerd.testing import Tmpfs, store_snapshot

WRITER = """
import os, signal, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("PRAGMA journal_mode=WAL")
conn.execute("PRAGMA wal_autocheckpoint=0")
conn.execute("CREATE TABLE t (n INTEGER)")
for n in range(int(sys.argv[2])):
    conn.execute("INSERT INTO t VALUES (?)", (n,))
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_writer(path, rows=50):
    done = subprocess.run([sys.executable, "-c", WRITER, str(path), str(rows)], timeout=30)
    assert done.returncode == -signal.SIGKILL
    return path


def fingerprint(path):
    files = [path.with_name(path.name + suffix) for suffix in ("", "-wal", "-shm")]
    return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()}


def test_snapshot_sees_rows_committed_only_in_the_wal_and_leaves_the_files_as_they_were(tmp_path):
    db = killed_writer(tmp_path / "killed.db")
    before = fingerprint(db)
    assert before["killed.db-wal"][0] > 0 and "killed.db-shm" in before, "the kill left no WAL; nothing to test"
    with store_snapshot(db) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 50
    assert fingerprint(db) == before
    with store_snapshot(db) as conn:  # twice: still all there (nothing was consumed)
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 50


def test_snapshot_without_the_shm_rebuilds_the_index_from_the_wal(tmp_path):
    db = killed_writer(tmp_path / "noshm.db")
    db.with_name("noshm.db-shm").unlink()
    with store_snapshot(db) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 50
    assert not db.with_name("noshm.db-shm").exists()


def test_reading_in_place_is_what_destroyed_the_wal(tmp_path):
    """Why the snapshot exists: the old reader's connect-and-close checkpoints and deletes the WAL."""
    db = killed_writer(tmp_path / "inplace.db")
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("SELECT count(*) FROM t").fetchone()
    assert not db.with_name("inplace.db-wal").exists()


def test_snapshot_of_a_missing_store_says_so(tmp_path):
    with pytest.raises(FileNotFoundError), store_snapshot(tmp_path / "absent.db"):
        pass


@pytest.mark.skipif(Tmpfs.available() is not None, reason=str(Tmpfs.available()))
def test_tmpfs_fills_unfills_and_never_stays_mounted(tmp_path):
    mount = tmp_path / "small"
    with Tmpfs(mount, size_mb=2) as fs:
        assert os.path.ismount(mount)
        assert fs.fill() > 1_000_000
        assert fs.free_bytes() == 0
        with pytest.raises(OSError), open(mount / "more", "wb") as more:
            more.write(b"x" * 8192)
        fs.unfill()
        assert fs.free_bytes() > 1_000_000
        fs.fill()
    assert not os.path.ismount(mount)
    with contextlib.suppress(RuntimeError), Tmpfs(mount, size_mb=1):
        raise RuntimeError("a failing block")
    assert not os.path.ismount(mount)
    with Tmpfs(mount, size_mb=1):
        held = open(mount / "held", "w")  # noqa: SIM115 - a file still open at the unmount: busy
    try:
        assert not os.path.ismount(mount)  # detached lazily all the same
    finally:
        held.close()
