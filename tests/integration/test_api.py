"""The HTTP API against an in-process daemon with a scripted source and the engine simulator.

Over 400 lines: one test or two per route of the contract, kept together so the surface reads as one list.
"""

import asyncio
import json

import aiohttp
import pytest

from listenerd.model import SECRET_MASK
from listenerd.sim.engine import EngineSim
from listenerd.testing import InjectedDiskFull
from tests.daemon import OTHER_TOKEN, TOKEN, base_config, running_daemon
from tests.harness import wait_for

PUSHER_SECRET = "pusher-secret-for-tests"
TENANT = f"""
[[tenants]]
id = "t1"
name = "Tenant One"

[tenants.integrations.pusher]
key = "app-key"
secret = "{PUSHER_SECRET}"

[[tenants.listeners]]
id = "CFG1"
name = "from config"
type = "pusher"
options = {{ channel = "cfg" }}
mapping = {{ n = "n" }}
"""


COUNTERS: dict[tuple[str, str], int] = {}


async def ticking_source(ctx):
    """Scripted source: subscribes, then emits {"n": i, ...} every 10 ms; n keeps counting across restarts."""
    ctx.started(f"Subscribed to channel: {ctx.listener.options.channel}")
    key = (ctx.tenant_id, ctx.listener_id)
    while True:
        i = COUNTERS[key] = COUNTERS.get(key, -1) + 1
        await ctx.emit({"n": i, "channel": ctx.listener.options.channel, "extra": {"deep": i * 2}},
                       meta={"$channel": ctx.listener.options.channel, "$event": "tick"})
        await asyncio.sleep(0.01)


@pytest.fixture
async def engine():
    async with EngineSim() as sim:
        yield sim


@pytest.fixture
async def daemon(tmp_path, engine, scripted_source):
    scripted_source("pusher", ticking_source)
    COUNTERS.clear()
    async with running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as pair:
        yield pair


async def test_status_route_answers_per_contract(daemon):
    _, api = daemon
    body = await api.wait_status("t1", "CFG1", "started")
    assert body["message"] == "Subscribed to channel: cfg"
    assert set(body) == {"status", "message", "since", "received", "forwarded", "last-event-at", "last-error",
                         "attempts", "rate", "history"}
    assert body["since"].endswith("Z")
    await wait_for(lambda: api.status("t1", "CFG1"), what="status")

    async def forwarded():
        return (await api.status("t1", "CFG1"))["forwarded"] > 0
    await wait_for(forwarded, what="forwarded events")


async def test_health_ready_metrics(daemon):
    _, api = daemon
    assert (await api.call("GET", "/healthz", token=False))[0] == 200
    code, body = await api.call("GET", "/readyz", token=False)
    assert code == 200 and body["status"] == "ready"
    await api.wait_status("t1", "CFG1", "started")
    code, text = await api.call("GET", "/metrics", token=False)
    assert code == 200
    assert 'listenerd_listener_status{listener="CFG1",status="started",tenant="t1"} 1.0' in text
    assert "listenerd_events_received_total" in text and "listenerd_outbox_depth" in text


