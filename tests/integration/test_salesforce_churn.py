"""Salesforce CometD clients are given back to the org whatever way a listener ends.

An org counts concurrent CometD clients (20 below Enterprise edition) and a client the daemon forgets
to `/meta/disconnect` holds its slot until the server expires it. Here the simulator never expires one
(`max_interval` far past the test), so every slot still taken at the end is a client the daemon leaked:
listeners made, restarted, changed and deleted through the API, some before their handshake was even
answered, and the tenant's integration changed under them, on an org of 3 clients. Last, the org's own
expiry of a client that stopped polling, as a CometD server sweeps sessions.
"""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
import pytest

from listenerd.model import Config
from listenerd.outcome import Ended
from listenerd.sim.engine import EngineSim
from listenerd.sim.salesforce import SalesforceSim
from listenerd.sources import salesforce as source
from listenerd.testing import wait_for
from tests.daemon import base_config, running_daemon
from tests.harness import Harness, desired, listener
from tests.harness import integration as creds

PASSWORD, TOKEN = "churn-pass-1", "CHURNTOKEN-1"
TENANT = """
[[tenants]]
id = "t1"
"""
EGRESS = '[server.egress]\nhosts = ["localhost"]\nnetworks = ["127.0.0.0/8", "::1/128"]\nplaintext = true\n'
TOPICS = ("A", "B", "C")


@pytest.fixture
async def org():
    sim = SalesforceSim(users={"u@example.com": PASSWORD + TOKEN}, clients={"ck": "cs-secret-churn"},
                        long_poll=0.5, max_clients=3, max_interval=3600)
    for name in TOPICS:
        sim.create_topic(name, f"SELECT Id, Name FROM {name}__c")
    async with sim:
        yield sim


def integration(sim: SalesforceSim, pubsub: str = "https://api.pubsub.salesforce.com:7443") -> dict:
    return {"consumer-key": "ck", "consumer-secret": "cs-secret-churn", "username": "u@example.com",
            "password": PASSWORD, "secret-token": TOKEN, "login-url": f"http://localhost:{sim.port}",
            "pubsub-url": pubsub}


def refused(sim: SalesforceSim) -> int:
    """Handshakes the org refused for its client limit."""
    return sum(1 for m in sim.requests if m.get("channel") == "/meta/handshake") - sim.handshakes


async def test_churn_never_exhausts_the_org_client_limit_and_leaks_no_client(tmp_path, org):
    cycles = 6
    async with EngineSim() as engine:
        text = base_config(tmp_path, engine.url, TENANT).replace("[engine]", EGRESS + "\n[engine]", 1)
        async with running_daemon(tmp_path, text) as (_, api):
            code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce", integration(org))
            assert code == 200, body
            for cycle in range(cycles):
                # made and deleted at once: its handshake may still be unanswered when it stops
                code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                            {"type": "salesforce", "options": {"topic": "A"}})
                assert code == 201, body
                assert (await api.call("DELETE", f"/1.0/tenants/t1/listeners/{body['id']}"))[0] == 204

                # two listeners sharing the client, each restarted, one changed, then both deleted
                made = []
                for topic in ("B", "C"):
                    code, body = await api.call("POST", "/1.0/tenants/t1/listeners",
                                                {"type": "salesforce", "options": {"topic": topic}})
                    assert code == 201, body
                    made.append(body["id"])
                for lid in made:
                    await api.wait_status("t1", lid, "started")
                assert (await api.call("POST", f"/1.0/tenants/t1/listeners/{made[0]}/restart"))[0] == 202
                code, body = await api.call("PUT", f"/1.0/tenants/t1/listeners/{made[1]}",
                                            {"options": {"topic": "A"}})
                assert code == 200, body
                if cycle % 2:  # the integration changed under them: a new login, a new client
                    pubsub = f"https://api.pubsub.salesforce.com:{7443 + cycle}"
                    code, body = await api.call("POST", "/1.0/tenants/t1/integrations/salesforce",
                                                integration(org, pubsub))
                    assert code == 200, body
                for lid in made:
                    await api.wait_status("t1", lid, "started")
                for lid in made:
                    assert (await api.call("DELETE", f"/1.0/tenants/t1/listeners/{lid}"))[0] == 204
            # every cycle ended with nothing running: each client made was given back
            await wait_for(lambda: len(org.bayeux) == 0, timeout=10, what="no CometD client left")
            assert refused(org) == 0, "the org's client limit was reached during the churn"
            assert org.handshakes >= cycles
    disconnected = sum(1 for m in org.requests if m.get("channel") == "/meta/disconnect")
    assert len(org.bayeux) == 0 and disconnected >= org.handshakes  # each client told the server it was done

def channel_requests(sim: SalesforceSim, channel: str) -> list[dict]:
    return [m for m in sim.requests if m.get("channel") == channel]


