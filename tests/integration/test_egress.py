"""Issue 17 finding 1: a tenant cannot point the daemon at the operator's network (SSRF).

URLs set through the API are refused with a 400 naming the field unless they use TLS and a provider
host (or `[server.egress]` allows them); a name that is allowed but resolves to an internal address
makes the listener `failed` at connect time, before a byte is sent (also for the Pub/Sub API's gRPC
channel, which would resolve names itself); the Salesforce login's `instance_url` is held to the same
policy.
"""

from pathlib import Path

import pytest
from aiohttp import web

from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.sim.salesforce import SalesforceSim
from listenerd.sim.salesforce_pubsub import SalesforcePubsubSim
from listenerd.sources.salesforce_pubsub import PubSubChannels
from listenerd.testing import wait_for
from tests.daemon import LOOPBACK_EGRESS, base_config, running_daemon, with_egress
from tests.tls import self_signed

TENANT = """
[[tenants]]
id = "t1"
"""
SALESFORCE = {"consumer-key": "ck", "consumer-secret": "cs-secret-value", "username": "user@example.com",
              "password": "password-value"}
PUSHER = {"key": "app-key", "secret": "app-secret-value"}


@pytest.fixture
async def api(tmp_path):
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as (_, api):
        yield api


SSRF = [
    ("salesforce", {"login-url": "http://127.0.0.1:8088/1.0/tenants/t1/listeners#"}, "login-url"),
    ("salesforce", {"login-url": "https://127.0.0.1"}, "login-url"),
    ("salesforce", {"login-url": "https://localhost"}, "login-url"),
    ("salesforce", {"login-url": "https://0x7f000001"}, "login-url"),
    ("salesforce", {"login-url": "https://2130706433"}, "login-url"),
    ("salesforce", {"login-url": "https://0177.0.0.1"}, "login-url"),
    ("salesforce", {"login-url": "https://127.1"}, "login-url"),
    ("salesforce", {"login-url": "https://[::ffff:127.0.0.1]"}, "login-url"),
    ("salesforce", {"login-url": "https://[::1]:8088"}, "login-url"),
    ("salesforce", {"login-url": "https://169.254.169.254/latest/meta-data"}, "login-url"),
    ("salesforce", {"login-url": "https://10.0.0.7"}, "login-url"),
    ("salesforce", {"login-url": "https://[fd00::1]"}, "login-url"),
    ("salesforce", {"login-url": "https://login.salesforce.com@127.0.0.1"}, "login-url"),
    ("salesforce", {"login-url": "https://login.salesforce.com.attacker.example"}, "login-url"),
    ("salesforce", {"login-url": "https://attacker.example/#.salesforce.com"}, "login-url"),
    ("salesforce", {"login-url": "https://attacker.example?.salesforce.com"}, "login-url"),
    ("salesforce", {"login-url": "https://notsalesforce.com"}, "login-url"),
    ("salesforce", {"pubsub-url": "http://127.0.0.1:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "http://api.pubsub.salesforce.com:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://127.0.0.1:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://localhost:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://0x7f000001:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://2130706433"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://127.1:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://[::ffff:127.0.0.1]:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://[::1]:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://169.254.169.254"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://10.0.0.7:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://[fd00::1]:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://api.pubsub.salesforce.com@127.0.0.1:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://api.pubsub.salesforce.com.attacker.example:7443"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://attacker.example/#.salesforce.com"}, "pubsub-url"),
    ("salesforce", {"pubsub-url": "https://internal.corp:7443"}, "pubsub-url"),
    ("datasift", {"stream-url": "ws://127.0.0.1:9/multi"}, "stream-url"),
    ("datasift", {"stream-url": "wss://192.168.1.1/multi"}, "stream-url"),
    ("datasift", {"stream-url": "wss://internal.corp/multi"}, "stream-url"),
    ("pusher", {"host": "127.0.0.1", "port": 8088}, "host"),
    ("pusher", {"host": "localhost"}, "host"),
    ("pusher", {"host": "metadata.google.internal"}, "host"),
    ("pusher", {"tls": False}, "tls"),
    ("pusher", {"cluster": "eu.attacker.example/"}, "cluster"),
]


def fields_for(kind: str, extra: dict) -> dict:
    base = {"salesforce": SALESFORCE, "pusher": PUSHER, "datasift": {"username": "u", "api-key": "datasift-key-1"}}
    return {**base[kind], **extra}


@pytest.mark.parametrize(("kind", "extra", "field"), SSRF)
async def test_an_internal_or_foreign_url_is_a_400_naming_the_field(api, kind, extra, field):
    code, body = await api.call("POST", f"/1.0/tenants/t1/integrations/{kind}", fields_for(kind, extra))
    assert code == 400, body
    assert body["fields"] == [field] and body["error"].startswith(f"{field}: ")
    assert (await api.call("GET", f"/1.0/tenants/t1/integrations/{kind}"))[0] == 404  # nothing stored


@pytest.mark.parametrize(("kind", "extra"), [
    ("salesforce", {}), ("salesforce", {"login-url": "https://acme.my.salesforce.com"}),
    ("salesforce", {"login-url": "https://test.salesforce.com/"}),
    ("salesforce", {"login-url": "https://acme--dev.sandbox.my.site.force.com"}),
    ("salesforce", {"pubsub-url": "https://api.pubsub.salesforce.com:7443"}),
    ("salesforce", {"pubsub-url": "https://api.deu.pubsub.salesforce.com:7443"}),
    ("pusher", {}), ("pusher", {"cluster": "eu"}), ("pusher", {"host": "ws-ap1.pusher.com", "port": 443}),
    ("datasift", {}),
])
async def test_provider_hosts_are_accepted(api, kind, extra):
    code, body = await api.call("POST", f"/1.0/tenants/t1/integrations/{kind}", fields_for(kind, extra))
    assert code == 200, body


async def test_an_allowed_name_that_resolves_to_loopback_fails_at_connect_time(tmp_path):
    """`localhost` is allowed by name, but no network allows loopback: the connection is refused after
    resolution (as a re-bound DNS name would be), the listener `failed`, and the server never sees it."""
    async with EngineSim() as engine, PusherSim() as pusher:
        text = with_egress(base_config(tmp_path, engine.url, TENANT), 'hosts = ["localhost"]\nplaintext = true')
        async with running_daemon(tmp_path, text) as (_, api):
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/pusher",
                                        {"key": pusher.key, "secret": pusher.secret + "-x", "host": "localhost",
                                         "port": pusher.port, "tls": False})
            assert code == 200, body
            code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                        {"type": "pusher", "options": {"channel": "orders"}})
            assert code == 201, body
            status = await api.wait_status("t1", body["id"], "failed")
            assert "egress refused: localhost resolves to" in status["message"]
            assert "loopback" in status["message"]
            assert pusher.peak_connections == 0


