"""Helpers shared by the test suite and the benchmarks: polling, spec builders, the daemon as a child process,
a killed daemon's store read without changing it, a small tmpfs to fill.

Why in the package: `tests/` and `bench/` both drive listenerd the same way, and neither should import
the other (as aiohttp ships `aiohttp.test_utils`). Nothing here runs in production; it imports only
public pieces of listenerd, so the daemon never depends on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp

from listenerd.delivery.segments import stored_envelopes
from listenerd.model import Integration, ListenerBase, load_integration, load_listener


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01,
                   what: str = "condition") -> Any:
    """Poll `predicate` (plain or async) until truthy and return its value; fail with `what` after `timeout` s.

    Why polling: tests and scenarios then wait exactly as long as the event takes, never a fixed sleep.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


def listener(**fields: Any) -> ListenerBase:
    """A listener definition from its config fields (managed by config unless told otherwise)."""
    managed_by = fields.pop("managed-by", "config")
    return load_listener(fields, managed_by)


def integration(source_type: str, **fields: Any) -> Integration:
    """An integration (credentials) of `source_type` from its config fields (managed by config unless told)."""
    managed_by = fields.pop("managed-by", "config")
    return load_integration(source_type, fields, managed_by)


class Api:
    """A small client for the daemon's API, bearer token included."""

    def __init__(self, base_url: str, token: str | None = None):
        self.base_url = base_url
        self.token = token
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def call(self, method: str, path: str, body: Any = None, token: str | None | bool = True,
                   raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        """(status, JSON body or text); `token=True` sends this client's token, a string sends that one."""
        hdrs = dict(headers or {})
        use = self.token if token is True else token
        if use:
            hdrs["Authorization"] = f"Bearer {use}"
        kwargs: dict[str, Any] = {"headers": hdrs}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self.session.request(method, self.base_url + path, **kwargs) as response:
            text = await response.text()
            try:
                return response.status, json.loads(text) if text else None
            except ValueError:
                return response.status, text

    async def page(self, path: str, token: str | None | bool = True) -> tuple[int, Any, str | None]:
        """(status, JSON body, the next page's path from the Link header or None) of a GET of a list."""
        hdrs = {}
        use = self.token if token is True else token
        if use:
            hdrs["Authorization"] = f"Bearer {use}"
        async with self.session.get(self.base_url + path, headers=hdrs) as response:
            body = await response.json(content_type=None)
            link = response.headers.get("Link")
            if link is None:
                return response.status, body, None
            target, _, relation = link.partition(">; ")
            assert relation == 'rel="next"' and target.startswith("<"), link
            return response.status, body, target[1:]

    async def every_page(self, path: str) -> list[list[Any]]:
        """Each page of a list, following the Link headers from `path` to the last page."""
        pages: list[list[Any]] = []
        next_path: str | None = path
        while next_path is not None:
            code, body, next_path = await self.page(next_path)
            assert code == 200, (code, body)
            pages.append(body)
        return pages

    async def status(self, tenant: str, listener: str) -> dict:
        code, body = await self.call("GET", f"/1.0/tenants/{tenant}/listeners/{listener}/status")
        assert code == 200, (code, body)
        return body

    async def wait_status(self, tenant: str, listener: str, want: str, timeout: float = 15.0) -> dict:
        last: dict = {}

        async def check() -> bool:
            nonlocal last
            last = await self.status(tenant, listener)
            return last["status"] == want

        try:
            await wait_for(check, timeout=timeout, interval=0.05, what=f"{tenant}/{listener} {want}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last status {last}") from None
        return last


def _die_with_parent() -> None:
    """In the child: SIGKILL when the parent dies, so a killed run leaves no daemon behind (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


DAEMON = (sys.executable, "-m", "listenerd")


class DaemonProcess:
    """`listenerd run --config ...` as a child process, with its JSON log captured in `<name>.log`.

    The API address is read from the log line "listenerd ready" (the config listens on port 0), so
    callers never race for ports. `entry` replaces `python -m listenerd` (a scripted build of it).
    """

    def __init__(self, workdir: Path, text: str, env: dict | None = None, name: str = "daemon",
                 entry: tuple[str, ...] | list[str] = DAEMON):
        self.config_path = workdir / f"{name}.toml"
        self.config_path.write_text(text)
        self.log_path = workdir / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        if "NOTIFY_SOCKET" not in (env or {}):
            self.env.pop("NOTIFY_SOCKET", None)
        self.entry = list(entry)
        self.process: subprocess.Popen[bytes] | None = None
        self.api_url: str | None = None
        self._log_offset = 0

    async def start(self, timeout: float = 30.0) -> str:
        """Start (or start again after a kill) and wait for "listenerd ready"; returns the API URL."""
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115, ASYNC230 - the child owns it
        argv = [*self.entry, "--log-format", "json", "run", "--config", str(self.config_path)]
        self.process = subprocess.Popen(argv, stdout=log, stderr=log, env=self.env,  # noqa: ASYNC220
                                        preexec_fn=_die_with_parent)
        log.close()
        ready = await wait_for(lambda: self._find("listenerd ready") or self._exited(), timeout=timeout,
                               interval=0.05, what="daemon ready")
        if ready == "exited":
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
        self.api_url = ready["api"]
        return self.api_url

    async def __aenter__(self) -> DaemonProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def _exited(self) -> str | None:
        return "exited" if self.process and self.process.poll() is not None else None

    def _find(self, event: str) -> dict | None:
        for line in self.lines(since_start=True):
            if line.get("event") == event:
                return line
        return None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def lines(self, since_start: bool = False) -> list[dict]:
        """The log as JSON objects; a line that is not JSON becomes {"event": "NOT JSON", "raw": ...}."""
        text = self.log_text()[self._log_offset:] if since_start else self.log_text()
        out = []
        for raw in text.splitlines():
            try:
                out.append(json.loads(raw))
            except ValueError:
                out.append({"event": "NOT JSON", "raw": raw})
        return out

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    async def wait_exit(self, timeout: float = 30.0) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.send_signal(signal.SIGUSR1)  # its log then says where each task waits
                await asyncio.sleep(1.0)
                self.process.kill()
                raise AssertionError(f"daemon did not exit in time; where its tasks waited: {self.log_path}")
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def stop(self) -> int:
        """SIGTERM and wait; returns the exit code (also when it had already exited)."""
        if self.process and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            return await self.wait_exit()
        return self.process.returncode if self.process else 0


# ---------------------------------------------------------------- a killed daemon's store, read without changing it

WAL_SUFFIXES = ("", "-wal", "-shm")


@contextlib.contextmanager
def store_snapshot(db_path: str | Path) -> Iterator[sqlite3.Connection]:
    """A connection to a copy of the store at `db_path` (its `-wal` and `-shm` too), for reading after a kill.

    Why a copy: the last connection to close a WAL database checkpoints it and deletes `-wal` and
    `-shm`, so reading the store in place would hand the restarted daemon an already recovered
    store, and no crash test would ever exercise WAL recovery. `immutable=1` would leave the files
    alone but ignores the WAL, missing events committed only there. The copy, opened normally,
    recovers exactly as the restarted daemon will and sees every committed transaction; the
    originals keep their bytes and mtimes. Only for a store no process is writing (killed or stopped).
    """
    source = Path(db_path)
    with tempfile.TemporaryDirectory(prefix="listenerd-snapshot-") as tmp:
        copy = Path(tmp) / source.name
        for suffix in WAL_SUFFIXES:
            original = source.with_name(source.name + suffix)
            if original.exists():
                shutil.copyfile(original, copy.with_name(copy.name + suffix))
        if not copy.exists():
            raise FileNotFoundError(f"no store at {source}")
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            yield conn


def snapshot_envelopes(db_path: str | Path) -> list[bytes]:
    """Every envelope (JSON bytes) waiting in the outbox of the store at `db_path`, read from a snapshot."""
    with store_snapshot(db_path) as conn:
        return stored_envelopes(conn)


# ---------------------------------------------------------------- a small filesystem that can be filled


class Tmpfs:
    """A tmpfs of `size_mb` MiB mounted at `path` for the life of a `with` block (root only, Linux).

    Why: a full disk is a real fault only on a real filesystem; a small tmpfs fills in a second and
    leaves nothing behind. `fill()` writes a filler file until the filesystem refuses (ENOSPC),
    `unfill()` removes it. Leaving the block removes the filler and unmounts, lazily if a process
    still holds a file there, so a failed run never leaves a mount behind.
    """

    FILLER = ".filler"

    def __init__(self, path: str | Path, size_mb: int = 30):
        self.path = Path(path)
        self.size_mb = size_mb
        self.mounted = False

    @staticmethod
    def available() -> str | None:
        """None when this process can mount a tmpfs, else why not (for a test's skip reason)."""
        if not sys.platform.startswith("linux"):
            return "tmpfs mounts need Linux"
        if os.geteuid() != 0:
            return "mounting a tmpfs needs root"
        if shutil.which("mount") is None or shutil.which("umount") is None:
            return "mount/umount not found"
        return None

    def __enter__(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m,mode=0700", "tmpfs", str(self.path)],
                       check=True, capture_output=True, timeout=30)
        self.mounted = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self.mounted:
            return
        with contextlib.suppress(OSError):
            self.unfill()
        done = subprocess.run(["umount", str(self.path)], capture_output=True, timeout=30)
        if done.returncode != 0:  # busy (a child still holds a file): detach now, freed when it lets go
            subprocess.run(["umount", "-l", str(self.path)], check=True, capture_output=True, timeout=30)
        self.mounted = False

    @property
    def filler(self) -> Path:
        return self.path / self.FILLER

    def free_bytes(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def fill(self) -> int:
        """Write the filler until the filesystem is full; returns its size in bytes."""
        written = 0
        with open(self.filler, "ab", buffering=0) as out:
            for chunk in (1 << 20, 1 << 16, 1 << 12):  # big steps first, then the last pages
                block = b"\0" * chunk
                while True:
                    try:
                        written += out.write(block) or 0
                    except OSError as exc:
                        if exc.errno != errno.ENOSPC:
                            raise
                        break
        return written

    def unfill(self) -> None:
        """Remove the filler: the space is free again at once (nothing holds it open)."""
        self.filler.unlink(missing_ok=True)


class InjectedDiskFull:
    """Stands in for an open store's connection: while `full`, every write fails with SQLite's disk-full error.

    For unit tests of the paths a full disk takes (commit, ack, dead letter, API writes) without a
    mount; reads keep working, as they do on a full disk. `install(store)` after `store.open()`.
    """

    WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn
        self.full = False
        self.refused = 0  # writes refused so far

    @classmethod
    def install(cls, store: Any) -> InjectedDiskFull:
        fault = cls(store._conn)
        store._conn = fault
        return fault

    def _check(self, sql: str) -> None:
        if self.full and sql.lstrip()[:6].upper() in self.WRITES:
            self.refused += 1
            raise sqlite3.OperationalError("database or disk is full")

    def execute(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.execute(sql, *args)

    def executemany(self, sql: str, *args: Any) -> sqlite3.Cursor:
        self._check(sql)
        return self._conn.executemany(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)