async def test_listener_lifecycle_over_http(daemon, engine):
    d, api = daemon
    code, created = await api.call("POST", "/1.0/tenants/t1/listeners",
                                   {"name": "made by API", "type": "pusher", "options": {"channel": "live"},
                                    "mapping": {"n": "n"}})
    assert code == 201, created
    lid = created["id"]
    assert lid == "LI1" and created["managed-by"] == "api" and created["status"] is True
    await api.wait_status("t1", lid, "started")
    await wait_for(lambda: any(e["listener-id"] == lid for e in engine.events()), what="events of the new listener")
    assert all(set(e["event"]) == {"n"} for e in engine.events() if e["listener-id"] == lid)

    code, updated = await api.call("PUT", f"/1.0/tenants/t1/listeners/{lid}", {"mapping": {"deep": "extra.deep"}})
    assert code == 200 and updated["mapping"] == {"deep": "extra.deep"} and updated["options"] == {"channel": "live",
                                                                                                    "event": None,
                                                                                                    "members": False}
    await wait_for(lambda: any(set(e["event"]) == {"deep"} for e in engine.events() if e["listener-id"] == lid),
                   what="events with the new mapping")
    code, got = await api.call("GET", f"/1.0/tenants/t1/listeners/{lid}")
    assert code == 200 and got == updated
    code, listed = await api.call("GET", "/1.0/tenants/t1/listeners")
    assert [x["id"] for x in listed] == ["CFG1", lid]

    received_before_delete = d.supervisor.status(("t1", lid)).received
    code, _ = await api.call("DELETE", f"/1.0/tenants/t1/listeners/{lid}")
    assert code == 204
    assert (await api.call("GET", f"/1.0/tenants/t1/listeners/{lid}/status"))[0] == 404
    # every event it received before the delete still reaches the engine
    await wait_for(lambda: sum(1 for e in engine.events() if e["listener-id"] == lid) >= received_before_delete,
                   what="deleted listener's events delivered")
    ns = [e["event"].get("n", e["event"].get("deep", 0) // 2) for e in engine.events() if e["listener-id"] == lid]
    assert ns == sorted(ns) and len(set(ns)) == len(ns)  # in order, each once


async def test_create_validation_names_the_field(daemon):
    _, api = daemon
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", {"type": "pusher", "options": {}})
    assert code == 400 and body["error"].startswith("options.channel: required")
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", {"type": "nope", "options": {}})
    assert code == 400 and "type: unknown listener type 'nope'" in body["error"]
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                {"type": "pusher", "options": {"channel": "x"}, "mapping": {"a": "b..c"}})
    assert code == 400 and body["error"] == "mapping.a: path 'b..c' has an empty segment"
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", {"id": "CFG1", "type": "pusher",
                                                                      "options": {"channel": "x"}})
    assert code == 409 and "id" in body["error"]
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", {"id": "../etc", "type": "pusher",
                                                                      "options": {"channel": "x"}})
    assert code == 400 and body["error"].startswith("id:")
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", raw=b"{not json",
                                headers={"Content-Type": "application/json"})
    assert code == 400 and "not valid JSON" in body["error"]
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert code == 400 and "Content-Type: application/json" in body["error"]
    deep = b"[" * 100_000 + b"]" * 100_000
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", raw=deep,
                                headers={"Content-Type": "application/json"})
    assert code == 400 and "nested too deeply" in body["error"]
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", raw=b"[1]",
                                headers={"Content-Type": "application/json"})
    assert code == 400
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", raw=b"{" + b" " * 2_000_000 + b"}",
                                headers={"Content-Type": "application/json"})
    assert code == 400 and "too large" in body["error"]


async def test_config_objects_are_listed_and_refuse_changes(daemon):
    _, api = daemon
    code, body = await api.call("GET", "/1.0/tenants/t1/listeners/CFG1")
    assert code == 200 and body["managed-by"] == "config" and body["name"] == "from config"
    assert (await api.call("PUT", "/1.0/tenants/t1/listeners/CFG1", {"name": "x"}))[0] == 409
    assert (await api.call("DELETE", "/1.0/tenants/t1/listeners/CFG1"))[0] == 409
    code, body = await api.call("POST", "/1.0/tenants/t1/integrations/pusher", {"key": "k", "secret": "s"})
    assert code == 409


async def test_integrations_are_redacted_and_changes_restart_users(tmp_path, engine, scripted_source):
    scripted_source("pusher", ticking_source)
    tenants = """
[[tenants]]
id = "t2"
"""
    async with running_daemon(tmp_path, base_config(tmp_path, engine.url, tenants)) as (d, api):
        code, body = await api.call("POST", "/1.0/tenants/t2/listeners", {"type": "pusher",
                                                                          "options": {"channel": "c"}})
        assert code == 201
        status = await api.wait_status("t2", "LI1", "failed")
        assert "No pusher integration" in status["message"]
        secret = "very-secret-pusher-value"
        code, body = await api.call("POST", "/1.0/tenants/t2/integrations/pusher", {"key": "k1", "secret": secret})
        assert code == 200, body
        assert body == {"id": "pusher", "type": "pusher", "key": "k1", "secret": SECRET_MASK, "app-id": None,
                        "cluster": "mt1", "host": None, "port": None, "tls": True,
                        "encryption-master-key": None, "managed-by": "api"}
        await api.wait_status("t2", "LI1", "started")
        since = (await api.status("t2", "LI1"))["since"]
        code, listed = await api.call("GET", "/1.0/tenants/t2/integrations")
        assert code == 200 and listed == [body]
        assert (await api.call("GET", "/1.0/tenants/t2/integrations/pusher"))[1] == body
        assert (await api.call("GET", "/1.0/tenants/t2/integrations/salesforce"))[0] == 404
        code, err = await api.call("POST", "/1.0/tenants/t2/integrations/twitter", {"key": "k"})
        assert code == 400 and "datasift, salesforce, pusher" in err["error"]
        code, err = await api.call("POST", "/1.0/tenants/t2/integrations/pusher", {"key": "k1"})
        assert code == 400 and err["error"] == "secret: required"
        code, _ = await api.call("POST", "/1.0/tenants/t2/integrations/pusher", {"key": "k2", "secret": secret + "2"})
        assert code == 200

        async def restarted():
            return (await api.status("t2", "LI1"))["since"] != since
        await wait_for(restarted, what="listener restarted with new credentials")
        await api.wait_status("t2", "LI1", "started")


