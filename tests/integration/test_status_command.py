"""`listenerd status` against a running daemon: the table, its order, --json, exit codes, and its one-line errors."""

from __future__ import annotations

import asyncio
import io
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest
from rich.console import Console

from listenerd import status_cli
from listenerd.outcome import Ended, Fail
from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from tests.daemon import OTHER_TOKEN, TOKEN, base_config, running_daemon
from tests.harness import wait_for

KEY, SECRET = "status-app-key", "status-app-secret-value"


def tenants(pusher: PusherSim) -> str:
    """t1: P0 held in `starting`, P1 started, P2 disabled; t2: Q1 retrying against a port nobody listens on."""
    return f"""
[[tenants]]
id = "t1"
[tenants.integrations.pusher]
key = "{KEY}"
secret = "{SECRET}"
app-id = "1"
host = "127.0.0.1"
port = {pusher.port}
tls = false
[[tenants.listeners]]
id = "P1"
type = "pusher"
options = {{ channel = "orders" }}
[[tenants.listeners]]
id = "P0"
type = "pusher"
options = {{ channel = "held" }}
[[tenants.listeners]]
id = "P2"
type = "pusher"
status = false
options = {{ channel = "off" }}

[[tenants]]
id = "t2"
[tenants.integrations.pusher]
key = "{KEY}"
secret = "{SECRET}"
app-id = "1"
host = "127.0.0.1"
port = 9
tls = false
[[tenants.listeners]]
id = "Q1"
type = "pusher"
options = {{ channel = "nowhere" }}
"""


@pytest.fixture
async def daemon(tmp_path):
    async with EngineSim() as engine, PusherSim("1", KEY, SECRET) as pusher:
        pusher.hold_subscriptions("held")
        async with running_daemon(tmp_path, base_config(tmp_path, engine.url, tenants(pusher))) as (d, api):
            await api.wait_status("t1", "P1", "started")
            await api.wait_status("t2", "Q1", "retrying")
            await pusher.publish("orders", "order.created", {"id": 1})
            await wait_for(lambda: d.supervisor.status(("t1", "P1")).received >= 1, what="an event for P1")
            yield d, pusher


async def run(*args: str, width: int = 160, terminal: bool = False, **options) -> tuple[int, str, str]:
    """status_cli.status in a thread (it is a blocking client; the daemon runs in this loop)."""
    out, err = io.StringIO(), io.StringIO()
    console = Console(file=out, width=width, force_terminal=terminal, color_system="standard" if terminal else None)
    code = await asyncio.to_thread(status_cli.status, options.pop("config", None), *args, console=console, err=err,
                                   **options)
    return code, out.getvalue(), err.getvalue()


def table_rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if re.match(r"^t\d\s", line)]


async def test_the_table_lists_every_tenants_listeners_trouble_first_and_exits_3(daemon):
    d, _ = daemon
    code, out, err = await run(d.api_url, TOKEN, None)
    assert code == status_cli.EXIT_NOT_STARTED and err == ""
    assert out.splitlines()[0].split() == ["TENANT", "ID", "TYPE", "STATUS", "SINCE", "RECEIVED", "FORWARDED",
                                           "RATE/S", "LAST", "ERROR"]
    rows = table_rows(out)
    assert [(r[0], r[1], r[3]) for r in rows] == [("t1", "P0", "starting"), ("t1", "P2", "stopped"),
                                                  ("t1", "P1", "started"), ("t2", "Q1", "retrying")]
    p1 = rows[2]
    assert p1[2] == "pusher" and int(p1[5]) >= 1 and float(p1[7]) > 0
    assert "(disabled)" in out and "\x1b[" not in out  # no colour when not a terminal
    assert re.search(r"Could not connect", out)
    assert "4 listener(s): 1 retrying, 1 starting, 1 stopped, 1 started; not every enabled listener is started" in out


async def test_long_errors_are_cut_to_the_width_and_exit_0_once_every_enabled_listener_started(daemon):
    d, pusher = daemon
    code, out, _ = await run(d.api_url, TOKEN, "t2", width=70)
    assert code == status_cli.EXIT_NOT_STARTED
    assert all(len(line) <= 70 for line in out.splitlines())
    assert "…" in out  # the retrying listener's long last error, cut to the width
    pusher.release_subscriptions("held")
    await wait_for(lambda: d.supervisor.status(("t1", "P0")).status == "started", what="P0 started")
    code, out, _ = await run(d.api_url, TOKEN, "t1")
    assert code == status_cli.EXIT_OK, out  # P2 is disabled: it does not count
    assert "all enabled listeners started" in out


async def test_colour_only_on_a_terminal_and_json_gives_the_raw_objects(daemon):
    d, _ = daemon
    _, coloured, _ = await run(d.api_url, TOKEN, "t1", terminal=True)
    assert "\x1b[" in coloured
    code, out, _ = await run(d.api_url, TOKEN, None, as_json=True)
    assert code == status_cli.EXIT_NOT_STARTED
    rows = json.loads(out)
    assert {(r["tenant-id"], r["listener"]["id"]) for r in rows} == {("t1", "P0"), ("t1", "P1"), ("t1", "P2"),
                                                                     ("t2", "Q1")}
    p1 = next(r for r in rows if r["listener"]["id"] == "P1")
    assert p1["status"]["status"] == "started" and p1["listener"]["options"]["channel"] == "orders"
    assert "rate" in p1["status"] and p1["status"]["history"][-1]["status"] == "started"