def org_integration(sim: SalesforceSim):
    return creds("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs-secret-churn",
                                  "username": "u@example.com", "password": PASSWORD, "secret-token": TOKEN,
                                  "login-url": sim.url})


@contextlib.asynccontextmanager
async def harness(tmp_path):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    async with Harness(tmp_path, config) as h:
        yield h


async def test_a_listener_removed_while_its_handshake_is_unanswered_disconnects_the_client_it_brings(tmp_path, org):
    """The server makes the client whether or not anyone still waits for the answer: the stop waits for it
    (bounded) and disconnects that clientId, as cometd.js's `disconnect()` does from `handshaking`."""
    org.hold_handshakes()
    wanted = {("t1", "LA"): desired(listener(id="LA", type="salesforce", options={"topic": "A"}),
                                    org_integration(org))}
    async with harness(tmp_path) as h:
        sup = h.supervisor()
        await sup.start(wanted)
        await wait_for(lambda: channel_requests(org, "/meta/handshake"), what="the handshake sent")
        clients = sup.shared.get(source.SalesforceClients)
        removal = asyncio.create_task(sup.reconcile({}))
        await wait_for(lambda: not clients.connections, what="the client closed")
        org.hold_handshakes(False)  # answered now: the client exists on the server
        await removal
        await wait_for(lambda: org.handshakes == 1 and len(org.bayeux) == 0, timeout=5,
                       what="the client it brought disconnected")
        assert len(channel_requests(org, "/meta/disconnect")) == 1


async def test_a_new_client_waits_for_the_goodbye_of_the_one_closing(tmp_path, org):
    """Release before acquire: a listener that needs a new client while the tenant's last one is still
    saying goodbye waits for it (bounded) instead of taking a second slot of an org with one."""
    org.max_clients = 1
    async with harness(tmp_path) as h:
        integration_ = org_integration(org)
        first = h.context("t1", listener(id="LB", type="salesforce", options={"topic": "B"}), integration_)
        second = h.context("t1", listener(id="LC", type="salesforce", options={"topic": "C"}), integration_)
        run_first = asyncio.create_task(source.run(first))
        await wait_for(lambda: h.records[("t1", "LB")].status == "started", what="B started")
        org.slow_disconnects(0.5)
        run_first.cancel()  # B stops: the client closes, its disconnect takes 0.5 s
        await asyncio.sleep(0)
        run_second = asyncio.create_task(source.run(second))  # C needs a client meanwhile
        with contextlib.suppress(asyncio.CancelledError):
            await run_first
        await wait_for(lambda: h.records[("t1", "LC")].status == "started", timeout=5, what="C started")
        assert org.handshakes == 2 and refused(org) == 0
        run_second.cancel()
        with contextlib.suppress(asyncio.CancelledError, Ended):
            await run_second
        await wait_for(lambda: len(org.bayeux) == 0, timeout=5, what="C's client disconnected")


async def test_the_org_expires_a_client_that_stopped_polling_but_not_one_holding_a_connect(org):
    """As a CometD server sweeps sessions: a held connect keeps the client; `max_interval` after its last
    connect ended (or its handshake, if it never connected), a client that stopped polling is gone."""
    org.max_interval = 0.3
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        form = {"grant_type": "password", "client_id": "ck", "client_secret": "cs-secret-churn",
                "username": "u@example.com", "password": PASSWORD + TOKEN}
        async with http.post(org.token_url, data=form) as response:
            headers = {"Authorization": f"Bearer {(await response.json())['access_token']}"}

        async def bayeux(message):
            async with http.post(f"{org.url}/cometd/58.0", json=[message], headers=headers) as response:
                return (await response.json())[0]

        def handshake():
            return bayeux({"channel": "/meta/handshake", "version": "1.0",
                           "supportedConnectionTypes": ["long-polling"]})

        def connect(client_id):
            return bayeux({"channel": "/meta/connect", "clientId": client_id, "connectionType": "long-polling"})

        abandoned = (await handshake())["clientId"]  # never connects
        polling = (await handshake())["clientId"]
        assert (await connect(polling))["successful"]  # the first connect is answered at once
        held = asyncio.create_task(connect(polling))  # held for the long poll (0.5 s), past max_interval
        await wait_for(lambda: org.live_clients == 1, timeout=5, what="the abandoned client expired")
        assert polling in org.bayeux and org.bayeux[polling].polls == 1
        assert (await held)["successful"]  # then it stops polling
        await wait_for(lambda: org.live_clients == 0, timeout=5, what="the client that stopped expired")
        assert org.expired == 2
        answer = await connect(abandoned)
        assert not answer["successful"] and answer["error"] == "403::Unknown client"
        assert answer["advice"]["reconnect"] == "handshake"