def salesforce_tenant(tenant_id: str, topic: str) -> str:
    """A tenant with Salesforce credentials and one listener SF1 on `topic`."""
    return f"""
[[tenants]]
id = "{tenant_id}"
[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "cs-secret-value"
username = "u@example.com"
password = "pw-secret-value"
[[tenants.listeners]]
id = "SF1"
type = "salesforce"
options = {{ topic = "{topic}" }}
"""


async def test_checkpoint_routes(tmp_path, engine, scripted_source):
    seen = []

    async def sf_source(ctx):
        seen.append(await ctx.checkpoint())
        ctx.started(f"Subscribed to topic: {ctx.listener.options.topic}")
        await asyncio.Event().wait()

    scripted_source("salesforce", sf_source)
    async with running_daemon(tmp_path, base_config(tmp_path, engine.url, salesforce_tenant("t3", "Orders"))) \
            as (d, api):
        await api.wait_status("t3", "SF1", "started")
        assert (await api.call("GET", "/1.0/tenants/t3/listeners/SF1/checkpoint"))[0] == 404
        code, body = await api.call("PUT", "/1.0/tenants/t3/listeners/SF1/checkpoint", {"replay": 42})
        assert code == 200 and body == {"replay": 42}
        await wait_for(lambda: seen == [None, "42"], what="restart from the checkpoint")
        assert (await api.call("GET", "/1.0/tenants/t3/listeners/SF1/checkpoint")) == (200, {"replay": 42})
        for bad in ({"replay": -3}, {"replay": "x"}, {"replay": True}, {}, {"replay": 1, "more": 2}):
            code, body = await api.call("PUT", "/1.0/tenants/t3/listeners/SF1/checkpoint", bad)
            assert code == 400, bad
        code, body = await api.call("PUT", "/1.0/tenants/t3/listeners/SF1/checkpoint", {"replay": -2})
        assert code == 200
        await wait_for(lambda: seen[-1] == "-2")


ROUTES = [
    ("GET", "/1.0/tenants/{t}/listeners/{l}/status"),
    ("GET", "/1.0/tenants/{t}/listeners"),
    ("POST", "/1.0/tenants/{t}/listeners"),
    ("GET", "/1.0/tenants/{t}/listeners/{l}"),
    ("PUT", "/1.0/tenants/{t}/listeners/{l}"),
    ("DELETE", "/1.0/tenants/{t}/listeners/{l}"),
    ("POST", "/1.0/tenants/{t}/listeners/{l}/restart"),
    ("GET", "/1.0/tenants/{t}/listeners/{l}/checkpoint"),
    ("PUT", "/1.0/tenants/{t}/listeners/{l}/checkpoint"),
    ("GET", "/1.0/tenants/{t}/dead-letters"),
    ("POST", "/1.0/tenants/{t}/dead-letters/1/retry"),
    ("DELETE", "/1.0/tenants/{t}/dead-letters/1"),
    ("GET", "/1.0/tenants/{t}/integrations"),
    ("GET", "/1.0/tenants/{t}/integrations/pusher"),
    ("POST", "/1.0/tenants/{t}/integrations/pusher"),
    ("GET", "/1.0/tenants/{t}/listeners/{l}/tap"),
]


async def test_auth_matrix(daemon):
    _, api = daemon
    for method, template in ROUTES:
        path = template.format(t="t1", l="CFG1")
        assert (await api.call(method, path, {}, token=None))[0] == 401, (method, path)
        code, body = await api.call(method, path, {}, token="wrong-token-123456789")
        assert code == 401 and body["error"] == "missing or invalid bearer token", (method, path)
        code, body = await api.call(method, path, {}, token=OTHER_TOKEN)
        assert code == 403 and "t1" in body["error"], (method, path)
        code, body = await api.call(method, template.format(t="nope", l="CFG1"), {})
        assert code == 404 and "no tenant 'nope'" in body["error"], (method, path)
        if "{l}" in template:
            code, body = await api.call(method, template.format(t="t1", l="NOPE"), {"replay": 1})
            assert code == 404 and "error" in body, (method, path, code, body)
    code, body = await api.call("GET", "/1.0/tenants/t1/listeners", token=None,
                                headers={"Authorization": "Basic " + TOKEN})
    assert code == 401


