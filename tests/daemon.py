"""Run the whole daemon for tests: in-process (`running_daemon`) or as a real subprocess (`DaemonProcess`).

Both listen on 127.0.0.1 port 0; the subprocess's address is read from its JSON log line
"listenerd ready", so tests never race for ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from listenerd import config as config_module
from listenerd.daemon import Daemon
from listenerd.systemd import Notifier
from tests.harness import wait_for

TOKEN = "test-token-0123456789"
OTHER_TOKEN = "other-token-0123456789"


def base_config(tmp_path: Path, engine_url: str, tenants: str = "", extra: str = "") -> str:
    """A config with two tokens: TOKEN for every tenant, OTHER_TOKEN for tenant `other` only."""
    return f"""
[server]
listen = "127.0.0.1:0"

[[server.tokens]]
name = "ops"
token = "{TOKEN}"

[[server.tokens]]
name = "other"
token = "{OTHER_TOKEN}"
tenants = ["other"]

[engine]
url = "{engine_url}"
linger-ms = 5
retry-initial = 0.05
retry-max = 0.5

[store]
path = "{tmp_path / 'listenerd.db'}"

[supervisor]
backoff-initial = 0.05
backoff-max = 0.5
stop-timeout = 3

[[tenants]]
id = "other"
{extra}
{tenants}
"""


class Api:
    """A small client for the daemon's API."""

    def __init__(self, base_url: str, token: str | None = TOKEN):
        self.base_url = base_url
        self.token = token
        self.session = aiohttp.ClientSession()

    async def close(self) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body: Any = None, token: str | None | bool = True,
                   raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
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


@contextlib.asynccontextmanager
async def running_daemon(tmp_path: Path, text: str, env: dict | None = None,
                         notifier: Notifier | None = None) -> AsyncIterator[tuple[Daemon, Api]]:
    path = tmp_path / "listenerd.toml"
    path.write_text(text)
    cfg = config_module.load(path, env or {})
    daemon = Daemon(cfg, str(path), notifier=notifier or Notifier(None))
    await daemon.start()
    api = Api(daemon.api_url)
    try:
        yield daemon, api
    finally:
        await api.close()
        await daemon.stop()


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, so a killed run leaves no daemon behind (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class DaemonProcess:
    """`python -m listenerd run --config ...` as a child process, with its JSON log captured."""

    def __init__(self, tmp_path: Path, text: str, env: dict | None = None, name: str = "daemon",
                 scripted: bool = False):
        self.config_path = tmp_path / f"{name}.toml"
        self.config_path.write_text(text)
        self.log_path = tmp_path / f"{name}.log"
        self.env = {**os.environ, **(env or {})}
        if "NOTIFY_SOCKET" not in (env or {}):
            self.env.pop("NOTIFY_SOCKET", None)
        self.entry = [sys.executable, str(Path(__file__).with_name("scripted_daemon.py"))] if scripted else \
            [sys.executable, "-m", "listenerd"]
        self.process: subprocess.Popen[bytes] | None = None
        self.api_url: str | None = None
        self._log_offset = 0

    async def start(self, timeout: float = 30.0) -> str:
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
                self.process.kill()
                raise AssertionError("daemon did not exit in time")
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def stop(self) -> int:
        if self.process and self.process.poll() is None:
            self.signal(signal.SIGTERM)
            return await self.wait_exit()
        return self.process.returncode if self.process else 0
