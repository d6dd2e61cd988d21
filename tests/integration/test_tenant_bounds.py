"""Tenants who do not trust each other (issue 17, part B): each attack reproduced against a real daemon on
loopback, and shown refused or bounded. Slow clients (finding 5), /metrics (6), quotas (7), mapping
bounds at the API (2; the envelope bound and the 413 split: test_amplification, test_engine_too_large)."""

import asyncio
import shutil
import time

import aiohttp
import pytest

from listenerd import testing
from listenerd.sim.engine import EngineSim
from tests.daemon import OTHER_TOKEN, TOKEN, base_config, running_daemon
from tests.harness import wait_for

METRICS_TOKEN = "metrics-token-0123456789"
TENANTS = """
[[tenants]]
id = "t1"

[tenants.integrations.pusher]
key = "app-key"
secret = "pusher-secret-for-tests"

[[tenants.listeners]]
id = "CFG1"
type = "pusher"
options = { channel = "cfg" }
"""
NEW = {"type": "pusher", "options": {"channel": "c"}}


async def ticking(ctx):
    ctx.started("subscribed")
    while True:
        await ctx.emit({"n": 1})
        await asyncio.sleep(0.05)


def config(tmp_path, engine_url, server="", limits="", tenants=TENANTS):
    text = base_config(tmp_path, engine_url, tenants=tenants, extra=f"[limits]\n{limits}\n" if limits else "")
    return text.replace('listen = "127.0.0.1:0"\n', f'listen = "127.0.0.1:0"\n{server}\n', 1)


@pytest.fixture
async def engine():
    async with EngineSim(keep=False) as sim:
        yield sim


async def half_sent(host, port, data: bytes):
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def closed_by_server(reader, timeout=5.0) -> bytes:
    """What the server sent before closing (b"" when it just closed); fails when it keeps the socket open."""
    return await asyncio.wait_for(reader.read(), timeout)


async def timed_health(api_url) -> float:
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(api_url + "/healthz") as r:
        assert r.status == 200
    return time.monotonic() - started


# -- finding 5: slow clients


