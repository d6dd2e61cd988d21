"""The routes the people's views read: a token's tenants, the delivery side, the console's files."""

from __future__ import annotations

import aiohttp

from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from tests.daemon import OTHER_TOKEN, TOKEN, base_config, running_daemon
from tests.harness import wait_for

TENANTS = """
[[tenants]]
id = "t1"
name = "Tenant One"
"""


async def test_tenants_lists_only_what_the_token_may_use(tmp_path):
    async with running_daemon(tmp_path, base_config(tmp_path, "http://127.0.0.1:9/1.0/events", TENANTS)) as (_, api):
        assert await api.call("GET", "/1.0/tenants") == (200, [{"id": "other", "name": ""},
                                                              {"id": "t1", "name": "Tenant One"}])
        assert await api.call("GET", "/1.0/tenants", token=OTHER_TOKEN) == (200, [{"id": "other", "name": ""}])
        assert (await api.call("GET", "/1.0/tenants", token="wrong-token-value"))[0] == 401
        assert (await api.call("GET", "/1.0/engine", token=None))[0] == 401


async def test_engine_tells_idle_then_retrying_with_the_outbox_depth_then_idle_again(tmp_path):
    key, secret = "pv-key", "pv-secret-value"
    async with EngineSim() as engine, PusherSim("1", key, secret) as pusher:
        tenants = f"""
[[tenants]]
id = "t1"
[tenants.integrations.pusher]
key = "{key}"
secret = "{secret}"
app-id = "1"
host = "127.0.0.1"
port = {pusher.port}
tls = false
[[tenants.listeners]]
id = "P1"
type = "pusher"
options = {{ channel = "orders" }}
"""
        async with running_daemon(tmp_path, base_config(tmp_path, engine.url, tenants)) as (_, api):
            await api.wait_status("t1", "P1", "started")
            code, body = await api.call("GET", "/1.0/engine", token=OTHER_TOKEN)  # any token: counts only
            assert code == 200 and body["engine"] == {"state": "idle", "in-flight": 0, "attempt": 0,
                                                       "last-error": None}
            assert body["outbox"]["events"] == 0 and body["outbox"]["max-events"] > 0
            assert body["store"] == {"writing": True, "problem": None}
            engine.fail_next(6, 503)  # about a second of retries at retry-initial 0.05 s, retry-max 0.5 s
            await pusher.publish("orders", "order.created", {"id": 1})

            async def retrying():
                _, now = await api.call("GET", "/1.0/engine")
                return now if now["engine"]["state"] == "retrying" else None
            now = await wait_for(retrying, what="the engine retrying")
            assert now["engine"]["in-flight"] == 1 and now["outbox"]["events"] == 1 and "503" in now["engine"][
                "last-error"]

            async def idle():
                _, now = await api.call("GET", "/1.0/engine")
                return now["engine"]["state"] == "idle" and now["outbox"]["events"] == 0
            await wait_for(idle, timeout=15, what="the engine idle and the outbox empty, once it accepts again")
            status = await api.status("t1", "P1")
            assert status["forwarded"] == 1 and [c["status"] for c in status["history"]][-2:] == ["starting",
                                                                                                  "started"]


async def test_the_console_is_served_from_the_package_with_a_strict_policy(tmp_path):
    async with running_daemon(tmp_path, base_config(tmp_path, "http://127.0.0.1:9/1.0/events")) as (daemon, _), \
            aiohttp.ClientSession() as session:
        async with session.get(daemon.api_url + "/console", allow_redirects=False) as response:
            assert response.status == 302 and response.headers["Location"] == "/console/"
        for path, kind in (("/console/", "text/html"), ("/console/console.js", "text/javascript"),
                           ("/console/console.css", "text/css")):
            async with session.get(daemon.api_url + path) as response:
                assert response.status == 200 and response.content_type == kind
                assert "script-src 'self'" in response.headers["Content-Security-Policy"]
                assert TOKEN not in await response.text()
        for path in ("/console/__init__.py", "/console/..%2Fapi%2Fapp.py", "/console/nothing.js"):
            async with session.get(daemon.api_url + path) as response:
                assert response.status == 404, path
                assert (await response.json())["error"]