async def test_loopback_allowed_by_networks_connects(tmp_path):
    """What `listenerd dev` does: loopback networks and plaintext allowed, so API-made integrations reach
    the simulators."""
    async with EngineSim() as engine, PusherSim() as pusher:
        text = with_egress(base_config(tmp_path, engine.url, TENANT),
                           'networks = ["127.0.0.0/8", "::1/128"]\nplaintext = true')
        async with running_daemon(tmp_path, text) as (_, api):
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/pusher",
                                        {"key": pusher.key, "secret": pusher.secret, "host": "127.0.0.1",
                                         "port": pusher.port, "tls": False})
            assert code == 200, body
            code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                        {"type": "pusher", "options": {"channel": "orders"}})
            await api.wait_status("t1", body["id"], "started")


async def test_the_instance_url_a_login_answers_is_held_to_the_policy(tmp_path):
    """A login server the policy allows answers an `instance_url` it does not: `failed`, no CometD request."""
    async with EngineSim() as engine, SalesforceSim(public_host="127.0.0.2", long_poll=0.5,
                                                    users={"user@example.com": "pass-word-1TOKEN-1234"},
                                                    clients={"ck": "cs-secret-value"}) as salesforce:
        text = with_egress(base_config(tmp_path, engine.url, TENANT), LOOPBACK_EGRESS)
        async with running_daemon(tmp_path, text) as (_, api):
            fields = {**SALESFORCE, "password": "pass-word-1", "secret-token": "TOKEN-1234",
                      "login-url": f"http://localhost:{salesforce.port}"}
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce", fields)
            assert code == 200, body
            code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                        {"type": "salesforce", "options": {"topic": "Orders"}})
            status = await api.wait_status("t1", body["id"], "failed")
            assert "instance_url" in status["message"] and "127.0.0.2" in status["message"], status


async def test_a_redirect_to_an_internal_address_is_refused(tmp_path):
    """An allowed login server answering 307 to an internal IP literal (which aiohttp connects to without a
    resolver): the redirect is refused, the listener `failed`, the internal service never reached."""
    hits = []

    async def internal(request):
        hits.append(request.path)
        return web.Response(text="internal")

    async def redirector(request):
        raise web.HTTPTemporaryRedirect(f"http://127.0.0.2:{internal_port}/admin")

    internal_app, redirect_app = web.Application(), web.Application()
    internal_app.router.add_route("*", "/{tail:.*}", internal)
    redirect_app.router.add_route("*", "/{tail:.*}", redirector)
    runners = [web.AppRunner(internal_app), web.AppRunner(redirect_app)]
    for runner in runners:
        await runner.setup()
    internal_site = web.TCPSite(runners[0], "127.0.0.2", 0)
    redirect_site = web.TCPSite(runners[1], "127.0.0.1", 0)
    await internal_site.start()
    await redirect_site.start()
    internal_port = internal_site._server.sockets[0].getsockname()[1]
    redirect_port = redirect_site._server.sockets[0].getsockname()[1]
    try:
        async with EngineSim() as engine:
            text = with_egress(base_config(tmp_path, engine.url, TENANT), LOOPBACK_EGRESS)
            async with running_daemon(tmp_path, text) as (_, api):
                code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce",
                                            {**SALESFORCE, "login-url": f"http://localhost:{redirect_port}"})
                assert code == 200, body
                code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                            {"type": "salesforce", "options": {"topic": "Orders"}})
                status = await api.wait_status("t1", body["id"], "failed")
                assert "egress refused: 127.0.0.2" in status["message"], status
        assert hits == []
    finally:
        for runner in runners:
            await runner.cleanup()


