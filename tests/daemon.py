"""Run the whole daemon for tests: in-process (`running_daemon`) or as a real subprocess (`DaemonProcess`).

Both listen on 127.0.0.1 port 0. The subprocess and the API client live in `listenerd.testing` (the
benchmarks use them too); this module adds the suite's tokens, its base config and the scripted build.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from listenerd import config as config_module
from listenerd import testing
from listenerd.daemon import Daemon
from listenerd.systemd import Notifier

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


def with_egress(text: str, egress: str) -> str:
    """`base_config`'s text with a `[server.egress]` table (`egress`: its keys, one per line)."""
    return text.replace("[engine]", f"[server.egress]\n{egress}\n\n[engine]", 1)


LOOPBACK_EGRESS = 'hosts = ["localhost"]\nnetworks = ["127.0.0.1/32", "::1/128"]\nplaintext = true'


class Api(testing.Api):
    """The API client, with the suite's ops token unless told otherwise."""

    def __init__(self, base_url: str, token: str | None = TOKEN):
        super().__init__(base_url, token)


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


SCRIPTED = (sys.executable, str(Path(__file__).with_name("scripted_daemon.py")))


class DaemonProcess(testing.DaemonProcess):
    """The daemon child process; `scripted=True` runs tests/scripted_daemon.py (ticking sources) instead."""

    def __init__(self, tmp_path: Path, text: str, env: dict | None = None, name: str = "daemon",
                 scripted: bool = False):
        super().__init__(tmp_path, text, env, name, entry=SCRIPTED if scripted else testing.DAEMON)