async def test_a_token_sees_only_its_tenants(daemon, tmp_path):
    d, _ = daemon
    code, out, _ = await run(d.api_url, OTHER_TOKEN, None)  # tenant `other` only: no listeners, all fine
    assert code == status_cli.EXIT_OK and "0 listener(s)" in out
    code, _, err = await run(d.api_url, OTHER_TOKEN, "t1")
    assert code == status_cli.EXIT_FATAL and "403" in err and "t1" in err


async def test_url_and_token_come_from_the_configs_server_table(daemon, tmp_path, monkeypatch):
    d, _ = daemon
    monkeypatch.delenv("LISTENERD_TOKEN", raising=False)
    port = d.api_url.rsplit(":", 1)[1]
    config = tmp_path / "client.toml"  # another daemon's secrets need not be readable: only [server] is read
    config.write_text(f'[server]\nlisten = "0.0.0.0:{port}"\n[[server.tokens]]\nname = "other"\n'
                      f'token = "{OTHER_TOKEN}"\ntenants = ["other"]\n[[server.tokens]]\nname = "ops"\n'
                      f'token = "${{OPS_TOKEN}}"\n\n[[tenants]]\nid = "x"\nlisteners = "${{NOT_SET_HERE}}"\n')
    monkeypatch.setenv("OPS_TOKEN", TOKEN)
    code, out, err = await run(None, None, "t1", config=str(config))  # the first token that may use t1: ops
    assert code == status_cli.EXIT_NOT_STARTED and [r[1] for r in table_rows(out)] == ["P0", "P2", "P1"], err
    monkeypatch.setenv("LISTENERD_TOKEN", OTHER_TOKEN)
    code, out, _ = await run(None, None, None, config=str(config))
    assert code == status_cli.EXIT_OK and "0 listener(s)" in out


async def test_usage_problems_exit_2_with_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("LISTENERD_TOKEN", raising=False)
    code, _, err = await run(None, None, None, config=str(tmp_path / "missing.toml"))
    assert code == status_cli.EXIT_USAGE
    assert err.count("\n") == 1 and "cannot read config" in err and "--url and --token" in err
    config = tmp_path / "no-tokens.toml"
    config.write_text('[server]\nlisten = "127.0.0.1:1"\n')
    code, _, err = await run(None, None, "t1", config=str(config))
    assert code == status_cli.EXIT_USAGE and "no token in server.tokens may use tenant 't1'" in err


def test_a_refused_token_and_an_unreachable_daemon_exit_1_without_a_traceback(tmp_path):
    """The real command line, in a subprocess: exit codes and stderr as a script sees them."""
    engine_url = "http://127.0.0.1:9/1.0/events"

    async def scenario():
        async with running_daemon(tmp_path, base_config(tmp_path, engine_url)) as (d, _):
            return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "listenerd", "status", "--url",
                                                            d.api_url, "--token", "wrong-token-value"],
                                           capture_output=True, text=True, timeout=60)

    refused = asyncio.run(scenario())
    assert refused.returncode == 1 and "refused the token (401)" in refused.stderr
    assert "Traceback" not in refused.stderr and "wrong-token-value" not in refused.stderr + refused.stdout
    unreachable = subprocess.run([sys.executable, "-m", "listenerd", "status", "--url", "http://127.0.0.1:9",
                                  "--token", "x" * 10], capture_output=True, text=True, timeout=60)
    assert unreachable.returncode == 1 and "cannot reach the daemon at http://127.0.0.1:9" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