PUBSUB_USER = {"users": {"user@example.com": "pass-word-1TOKEN-1234"}, "clients": {"ck": "cs-secret-value"}}
PUBSUB_LOGIN = {**SALESFORCE, "password": "pass-word-1", "secret-token": "TOKEN-1234"}
ORDERS = {"type": "salesforce-pubsub", "options": {"topic": "/event/Order__e"}}


def named_only_tls(tmp_path):
    """(key, certificate) PEM bytes of a certificate for `localhost` alone, and the CA bundle trusting it."""
    _, ca_bundle = self_signed(tmp_path, ip_san=False)
    return (Path(ca_bundle.replace("-cert.pem", "-key.pem")).read_bytes(), Path(ca_bundle).read_bytes()), ca_bundle


async def test_a_pubsub_url_that_resolves_to_loopback_fails_at_connect_time(tmp_path):
    """gRPC would resolve `localhost` itself and reach loopback: the channel dials only addresses checked
    here, so the listener is `failed` with the policy's words and the Pub/Sub API never sees a stream.
    (The login server is reached at 127.0.0.2, the one address `networks` allows.)"""
    async with EngineSim() as engine, SalesforceSim(host="127.0.0.2", public_host="127.0.0.2", long_poll=0.5,
                                                    **PUBSUB_USER) as org, SalesforcePubsubSim(org) as bus:
        text = with_egress(base_config(tmp_path, engine.url, TENANT),
                           'hosts = ["localhost"]\nnetworks = ["127.0.0.2/32"]\nplaintext = true')
        async with running_daemon(tmp_path, text) as (_, api):
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce",
                                        {**PUBSUB_LOGIN, "login-url": f"http://127.0.0.2:{org.port}",
                                         "pubsub-url": f"http://localhost:{bus.port}"})
            assert code == 200, body
            code, body = await api.call("POST", "/1.0/tenants/t1/listeners", ORDERS)
            assert code == 201, body
            status = await api.wait_status("t1", body["id"], "failed")
            assert status["message"].startswith("pubsub-url: egress refused: localhost resolves to "), status
            assert "loopback" in status["message"]
            assert org.logins == 1 and bus.streams == []  # logged in, but no stream was ever opened


async def test_a_pubsub_url_allowed_is_dialled_at_its_checked_address_and_verified_under_its_name(tmp_path):
    """The allowed case: the channel dials the checked address (127.0.0.1) while TLS verifies the host's
    name, which is the only name the certificate holds (no IP address), and events flow. After the stream
    ends UNAVAILABLE, the next one is on a new channel, resolved again (a pinned address may be stale)."""
    tls, ca_bundle = named_only_tls(tmp_path)
    async with EngineSim() as engine, SalesforceSim(long_poll=0.5, **PUBSUB_USER) as org, \
            SalesforcePubsubSim(org, keepalive=0.3, tls=tls) as bus:
        text = with_egress(base_config(tmp_path, engine.url, TENANT),
                           'hosts = ["localhost"]\nnetworks = ["127.0.0.0/8", "::1/128"]\nplaintext = true')
        text = text.replace("[engine]", f'[sources]\nca-bundle = "{ca_bundle}"\n\n[engine]', 1)
        async with running_daemon(tmp_path, text) as (daemon, api):
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce",
                                        {**PUBSUB_LOGIN, "login-url": f"http://localhost:{org.port}",
                                         "pubsub-url": f"https://localhost:{bus.port}"})
            assert code == 200, body
            code, body = await api.call("POST", "/1.0/tenants/t1/listeners", ORDERS)
            assert code == 201, body
            await api.wait_status("t1", body["id"], "started")
            bus.publish("/event/Order__e", {"OrderNumber__c": "O-1"})
            await wait_for(lambda: engine.events(), what="the event forwarded")
            assert len(bus.streams) == 1
            channels = daemon.supervisor.shared.get(PubSubChannels).channels
            [first] = channels.values()
            bus.drop_streams()
            await wait_for(lambda: len(bus.streams) == 2 and channels and first not in channels.values(),
                           what="a new channel, resolved again")
            await api.wait_status("t1", body["id"], "started")
            assert first.closed