async def test_unknown_routes_and_methods_answer_json(daemon):
    _, api = daemon
    code, body = await api.call("GET", "/1.0/nothing-here")
    assert code == 404 and "error" in body
    code, body = await api.call("PATCH", "/1.0/tenants/t1/listeners/CFG1")
    assert code == 405 and "error" in body


async def test_created_listeners_survive_a_restart(tmp_path, engine, scripted_source):
    scripted_source("pusher", ticking_source)
    text = base_config(tmp_path, engine.url, TENANT)
    async with running_daemon(tmp_path, text) as (_, api):
        code, _ = await api.call("POST", "/1.0/tenants/t1/listeners", {"id": "KEEP", "type": "pusher",
                                                                       "options": {"channel": "k"}})
        assert code == 201
        await api.wait_status("t1", "KEEP", "started")
    async with running_daemon(tmp_path, text) as (_, api):
        await api.wait_status("t1", "KEEP", "started")
        code, body = await api.call("GET", "/1.0/tenants/t1/listeners/KEEP")
        assert code == 200 and body["managed-by"] == "api"


async def read_sse(response, count):
    events, data = [], {}
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event:"):
            data["event"] = line[6:].strip()
        elif line.startswith("data:"):
            data["data"] = json.loads(line[5:])
        elif line == "" and data:
            events.append(data)
            data = {}
            if len(events) >= count:
                return events
    return events


async def test_tap_two_clients_and_a_stalled_one(daemon, engine):
    d, api = daemon
    await api.wait_status("t1", "CFG1", "started")
    url = api.base_url + "/1.0/tenants/t1/listeners/CFG1/tap"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as s1, aiohttp.ClientSession() as s2, aiohttp.ClientSession() as s3:
        r1 = await s1.get(url, headers=headers)
        r2 = await s2.get(url, headers=headers)
        stalled = await s3.get(url, headers=headers)  # connected, never read
        assert r1.status == r2.status == stalled.status == 200
        assert r1.headers["Content-Type"].startswith("text/event-stream")
        await wait_for(lambda: d.tap.clients("t1", "CFG1") == 3, what="three tap clients")
        first = await read_sse(r1, 5)
        second = await read_sse(r2, 5)
        ids1 = [e["data"]["id"] for e in first if e["event"] == "event"]
        ids2 = [e["data"]["id"] for e in second if e["event"] == "event"]
        assert set(ids1) & set(ids2), "both clients see the same events"
        # the stalled client does not hold up the engine path
        before = len(engine.events())
        await wait_for(lambda: len(engine.events()) > before + 50, what="delivery continues despite a stalled tap")
        for r in (r1, r2, stalled):
            r.close()


async def test_checkpoint_put_is_not_overwritten_by_the_old_run(tmp_path, engine, scripted_source):
    seen = []

    async def busy_sf_source(ctx):
        start = await ctx.checkpoint()
        seen.append(start)
        ctx.started(f"Subscribed to topic: {ctx.listener.options.topic}")
        n = int(start or 1000)
        while True:  # commits a newer checkpoint every few milliseconds, as a busy topic would
            n += 1
            await ctx.emit({"Id": n}, key=f"org/topic/{n}", checkpoint=str(n))
            await asyncio.sleep(0.002)

    scripted_source("salesforce", busy_sf_source)
    async with running_daemon(tmp_path, base_config(tmp_path, engine.url, salesforce_tenant("t4", "Busy"))) \
            as (d, api):
        await api.wait_status("t4", "SF1", "started")
        await wait_for(lambda: d.supervisor.status(("t4", "SF1")).received > 20, what="a busy stream")
        for target in (7, 3, 5):
            code, _ = await api.call("PUT", "/1.0/tenants/t4/listeners/SF1/checkpoint", {"replay": target})
            assert code == 200
            await wait_for(lambda t=target: seen[-1] == str(t), what=f"the new run starts from {target}")


