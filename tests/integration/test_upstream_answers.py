"""Issue 17 finding 1, the response oracle: an upstream's answer reaches the tenant (status `message`,
`last-error`, history) only as a short, sanitised reason, never as its body.

A hostile server the egress policy allows (over loopback, allowed as `[server.egress]` does for a test)
plays the Salesforce token endpoint and CometD, answering each request with a long body: a marker string
past the first few hundred characters, terminal escapes, NUL, BEL and CR/LF. The status the tenant reads
must quote at most its first words, without the marker or a control character.
"""

import json

import pytest
from aiohttp import web

from listenerd.sim.engine import EngineSim
from listenerd.testing import wait_for
from tests.daemon import LOOPBACK_EGRESS, base_config, running_daemon, with_egress

TENANT = """
[[tenants]]
id = "t1"
"""
MARKER = "MARKER-OF-THE-UPSTREAM-BODY"
HOSTILE = ("upstream says no\x1b[2J\x1b]0;owned\x07\x00\r\nSet-Cookie: x=y\r\n" + "internal-data " * 60 + MARKER
           + "\x00" + "tail " * 500)
SALESFORCE = {"consumer-key": "ck", "consumer-secret": "cs-secret-value", "username": "user@example.com",
              "password": "password-value"}
LIMIT = 400  # a short reason: what listenerd writes around it included


def token_ok(request: web.Request) -> web.Response:
    base = f"http://localhost:{request.url.port}"
    return web.json_response({"access_token": "access-token-value", "instance_url": base,
                              "id": f"{base}/id/00D000000000001AAA/005000000000001AAA"})


def answers(scenario: str, request: web.Request, form: dict) -> web.Response:
    token = request.path.endswith("/services/oauth2/token")
    if scenario == "login error description":
        return web.json_response({"error": "unknown_error", "error_description": HOSTILE}, status=400)
    if scenario == "login error code":
        return web.json_response({"error": HOSTILE}, status=400)
    if scenario == "login not JSON":
        return web.Response(text=HOSTILE, status=500, content_type="text/html")
    if token:
        return token_ok(request)
    if scenario == "cometd HTTP error":
        return web.Response(text=HOSTILE, status=500)
    if scenario == "cometd not JSON":
        return web.Response(text=HOSTILE, status=200, content_type="application/json")
    messages = form if isinstance(form, list) else [form]
    channel = messages[0].get("channel", "/meta/handshake") if messages and isinstance(messages[0], dict) else ""
    if scenario == "bayeux error":
        return web.json_response([{"channel": channel, "successful": False, "error": HOSTILE}])
    if scenario == "bayeux failure reason":
        return web.json_response([{"channel": channel, "successful": False, "error": "403::denied",
                                   "ext": {"sfdc": {"failureReason": HOSTILE}}}])
    raise AssertionError(scenario)


SCENARIOS = ["login error description", "login error code", "login not JSON", "cometd HTTP error",
             "cometd not JSON", "bayeux error", "bayeux failure reason"]


@pytest.fixture
async def hostile(request):
    hits: list[str] = []
    scenario = request.param

    async def handle(request: web.Request) -> web.Response:
        hits.append(request.path)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = {}
        return answers(scenario, request, body)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield scenario, site._server.sockets[0].getsockname()[1], hits
    finally:
        await runner.cleanup()


def strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


@pytest.mark.parametrize("hostile", SCENARIOS, indirect=True)
async def test_an_upstream_body_reaches_the_tenant_only_as_a_short_sanitised_reason(tmp_path, hostile):
    scenario, port, hits = hostile
    async with EngineSim() as engine:
        text = with_egress(base_config(tmp_path, engine.url, TENANT), LOOPBACK_EGRESS)
        async with running_daemon(tmp_path, text) as (_, api):
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce",
                                        {**SALESFORCE, "login-url": f"http://localhost:{port}"})
            assert code == 200, body
            code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                        {"type": "salesforce", "options": {"topic": "/event/Order__e"}})
            assert code == 201, body
            listener = body["id"]
            status: dict = {}

            async def answered() -> bool:
                nonlocal status
                status = await api.status("t1", listener)
                return status["status"] in ("retrying", "failed") and status["last-error"] is not None

            await wait_for(answered, timeout=15, interval=0.05, what="the listener to report the answer")
            assert scenario.startswith("login") or any("/cometd/" in h for h in hits), hits
            if "not JSON" not in scenario:  # the short reason: the answer's first words, printable
                assert "upstream says no [2J ]0;owned Set-Cookie: x=y" in status["last-error"], status
            listing = await api.call("GET", "/1.0/tenants/t1/listeners")
            for where in (status, listing[1]):
                for text_ in strings(where):
                    assert MARKER not in text_, text_
                    assert all(c.isprintable() for c in text_), repr(text_)
            for text_ in (status["message"], status["last-error"], *(h["message"] for h in status["history"])):
                assert len(text_) <= LIMIT, (len(text_), text_)