async def test_slowloris_half_sent_headers_are_closed_and_the_api_still_answers(tmp_path, engine):
    text = config(tmp_path, engine.url, server="header-timeout = 0.5\nidle-timeout = 2\nmax-connections = 400")
    async with running_daemon(tmp_path, text) as (d, api):
        host, port = d.api_url.removeprefix("http://").rsplit(":", 1)
        sockets = [await half_sent(host, int(port), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                   for _ in range(380)]  # more than the 371 that made the API unreachable
        assert await timed_health(d.api_url) < 1.0  # answered while they hang
        started = time.monotonic()
        results = await asyncio.gather(*(closed_by_server(r) for r, _ in sockets))
        assert results == [b""] * 380 and time.monotonic() - started < 3.0
        assert d.metrics.api_guard.labels("header-timeout")._value.get() == 380
        for _, w in sockets:
            w.close()


async def test_an_idle_connection_is_closed_after_the_idle_timeout(tmp_path, engine):
    text = config(tmp_path, engine.url, server="idle-timeout = 0.5")
    async with running_daemon(tmp_path, text) as (d, api):
        host, port = d.api_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await half_sent(host, int(port), b"")
        started = time.monotonic()
        assert await closed_by_server(reader) == b"" and time.monotonic() - started < 3.0
        writer.close()


async def test_a_half_sent_body_is_answered_408_within_the_header_timeout(tmp_path, engine):
    text = config(tmp_path, engine.url, server="header-timeout = 0.5")
    async with running_daemon(tmp_path, text) as (d, api):
        host, port = d.api_url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await half_sent(host, int(port), (
            f"POST /1.0/tenants/t1/listeners HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"type\": ").encode())
        answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
        assert answer.startswith(b"HTTP/1.1 408")
        writer.close()


async def test_past_the_connection_cap_new_connections_get_a_quick_503_and_the_api_recovers(tmp_path, engine):
    text = config(tmp_path, engine.url, server="max-connections = 20\nheader-timeout = 60\nidle-timeout = 60")
    async with running_daemon(tmp_path, text) as (d, api):
        host, port = d.api_url.removeprefix("http://").rsplit(":", 1)
        held = [await half_sent(host, int(port), b"GET / HTTP/1.1\r\n") for _ in range(20)]
        await wait_for(lambda: d.metrics.api_connections._value.get() == 20, what="20 connections held")
        reader, writer = await half_sent(host, int(port), b"")
        refusal = await closed_by_server(reader, timeout=2.0)
        assert refusal.startswith(b"HTTP/1.1 503") and b"too many connections" in refusal
        assert d.metrics.api_guard.labels("refused")._value.get() == 1
        writer.close()
        for _, w in held:
            w.close()
        await wait_for(lambda: d.metrics.api_connections._value.get() == 0, what="all closed")
        assert await timed_health(d.api_url) < 1.0


# -- finding 6: /metrics


async def test_metrics_token_is_required_when_set_and_never_logged(tmp_path, engine, scripted_source, capsys):
    scripted_source("pusher", ticking)
    text = config(tmp_path, engine.url, server=f'metrics-token = "{METRICS_TOKEN}"')
    async with running_daemon(tmp_path, text) as (d, api):
        assert (await api.call("GET", "/metrics", token=False))[0] == 401
        assert (await api.call("GET", "/metrics", token=TOKEN))[0] == 401  # an API token is not the metrics token
        code, body = await api.call("GET", "/metrics", token=METRICS_TOKEN)
        assert code == 200 and "listenerd_events_received" in body
    assert METRICS_TOKEN not in capsys.readouterr().out


async def test_per_listener_labels_are_dropped_when_switched_off(tmp_path, engine, scripted_source):
    scripted_source("pusher", ticking)
    tenants = TENANTS + "".join(f'\n[[tenants.listeners]]\nid = "L{i}"\ntype = "pusher"\noptions = {{ channel = '
                                f'"c{i}" }}\n' for i in range(3))
    for setting, per_listener in (("false", False), ("3", False), ("4", True), ("true", True)):
        text = config(tmp_path, engine.url, server=f"metrics-per-listener = {setting}", tenants=tenants)
        async with running_daemon(tmp_path, text) as (d, api):
            for lid in ("CFG1", "L0", "L1", "L2"):
                await api.wait_status("t1", lid, "started")
            await wait_for(lambda: d.metrics.received.labels("t1", "L2")._value.get() > 0)
            code, body = await api.call("GET", "/metrics", token=False)
            assert code == 200
            assert ('listener="L2"' in body) is per_listener, setting
            if not per_listener:
                assert 'listenerd_listener_status{status="started",tenant="t1"} 4.0' in body
                assert "summed per tenant" in body


class SlowCollector:
    """A collector that takes `seconds` to collect: what a page of 10,000 listeners costs, made visible."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.calls = 0

    def collect(self):
        self.calls += 1
        time.sleep(self.seconds)
        return []


async def test_scrapes_render_off_the_loop_and_concurrent_ones_share_a_render(tmp_path, engine):
    async with running_daemon(tmp_path, config(tmp_path, engine.url)) as (d, api):
        slow = SlowCollector(0.5)
        d.metrics.registry.register(slow)
        scrapes = [asyncio.create_task(api.call("GET", "/metrics", token=False)) for _ in range(8)]
        await wait_for(lambda: slow.calls == 1, what="a render under way")
        assert await timed_health(d.api_url) < 0.2  # the loop answers while the page renders
        answers = await asyncio.gather(*scrapes)
        assert all(code == 200 for code, _ in answers) and slow.calls == 1


# -- finding 7: quotas


async def post(api, path, body, token=TOKEN):
    async with api.session.post(api.base_url + path, json=body, headers={"Authorization": f"Bearer {token}"}) as r:
        return r.status, r.headers.get("Retry-After"), await r.json()


async def test_max_listeners_counts_config_listeners_and_answers_429(tmp_path, engine, scripted_source):
    scripted_source("pusher", ticking)
    async with running_daemon(tmp_path, config(tmp_path, engine.url, limits="tenant-max-listeners = 3")) as (d, api):
        assert [(await post(api, "/1.0/tenants/t1/listeners", NEW))[0] for _ in range(2)] == [201, 201]
        code, retry_after, body = await post(api, "/1.0/tenants/t1/listeners", NEW)
        assert code == 429 and retry_after and int(retry_after) >= 1
        assert "limits.tenant-max-listeners" in body["error"]
        code, _ = await api.call("DELETE", "/1.0/tenants/t1/listeners/LI1")
        assert code == 204
        assert (await post(api, "/1.0/tenants/t1/listeners", NEW))[0] == 201


async def test_creates_all_at_once_never_pass_the_bound(tmp_path, engine, scripted_source):
    """Far below the bound a create does not count the tenant's listeners in the store; eighty creates from
    eight clients at once against a bound of 20 (one declared in the config) still make exactly 19."""
    scripted_source("pusher", ticking)
    limits = "tenant-max-listeners = 20\ntenant-write-rate = 1000\ntenant-write-burst = 1000"
    async with running_daemon(tmp_path, config(tmp_path, engine.url, limits=limits)) as (d, api):
        async def worker() -> list[int]:  # eight clients creating one after another: requests arrive all along
            return [(await post(api, "/1.0/tenants/t1/listeners", NEW))[0] for _ in range(10)]

        codes = [code for codes in await asyncio.gather(*(worker() for _ in range(8))) for code in codes]
        assert sorted(codes) == [201] * 19 + [429] * 61
        assert d.fleet.index.count("t1") == 20


async def test_config_listeners_past_the_bound_still_start(tmp_path, engine, scripted_source):
    scripted_source("pusher", ticking)
    async with running_daemon(tmp_path, config(tmp_path, engine.url, limits="tenant-max-listeners = 1",
                                                tenants=TENANTS + '\n[[tenants.listeners]]\nid = "CFG2"\ntype = '
                                                '"pusher"\noptions = { channel = "two" }\n')) as (d, api):
        await api.wait_status("t1", "CFG2", "started")
        assert (await post(api, "/1.0/tenants/t1/listeners", NEW))[0] == 429


async def test_write_rate_is_per_tenant_and_answers_429_with_retry_after(tmp_path, engine):
    text = config(tmp_path, engine.url, limits="tenant-write-rate = 0.5\ntenant-write-burst = 3")
    async with running_daemon(tmp_path, text) as (d, api):
        integration = {"key": "k", "secret": "a-pusher-secret"}
        codes = [(await post(api, "/1.0/tenants/other/integrations/pusher", integration, OTHER_TOKEN))
                 for _ in range(5)]  # integration updates are writes
        assert [c for c, _, _ in codes] == [200, 200, 200, 429, 429]
        code, retry_after, body = codes[3]
        assert int(retry_after) == 2 and "limits.tenant-write-rate" in body["error"]
        assert (await post(api, "/1.0/tenants/t1/listeners", NEW))[0] == 201  # another tenant is not slowed
        assert (await api.call("GET", "/1.0/tenants/other/integrations", token=OTHER_TOKEN))[0] == 200  # reads free


# -- finding 2 at the API


async def test_the_api_refuses_an_amplifying_mapping_naming_the_field(tmp_path, engine):
    async with running_daemon(tmp_path, config(tmp_path, engine.url)) as (d, api):
        code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                    {**NEW, "mapping": {f"f{i}": "body" for i in range(20_000)}})
        assert code == 400 and body["fields"] == ["mapping"] and "limits.mapping-max-fields" in body["error"]
        code, body = await api.call("POST", "/1.0/tenants/t1/listeners", {**NEW, "mapping": {"x": "a." * 50 + "b"}})
        assert code == 400 and body["fields"] == ["mapping.x"]


@pytest.mark.skipif(shutil.which("prlimit") is None, reason="needs prlimit (util-linux) to lower the fd limit")
async def test_accept_errors_out_of_file_descriptors_are_logged_once_per_period(tmp_path, engine):
    """The daemon runs with 48 file descriptors; 120 clients hold connections, so accept() fails with EMFILE
    again and again: one log line says so (not one per failure), and the API answers once they leave."""
    text = config(tmp_path, engine.url, server="header-timeout = 60\nidle-timeout = 60")
    entry = ("prlimit", "--nofile=48:48", "--", *testing.DAEMON)
    async with testing.DaemonProcess(tmp_path, text, entry=entry) as daemon:
        host, port = daemon.api_url.removeprefix("http://").rsplit(":", 1)
        held = [await half_sent(host, int(port), b"GET / HTTP/1.1\r\n") for _ in range(120)]
        await asyncio.sleep(3.5)  # asyncio retries accept() once a second: several failures in this window
        for _, writer in held:
            writer.close()
        async with testing.Api(daemon.api_url) as api:
            async def failures() -> float:
                code, body = await api.call("GET", "/metrics", token=False)
                found = [line for line in body.splitlines() if line.startswith("listenerd_api_accept_errors_total ")]
                return float(found[0].split()[1]) if code == 200 and found else 0.0

            await wait_for(lambda: _at_least(failures, 2.0), timeout=15, what="accept failures counted")
        lines = [line for line in daemon.lines() if "cannot accept connections" in line.get("event", "")]
        assert len(lines) == 1 and lines[0]["level"] == "error" and "EMFILE" in lines[0]["error"]
        assert not [line for line in daemon.lines() if "out of system resource" in str(line)]


async def _at_least(read, want) -> bool:
    return await read() >= want
