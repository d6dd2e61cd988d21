"""A damaged, unreadable or missing store at start: `listenerd run` (and `dev`) exit 1 with one line.

Every case is a real file and the real CLI in a subprocess: the line names the path, the problem and
what to do, and no traceback follows it. Read-only cases need root's own tools (chmod does not stop
root): the immutable attribute (`chattr +i`) and a read-only tmpfs mount; a test skips when the
machine cannot do that.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from listenerd.store import MIGRATIONS, Store
from tests.daemon import DaemonProcess, base_config

DEAD_ENGINE = "http://127.0.0.1:9/events"  # never reached: these daemons start and stop, or do not start


def config_for(tmp_path: Path, store: Path, extra_store: str = "") -> Path:
    text = base_config(tmp_path, DEAD_ENGINE).replace(f'path = "{tmp_path / "listenerd.db"}"',
                                                       f'path = "{store}"\n{extra_store}')
    assert f'path = "{store}"' in text
    path = tmp_path / "listenerd.toml"
    path.write_text(text)
    return path


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "listenerd", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def assert_refused(tmp_path: Path, store: Path, *words: str) -> str:
    """`listenerd run` exits 1, with one line on stderr naming the store and saying `words`."""
    done = run_cli("run", "--config", str(config_for(tmp_path, store)))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert str(store) in lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def make_store(path: Path, events: int = 50) -> None:
    """A real store with some outbox rows in it."""
    async def build() -> None:
        store = Store(str(path))
        await store.open()
        await store.put_listener("t", "LI1", {"id": "LI1", "note": "x" * 5000})
        await store.close()
    asyncio.run(build())
    conn = sqlite3.connect(path)
    conn.executemany("INSERT INTO dead_letters (tenant_id, listener_id, status_code, response, failed_at, events) "
                     "VALUES ('t', 'LI1', 400, 'no', 0, ?)", [(b"[" + b"1," * 2000 + b"1]",) for _ in range(events)])
    conn.commit()
    conn.close()


def test_truncated_store(tmp_path):
    store = tmp_path / "listenerd.db"
    make_store(store)
    os.truncate(store, store.stat().st_size // 2)
    assert_refused(tmp_path, store, "is damaged", "restore it from a backup", f"sqlite3 {store} .recover")


def test_random_bytes(tmp_path):
    store = tmp_path / "listenerd.db"
    store.write_bytes(os.urandom(64 * 1024))
    assert_refused(tmp_path, store, "is not a SQLite database", "restore the store from a backup")


def test_a_damaged_page_that_leaves_the_header_whole(tmp_path):
    store = tmp_path / "listenerd.db"
    make_store(store)
    conn = sqlite3.connect(store)
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'listeners'").fetchone()[0]
    conn.close()
    with open(store, "r+b") as f:  # scribble over the listeners table's b-tree page
        f.seek((root - 1) * page_size)
        f.write(b"\xa5" * page_size)
    assert_refused(tmp_path, store, "is damaged", ".recover")


def test_a_directory_at_the_path(tmp_path):
    store = tmp_path / "listenerd.db"
    store.mkdir()
    assert_refused(tmp_path, store, "is a directory")


def test_a_newer_schema(tmp_path):
    store = tmp_path / "listenerd.db"
    make_store(store)
    conn = sqlite3.connect(store)
    conn.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    conn.close()
    assert_refused(tmp_path, store, "newer than this listenerd", "upgrade listenerd")


@contextlib.contextmanager
def immutable(path: Path):
    """`chattr +i`: read-only even for root; skips the test where the file system cannot do it."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_read_only_file(tmp_path):
    store = tmp_path / "listenerd.db"
    make_store(store)
    with immutable(store):
        assert_refused(tmp_path, store, "is not writable", "readable and writable by the user")


def test_a_read_only_directory(tmp_path):
    directory = tmp_path / "state"
    directory.mkdir()
    store = directory / "listenerd.db"
    make_store(store)
    with immutable(directory):
        assert_refused(tmp_path, store, f"directory {directory} is not writable", "-wal and -shm")


def test_a_read_only_file_system(tmp_path):
    mount = tmp_path / "volume"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = mount / "listenerd.db"
        make_store(store)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        assert_refused(tmp_path, store, "read-only file system", "mount the volume read-write")
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_missing_directory_is_not_created(tmp_path):
    store = tmp_path / "volume" / "listenerd.db"  # as if the volume had not mounted
    assert_refused(tmp_path, store, f"directory {tmp_path / 'volume'} does not exist", "mount the volume",
                   "create-directory = true")
    assert not store.parent.exists()


async def started_and_stopped(tmp_path: Path, store: Path, extra_store: str = "", env: dict | None = None) -> list:
    """Start the daemon on `store`, stop it; its log lines."""
    config = config_for(tmp_path, store, extra_store).read_text()
    daemon = DaemonProcess(tmp_path, config, env=env)
    async with daemon:
        pass
    assert daemon.process is not None and daemon.process.returncode == 0
    return daemon.lines(since_start=True)


async def test_a_missing_directory_is_created_when_the_config_says_so(tmp_path):
    store = tmp_path / "volume" / "listenerd.db"
    lines = await started_and_stopped(tmp_path, store, "create-directory = true")
    new, = [line for line in lines if line["event"].startswith("new store")]
    assert new["path"] == str(store) and new["schema"] == len(MIGRATIONS)
    assert new["directory_created"] == "[store] create-directory"
    lines = await started_and_stopped(tmp_path, store, "create-directory = true")
    assert not [line for line in lines if line["event"].startswith("new store")]  # only the first time


async def test_a_missing_state_directory_is_created(tmp_path):
    store = tmp_path / "state" / "listenerd.db"
    lines = await started_and_stopped(tmp_path, store, env={"STATE_DIRECTORY": str(tmp_path / "state")})
    new, = [line for line in lines if line["event"].startswith("new store")]
    assert new["directory_created"] == "systemd StateDirectory"


async def test_dev_refuses_a_damaged_store_in_one_line(tmp_path):
    store = tmp_path / "listenerd.db"
    store.write_bytes(os.urandom(64 * 1024))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "listenerd", "--log-format", "json", "dev", "--listen", "127.0.0.1:0", "--dir",
        str(tmp_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 1
    text = (out + err).decode()
    assert "Traceback" not in text
    refused = [line for line in text.splitlines() if "could not start" in line]
    assert len(refused) == 1 and str(store) in refused[0] and "is not a SQLite database" in refused[0]
