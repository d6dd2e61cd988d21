"""A real PostgreSQL for tests and benchmarks, and a fresh database in it for each user.

The server is the one at 127.0.0.1:5432 when it answers (as on machines that provide one: trust
auth, role `postgres`), else a throwaway cluster started here from the installed binaries
(`/usr/lib/postgresql/<n>/bin`: initdb and pg_ctl in a temporary directory, on a free loopback
port, as `nobody` when run as root, since PostgreSQL refuses to run as root). Never a skip: with
neither, `start` raises and says to install Debian's `postgresql` (as `.ci/run` does).

`LISTENERD_TEST_POSTGRES=throwaway` forces the throwaway cluster; `LISTENERD_TEST_POSTGRES=<url>`
names another server (an admin URL whose role may create databases).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

LOCAL = "postgresql://postgres@127.0.0.1:5432/test"


def answers(url: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=2, autocommit=True) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def binaries() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian's layout), or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


class Postgres:
    """A PostgreSQL server to make databases in: `start()`, `database()` (a URL), `stop()`."""

    def __init__(self, mode: str | None = None):
        self.mode = mode if mode is not None else os.environ.get("LISTENERD_TEST_POSTGRES", "")
        self.admin_url = ""
        self.throwaway: Path | None = None
        self.port = 0
        self._databases: list[str] = []

    def start(self) -> Postgres:
        if self.mode and self.mode != "throwaway":
            self.admin_url = self.mode
        elif self.mode != "throwaway" and answers(LOCAL):
            self.admin_url = LOCAL
        else:
            self._start_throwaway()
        return self

    def _start_throwaway(self) -> None:
        bin_dir = binaries()
        if bin_dir is None:
            raise RuntimeError("no PostgreSQL answers on 127.0.0.1:5432 and none is installed: "
                               "apt-get install postgresql (what .ci/run does)")
        self.throwaway = Path(tempfile.mkdtemp(prefix="listenerd-pg-"))
        data, sockets = self.throwaway / "data", self.throwaway / "run"
        sockets.mkdir()
        as_user: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.throwaway, "nobody")
            shutil.chown(sockets, "nobody")
            os.chmod(self.throwaway, 0o755)
            as_user = ["runuser", "-u", "nobody", "--"]
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True, timeout=120)
        self.port = _free_port()
        options = f"-p {self.port} -k {sockets} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l",
                        str(self.throwaway / "log"), "-w", "-t", "60", "start"], check=True, capture_output=True,
                       timeout=90)
        self.admin_url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_user = as_user
        self._bin = bin_dir

    def restart(self) -> None:
        """Restart the throwaway server (`pg_ctl restart -m fast`): what a database failover looks like to
        its clients, every connection dropped. Blocking: call it from a thread in an event loop."""
        assert self.throwaway is not None, "only a throwaway cluster is restarted"
        subprocess.run([*self._as_user, str(self._bin / "pg_ctl"), "-D", str(self.throwaway / "data"), "-m", "fast",
                        "-l", str(self.throwaway / "log"), "-w", "-t", "60", "restart"], check=True,
                       capture_output=True, timeout=90)

    def database(self) -> str:
        """A new empty database with a random name; its URL. Dropped by `drop` or `stop`."""
        import psycopg

        name = "listenerd_test_" + secrets.token_hex(6)
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._databases.append(name)
        return with_database(self.admin_url, name)

    def drop(self, url: str) -> None:
        import psycopg

        name = urlsplit(url).path.lstrip("/")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        with contextlib.suppress(ValueError):
            self._databases.remove(name)

    def stop(self) -> None:
        for name in list(self._databases):
            with contextlib.suppress(Exception):
                self.drop(with_database(self.admin_url, name))
        if self.throwaway is not None:
            subprocess.run([*self._as_user, str(self._bin / "pg_ctl"), "-D", str(self.throwaway / "data"), "-m",
                            "immediate", "-w", "stop"], capture_output=True, timeout=60)
            shutil.rmtree(self.throwaway, ignore_errors=True)
            self.throwaway = None

    def __enter__(self) -> Postgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