async def test_concurrent_creates_never_share_or_reuse_an_id(daemon):
    d, api = daemon
    body = {"type": "pusher", "options": {"channel": "c"}, "status": False}
    answers = await asyncio.gather(*(api.call("POST", "/1.0/tenants/t1/listeners", body) for _ in range(8)))
    assert [code for code, _ in answers] == [201] * 8
    ids = sorted(created["id"] for _, created in answers)
    assert ids == sorted(f"LI{n}" for n in range(1, 9))
    code, listed = await api.call("GET", "/1.0/tenants/t1/listeners")
    assert {x["id"] for x in listed} >= set(ids)
    assert (await api.call("DELETE", "/1.0/tenants/t1/listeners/LI8"))[0] == 204
    code, created = await api.call("POST", "/1.0/tenants/t1/listeners", body)
    assert code == 201 and created["id"] == "LI9"  # a deleted listener's id is never handed out again
    code, created = await api.call("POST", "/1.0/tenants/t1/listeners", {**body, "id": "LI20"})
    assert code == 201
    code, created = await api.call("POST", "/1.0/tenants/t1/listeners", body)
    assert created["id"] == "LI21"
    explicit = await asyncio.gather(*(api.call("POST", "/1.0/tenants/t1/listeners", {**body, "id": "SAME"})
                                      for _ in range(4)))
    assert sorted(code for code, _ in explicit) == [201, 409, 409, 409]


async def test_a_failing_store_answers_503_with_retry_after_never_500(daemon, engine):
    d, api = daemon
    engine.script([422])  # one refused batch: a dead letter to retry
    await wait_for(lambda: d.metrics.dead_lettered._value.get() > 0, what="a dead letter")
    _, letters = await api.call("GET", "/1.0/tenants/t1/dead-letters")
    disk = InjectedDiskFull.install(d.store)
    disk.full = True
    auth = {"Authorization": f"Bearer {TOKEN}"}
    try:
        letter = f"/1.0/tenants/t1/dead-letters/{letters[0]['id']}"
        new = {"type": "pusher", "options": {"channel": "x"}}
        for method, path, body in (("POST", "/1.0/tenants/t1/listeners", new), ("POST", letter + "/retry", None),
                                   ("DELETE", letter, None)):
            async with api.session.request(method, api.base_url + path, json=body, headers=auth) as answer:
                assert answer.status == 503, (method, path, await answer.text())
                assert answer.headers["Retry-After"] == "5"
                assert "the store is failing (database or disk is full)" in (await answer.json())["error"]
        code, ready = await api.call("GET", "/readyz", token=False)
        assert code == 503 and "database or disk is full" in ready["reason"]
        assert d.metrics.store_errors.labels("api-write")._value.get() == 3
    finally:
        disk.full = False
    code, _ = await api.call("POST", letter + "/retry")
    assert code == 202
    await wait_for(lambda: not d.outbox.health.failing, what="the store healthy again")
    assert (await api.call("GET", "/readyz", token=False))[0] == 200


async def test_a_stop_ends_open_taps_at_once_instead_of_waiting_for_them(tmp_path, engine, scripted_source):
    """An operator's stop never waits on a console's open tap (its next keep-alive is 15 s away, and a client
    that stays connected would hold aiohttp's shutdown for a minute): taps get an `end` event and close."""
    from listenerd import config as config_module
    from listenerd.api.tap import KEEPALIVE_SECONDS
    from listenerd.daemon import Daemon
    from listenerd.systemd import Notifier

    scripted_source("pusher", ticking_source)
    path = tmp_path / "listenerd.toml"
    path.write_text(base_config(tmp_path, engine.url, TENANT))
    d = Daemon(config_module.load(path, {}), str(path), notifier=Notifier(None))
    await d.start()
    stopped = False
    try:
        url = d.api_url + "/1.0/tenants/t1/listeners/CFG1/tap"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with aiohttp.ClientSession() as reading, aiohttp.ClientSession() as stalled:
            tap = await reading.get(url, headers=headers)
            idle = await stalled.get(url, headers=headers)  # connected, never read
            await wait_for(lambda: d.tap.clients("t1", "CFG1") == 2, what="two tap clients")
            await read_sse(tap, 1)
            stopping = asyncio.create_task(d.stop())
            seen = await asyncio.wait_for(read_sse(tap, 10_000), KEEPALIVE_SECONDS / 3)  # to the stream's end
            assert seen and seen[-1] == {"event": "end", "data": {"reason": "listenerd is stopping"}}, seen[-3:]
            await asyncio.wait_for(stopping, KEEPALIVE_SECONDS / 3)
            stopped = True
            assert d.tap.clients("t1", "CFG1") == 0
            idle.close()
    finally:
        if not stopped:
            await d.stop()
