"""TLS for every Salesforce leg (OAuth on aiohttp, REST on requests/simple-salesforce, CometD on aiohttp):
verified by default, and trusted through `sources.ca-bundle` when the server's CA is private."""

from __future__ import annotations

import pytest
import structlog

from listenerd.model import Config
from listenerd.sim.salesforce import SalesforceSim
from tests.harness import Harness, desired, integration, listener, wait_for
from tests.tls import self_signed

PASSWORD, TOKEN, SECRET = "tls-pass-777", "TLSTOKEN", "tls-consumer-secret"




@pytest.fixture
async def tls_sim(tmp_path):
    server_ctx, ca_bundle = self_signed(tmp_path)
    async with SalesforceSim(users={"u@example.com": PASSWORD + TOKEN}, clients={"ck": SECRET}, long_poll=0.5,
                             ssl_context=server_ctx) as sim:
        yield sim, ca_bundle


def setup(tmp_path, sim, ca_bundle=None):
    sources = {"ca-bundle": ca_bundle} if ca_bundle else {}
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")}, "sources": sources,
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    creds = integration("salesforce", **{"consumer-key": "ck", "consumer-secret": SECRET, "username": "u@example.com",
                                         "password": PASSWORD, "secret-token": TOKEN, "login-url": sim.url})
    spec = listener(id="LT", type="salesforce", options={"topic": "Tls", "query": "SELECT Id, Name FROM Account"},
                    mapping={"name": "Name"})
    return config, {("t", "LT"): desired(spec, creds)}


async def test_every_leg_is_verified_against_the_configured_ca_bundle(tmp_path, tls_sim):
    sim, ca_bundle = tls_sim
    assert sim.url.startswith("https://localhost:")
    config, want = setup(tmp_path, sim, ca_bundle)
    with structlog.testing.capture_logs() as logs:
        async with Harness(tmp_path, config) as h:
            sup = h.supervisor()
            await sup.start(want)
            record = sup.status(("t", "LT"))
            await wait_for(lambda: record.status == "started", what="started over TLS")
            assert "Tls" in sim.topics  # created over REST (requests, verify=<ca bundle>)
            sim.publish("Tls", {"Id": "001", "Name": "secure"})
            await wait_for(lambda: record.received == 1, what="event over TLS")
            sim.expire_sessions()  # a second login, over TLS too
            sim.publish("Tls", {"Id": "002", "Name": "again"})
            await wait_for(lambda: record.received == 2, what="event after a fresh login")
            assert [e["event"]["name"] for e in await h.events()] == ["secure", "again"]
    text = repr(logs)
    assert PASSWORD not in text and SECRET not in text and TOKEN not in text


async def test_an_untrusted_certificate_is_refused_by_default(tmp_path, tls_sim):
    sim, _ = tls_sim
    config, want = setup(tmp_path, sim)
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        await sup.start(want)
        record = sup.status(("t", "LT"))
        await wait_for(lambda: record.attempts >= 1, what="a refused attempt")
        assert "certificate" in (record.last_error or "").lower()
        assert sim.logins == 0