async def test_a_tenant_of_many_pages_every_listener_by_its_pages_and_statuses_only_for_rows_shown(
        tmp_path, scripted_source, monkeypatch):
    """250 started and 3 failed listeners, pages of 100: the summary gives counts, trouble rows and the exit code;
    statuses are asked only for the started rows shown, and `--all` follows the Link pages to the last one."""
    async def source(ctx):
        if ctx.listener.options.channel.startswith("broken"):
            raise Ended(Fail(f"Unknown channel: {ctx.listener.options.channel}"))
        ctx.started("Subscribed")
        await asyncio.Event().wait()

    scripted_source("pusher", source)
    many = "".join(f'[[tenants.listeners]]\nid = "M{n}"\ntype = "pusher"\noptions = {{ channel = "c{n}" }}\n'
                   for n in range(1, 251))
    broken = "".join(f'[[tenants.listeners]]\nid = "B{n}"\ntype = "pusher"\noptions = {{ channel = "broken{n}" }}\n'
                     for n in range(1, 4))
    config = f'[[tenants]]\nid = "big"\n[tenants.integrations.pusher]\nkey = "k"\nsecret = "{SECRET}"\n' + many + broken
    asked: list[str] = []
    real_get = status_cli.Client.get

    def counting_get(self, path):
        asked.append(path)
        return real_get(self, path)

    monkeypatch.setattr(status_cli.Client, "get", counting_get)
    monkeypatch.setattr(status_cli, "PAGE_SIZE", 100)
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, config)) as (d, _):
        await wait_for(lambda: sum(1 for n in range(1, 251) if (s := d.supervisor.status(("big", f"M{n}")))
                                   and s.status == "started") == 250, timeout=30, what="250 listeners started")
        await wait_for(lambda: all((s := d.supervisor.status(("big", f"B{n}"))) and s.status == "failed"
                                   for n in range(1, 4)), timeout=30, what="three failed listeners")

        code, out, err = await run(d.api_url, TOKEN, "big", rows=20)
        assert code == status_cli.EXIT_NOT_STARTED and err == ""
        shown = [line.split()[1] for line in out.splitlines() if line.startswith("big ")]
        assert shown == ["B1", "B2", "B3"] + [f"M{n}" for n in range(1, 21)]
        assert "253 listener(s): 3 failed, 250 started; not every enabled listener is started; " \
               "230 started not shown" in out
        assert sum(path.endswith("/status") and "/listeners/M" in path for path in asked) == 20
        assert not any("/listeners/B" in path for path in asked)  # the failed ones came with the summary
        assert len(asked) == 1 + 1 + 20  # the summary, one page of 20, and those 20 statuses

        asked.clear()
        code, out, _ = await run(d.api_url, TOKEN, "big", rows=None)
        shown = [line.split()[1] for line in out.splitlines() if line.startswith("big ")]
        assert code == status_cli.EXIT_NOT_STARTED and len(shown) == 253 and set(shown) >= {"M1", "M100", "M250"}
        assert "not shown" not in out
        pages = [path for path in asked if "?limit=100" in path]
        assert len(pages) == 3 and all("cursor=" in path for path in pages[1:])  # followed Link twice

        code, out, _ = await run(d.api_url, TOKEN, "big", as_json=True)
        rows = json.loads(out)
        assert len(rows) == 253 and {r["listener"]["id"] for r in rows} >= {"M250", "B3"}
        b1 = next(r for r in rows if r["listener"]["id"] == "B1")
        assert b1["status"]["status"] == "failed" and b1["listener"]["options"]["channel"] == "broken1"



def _watching(*args: str) -> tuple[subprocess.Popen, int]:
    """`listenerd status --watch` on a pseudo-terminal, as a person runs it: (process, the terminal's master)."""
    master, slave = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen([sys.executable, "-m", "listenerd", "status", "--watch", "--interval", "0.2", *args],
                               stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    return process, master


def _plain(screen: str) -> str:
    """The words a person reads: escape sequences out, wrapped lines joined."""
    return " ".join(re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).split())


def _screen_until(master: int, predicate, timeout: float = 30.0) -> str:
    """What the terminal showed (raw), read until `predicate(its plain words)` holds."""
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 0.1)[0]:
            try:
                seen += os.read(master, 65536)
            except OSError:  # the process ended and closed the terminal
                break
            if predicate(_plain(seen.decode("utf-8", "replace"))):
                return seen.decode("utf-8", "replace")
    raise AssertionError(f"the terminal never showed what was awaited; it showed: {seen[-2000:]!r}")


def _ended(process: subprocess.Popen, master: int) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()
    os.close(master)


async def test_watch_redraws_in_place_follows_the_daemon_and_ctrl_c_exits_with_the_fleets_code(daemon):
    d, pusher = daemon
    process, master = _watching("--url", d.api_url, "--token", TOKEN)
    try:
        first = await asyncio.to_thread(_screen_until, master, lambda s: "Ctrl-C to stop" in s and "Q1" in s)
        assert "\x1b[" in first, "on a terminal: colour, and the cursor moved back to redraw in place"
        await pusher.publish("orders", "order.created", {"id": 2})
        await wait_for(lambda: d.supervisor.status(("t1", "P1")).received >= 2, what="a second event for P1")
        # a later frame shows P1's received count at 2: redrawn from the daemon, not printed once
        def counted_twice(screen: str) -> bool:  # in the last whole frame
            return "Ctrl-C" in screen and bool(re.search(r"P1 pusher started \S+ 2 ", screen.rsplit("Ctrl-C", 2)[-2]))

        frames = await asyncio.to_thread(_screen_until, master, counted_twice)
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 30) == status_cli.EXIT_NOT_STARTED  # Q1 retrying
        assert "Traceback" not in frames
    finally:
        _ended(process, master)


async def test_watch_keeps_asking_a_daemon_that_is_away_and_says_so():
    process, master = _watching("--url", "http://127.0.0.1:9", "--token", "x" * 12)
    try:
        shown = await asyncio.to_thread(_screen_until, master, lambda s: "asking again every 0.2s" in s)
        assert "cannot reach the daemon at http://127.0.0.1:9" in _plain(shown) and "Traceback" not in shown
        assert process.poll() is None, "a daemon away is shown and asked again, not an exit"
        process.send_signal(signal.SIGINT)
        assert await asyncio.to_thread(process.wait, 30) == status_cli.EXIT_FATAL
    finally:
        _ended(process, master)
