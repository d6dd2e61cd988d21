"""Checked against code written by others, in both directions.

- aiosfstream-ng (a real Salesforce streaming client) logs in to the simulator, subscribes with a replay
  map and reads events, also across a forgotten client, with two topics on one client, and is
  refused past the org's client limit: so the simulator speaks Salesforce's dialect.
- listenerd's Bayeux driver (sources/salesforce.py + bayeux.py) subscribes to a real faye server started
  from this test and receives what is published there: so our client speaks Bayeux, not just our sim.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest
from aiosfstream_ng import Client, PasswordAuthenticator
from aiosfstream_ng.replay import ReplayMarker

from listenerd.model import Config
from listenerd.sim.salesforce import SalesforceSim
from listenerd.sources.salesforce import Connection
from listenerd.sources.salesforce_auth import Login, Session
from tests.harness import Harness, desired, integration, listener, wait_for

PEERS = Path(__file__).parent
NODE = shutil.which("node") or "/usr/bin/node"
FAYE_INSTALLED = (PEERS / "node_modules" / "faye").exists()


class SimAuthenticator(PasswordAuthenticator):
    """aiosfstream-ng posts to login.salesforce.com; aim it at the simulator (protocol notes, section 5)."""

    def __init__(self, token_url: str, **kw):
        super().__init__(**kw)
        self._sim_token_url = token_url

    @property
    def _token_url(self) -> str:
        return self._sim_token_url


@pytest.fixture
async def sim():
    s = SalesforceSim(users={"u@example.com": "pwTOKEN"}, clients={"ck": "cs"}, long_poll=0.5)
    s.create_topic("Invoices", "SELECT Id, Name FROM Invoice__c")
    async with s:
        yield s


def authenticator(sim):
    return SimAuthenticator(sim.token_url, consumer_key="ck", consumer_secret="cs", username="u@example.com",
                            password="pwTOKEN")


async def receive(client, n):
    out = []
    async with asyncio.timeout(10):
        while len(out) < n:
            out.append(await client.receive())
    return out


async def test_aiosfstream_reads_events_with_replay_from_the_simulator(sim):
    ids = [sim.publish("Invoices", {"Id": f"a{i}", "Name": f"n{i}"}) for i in range(5)]
    # aiosfstream's mapping storage: resume after the 2nd event
    replay = {"/topic/Invoices": ReplayMarker(date="2026-11-23T00:00:00.000Z", replay_id=ids[1])}
    async with Client(authenticator(sim), replay=replay) as client:
        await client.subscribe("/topic/Invoices")
        got = await receive(client, 3)
        assert [m["data"]["event"]["replayId"] for m in got] == ids[2:]
        assert [m["data"]["sobject"]["Name"] for m in got] == ["n2", "n3", "n4"]
        live = sim.publish("Invoices", {"Id": "a9", "Name": "live"}, type="updated")
        (message,) = await receive(client, 1)
        assert message["channel"] == "/topic/Invoices"
        assert message["data"]["event"] == {**message["data"]["event"], "replayId": live, "type": "updated"}
    # aiosfstream sends no `ext.replay: true` on its handshake (Salesforce does not insist; nor does the sim)
    subscribe = next(m for m in sim.requests if m["channel"] == "/meta/subscribe")
    assert subscribe["ext"]["replay"] == {"/topic/Invoices": ids[1]}


async def test_aiosfstream_survives_a_forgotten_client(sim):
    async with Client(authenticator(sim), replay={}) as client:
        await client.subscribe("/topic/Invoices")
        await wait_for(lambda: any(c.connects >= 2 for c in sim.bayeux.values()), what="a held connect")
        first = sim.publish("Invoices", {"Id": "a1", "Name": "one"})
        (one,) = await receive(client, 1)
        assert one["data"]["event"]["replayId"] == first
        sim.forget_clients()
        await wait_for(lambda: len(sim.bayeux) == 1, what="aiosfstream re-handshakes")
        await wait_for(lambda: any(c.subscriptions for c in sim.bayeux.values()), what="and resubscribes")
        second = sim.publish("Invoices", {"Id": "a2", "Name": "two"})
        (two,) = await receive(client, 1)
        assert two["data"]["event"]["replayId"] == second


async def test_aiosfstream_sees_a_rejected_login(sim):
    from aiosfstream_ng.exceptions import AuthenticationError

    bad = SimAuthenticator(sim.token_url, consumer_key="ck", consumer_secret="cs", username="u@example.com",
                           password="nope")
    with pytest.raises(AuthenticationError) as info:
        async with Client(bad):
            pass
    assert "invalid_grant" in str(info.value.args)


async def test_aiosfstream_follows_two_topics_on_one_client(sim):
    """What listenerd's shared client does, done by a client written by others: one login, one handshake,
    two subscribes each with its own replay entry, events of both topics on the one connect loop."""
    sim.create_topic("Orders", "SELECT Id, Name FROM Order__c")
    seen = sim.publish("Orders", {"Id": "o0", "Name": "order-seen"})
    sim.publish("Orders", {"Id": "o0", "Name": "order-before"})
    replay = {"/topic/Orders": ReplayMarker(date="2026-11-23T00:00:00.000Z", replay_id=seen)}
    async with Client(authenticator(sim), replay=replay) as client:
        await client.subscribe("/topic/Invoices")
        await client.subscribe("/topic/Orders")
        (replayed,) = await receive(client, 1)
        assert replayed["data"]["sobject"]["Name"] == "order-before"
        invoice = sim.publish("Invoices", {"Id": "a1", "Name": "inv"})
        order = sim.publish("Orders", {"Id": "o1", "Name": "ord"})
        got = await receive(client, 2)
        assert sorted((m["channel"], m["data"]["event"]["replayId"]) for m in got) == [
            ("/topic/Invoices", invoice), ("/topic/Orders", order)]
        assert sim.logins == 1 and sim.handshakes == 1 and sim.live_clients == 1
        (live,) = sim.bayeux.values()
        assert live.subscriptions == {"/topic/Invoices", "/topic/Orders"}
    subscribes = [m for m in sim.requests if m["channel"] == "/meta/subscribe"]
    assert [m["subscription"] for m in subscribes] == ["/topic/Invoices", "/topic/Orders"]
    # its map holds what it knows per channel (nothing yet for Invoices: the server's default, -1)
    assert [m.get("ext", {}).get("replay") for m in subscribes] == [None, {"/topic/Orders": seen}]
    assert sim.live_clients == 0  # aiosfstream disconnected on exit: the slot is free


async def test_aiosfstream_is_refused_past_the_org_client_limit(sim):
    from aiosfstream_ng.exceptions import ServerError

    sim.max_clients = 1
    async with Client(authenticator(sim)) as first:
        await first.subscribe("/topic/Invoices")
        with pytest.raises(ServerError) as info:
            async with Client(authenticator(sim)):
                pass
        assert sim.live_clients == 1
    _, reply = info.value.args
    assert reply["error"] == "403::Handshake denied"
    assert reply["ext"] == {"sfdc": {"failureReason": "403::Organization concurrent user limit exceeded"}}
    assert sim.live_clients == 0  # the first one disconnected: the slot is free again


async def test_aiosfstream_and_listenerd_see_the_same_platform_and_change_events(tmp_path, sim):
    """aiosfstream-ng reads a Platform Event and a CDC channel of the simulator (its replay storage parses
    each message's date from the shape: `payload.CreatedDate`, `ChangeEventHeader.commitTimestamp`, so a
    wrong shape raises there); listenerd follows the same channels: both see the same payloads and ids."""
    sim.define_platform_event("Order__e")
    sim.enable_change_events("Account")
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    creds = integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs", "username": "u@example.com",
                                         "password": "pwTOKEN", "login-url": sim.url})
    pe, cdc = ("t", "PE"), ("t", "CDC")
    async with Harness(tmp_path, config) as h, Client(authenticator(sim), replay={}) as client:
        sup = h.supervisor()
        await sup.start({pe: desired(listener(id="PE", type="salesforce", options={"topic": "/event/Order__e"}),
                                     creds),
                         cdc: desired(listener(id="CDC", type="salesforce",
                                               options={"topic": "/data/AccountChangeEvent"}), creds)})
        await client.subscribe("/event/Order__e")
        await client.subscribe("/data/AccountChangeEvent")
        await wait_for(lambda: all(sup.status(k).status == "started" for k in (pe, cdc)), what="listenerd started")
        order = sim.publish_event("Order__e", {"Amount__c": 12.5, "Ref__c": "O-1"})
        change = sim.publish_change("Account", "UPDATE", ["001A"], {"Name": "Acme"}, changed_fields=["Name"])
        got = {m["channel"]: m for m in await receive(client, 2)}
        await wait_for(lambda: sup.status(pe).received == 1 and sup.status(cdc).received == 1, what="listenerd")
        theirs_pe, theirs_cdc = got["/event/Order__e"]["data"], got["/data/AccountChangeEvent"]["data"]
        assert theirs_pe["event"]["replayId"] == order and theirs_cdc["event"]["replayId"] == change
        assert theirs_pe["payload"]["Amount__c"] == 12.5 and "EventUuid" in theirs_pe["event"]
        assert theirs_cdc["payload"]["ChangeEventHeader"]["changeType"] == "UPDATE"
        assert [e["event"] for e in await h.events("t", "PE")] == [theirs_pe["payload"]]
        assert [e["event"] for e in await h.events("t", "CDC")] == [theirs_cdc["payload"]]
        assert await h.store.get_checkpoint(*pe) == str(order)
        assert await h.store.get_checkpoint(*cdc) == str(change)
        # aiosfstream stored a replay marker for each channel: it parsed each message's date from its shape
        assert (await client.replay_storage.get_replay_marker("/event/Order__e")).replay_id == order
        assert (await client.replay_storage.get_replay_marker("/data/AccountChangeEvent")).replay_id == change


# ---------------------------------------------------------------- listenerd against faye


class FayeLogin(Login):
    """faye has no OAuth: a bearer it checks, preset; a relogin is counted, and gives the same token."""

    def __init__(self, creds, settings, token):
        super().__init__(creds, settings)
        self.session = Session(token, creds.login_url, "org")
        self.refreshes = 0

    async def refresh(self, stale):
        self.refreshes += 1
        return self.session


def faye_connection(h, creds, spec, token="peer-token"):
    login = FayeLogin(creds, h.config.sources, token)
    connection = Connection(login, spec.options.version, h.config.sources)
    return login, connection


async def leave(connection, member):
    connection.remove(member)
    await asyncio.wait({connection.task}, timeout=5)


class Faye:
    def __init__(self, proc: asyncio.subprocess.Process, port: int):
        self.proc = proc
        self.port = port
        self.url = f"http://localhost:{port}"
        self.seen: list[dict] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout
        while line := await self.proc.stdout.readline():
            self.seen.append(json.loads(line))

    async def publish(self, channel: str, data: dict) -> None:
        """Publish and wait for faye's acknowledgement, so several publishes keep their order."""
        assert self.proc.stdin
        done = sum(1 for s in self.seen if "published" in s)
        self.proc.stdin.write((json.dumps({"publish": channel, "data": data}) + "\n").encode())
        await self.proc.stdin.drain()
        await wait_for(lambda: sum(1 for s in self.seen if "published" in s) > done, what="faye publish ack")

    async def forget(self, client_id: str) -> None:
        assert self.proc.stdin
        self.proc.stdin.write((json.dumps({"forget": client_id}) + "\n").encode())
        await self.proc.stdin.drain()
        await wait_for(lambda: any(s.get("forgotten") == client_id for s in self.seen), what="faye forgets")

    async def close(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()
        self._reader.cancel()


@pytest.fixture
async def faye():
    if not FAYE_INSTALLED:
        pytest.skip("npm faye is not installed in tests/peers (run npm ci there)")
    proc = await asyncio.create_subprocess_exec(NODE, str(PEERS / "faye_server.js"), stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE, env={**os.environ,
                                                                                     "FAYE_TOKEN": "peer-token"})
    assert proc.stdout
    first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 10))
    server = Faye(proc, first["port"])
    yield server
    await server.close()


async def test_listenerd_bayeux_client_receives_from_a_real_faye_server(tmp_path, faye):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")}})
    creds = integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs", "username": "u",
                                         "password": "p", "login-url": faye.url})
    spec = listener(id="LF", type="salesforce", options={"topic": "Invoices"},
                    mapping={"name": "Name", "replay": "$event.replayId", "channel": "$channel"})
    async with Harness(tmp_path, config) as h:
        ctx = h.context("t", spec, creds)
        record = h.records[("t", "LF")]
        _, connection = faye_connection(h, creds, spec)
        member = connection.add(ctx, spec.options, -1)
        await wait_for(lambda: any("subscribe" in s for s in faye.seen), what="faye sees the subscription")
        # faye records the request before it answers: the client is started once the answer is read
        await wait_for(lambda: record.status == "started", what="started on faye's answer")
        assert record.message == "Subscribed to topic: /topic/Invoices"
        for i in range(1, 4):
            await faye.publish("/topic/Invoices", {"event": {"replayId": i, "type": "created",
                                                             "createdDate": "2026-11-23T00:00:00.000Z"},
                                                   "sobject": {"Id": f"a{i}", "Name": f"n{i}"}})
        await wait_for(lambda: record.received == 3, what="three events through faye")
        events = await h.events()
        assert [e["event"] for e in events] == [{"name": f"n{i}", "replay": i, "channel": "/topic/Invoices"}
                                                for i in range(1, 4)]
        assert await h.store.get_checkpoint("t", "LF") == "3"
        await leave(connection, member)  # the last listener out: unsubscribe and disconnect
        await wait_for(lambda: any("disconnect" in s for s in faye.seen), what="faye sees the disconnect")
        assert any(s.get("unsubscribe") == "/topic/Invoices" for s in faye.seen)


async def test_listenerd_bayeux_client_is_refused_by_faye_without_the_token(tmp_path, faye):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")}})
    creds = integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs", "username": "u",
                                         "password": "p", "login-url": faye.url})
    spec = listener(id="LF", type="salesforce", options={"topic": "Invoices"})
    async with Harness(tmp_path, config) as h:
        login, connection = faye_connection(h, creds, spec, token="wrong-token")
        member = connection.add(h.context("t", spec, creds), spec.options, -1)
        outcome = await asyncio.wait_for(member.outcome, 10)
        # faye has no token endpoint: the one relogin the 401 asks for is counted, then the client gives up
        assert "401::Authentication invalid" in outcome.reason and login.refreshes == 1
        await leave(connection, member)



async def test_listenerd_rehandshakes_and_resubscribes_when_faye_forgets_it(tmp_path, faye):
    """faye's own words for a lost session ("401:<id>:Unknown client", advice handshake) mean a new
    handshake and a resubscribe, not a login; events published afterwards arrive."""
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")}})
    creds = integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs", "username": "u",
                                         "password": "p", "login-url": faye.url})
    spec = listener(id="LF", type="salesforce", options={"topic": "Invoices"}, mapping={"replay": "$event.replayId"})
    async with Harness(tmp_path, config) as h:
        ctx = h.context("t", spec, creds)
        record = h.records[("t", "LF")]
        _, connection = faye_connection(h, creds, spec)
        member = connection.add(ctx, spec.options, -1)
        try:
            await wait_for(lambda: any("subscribe" in s for s in faye.seen), what="subscribed")
            first_client = next(s["clientId"] for s in faye.seen if "subscribe" in s)
            await faye.forget(first_client)
            await wait_for(lambda: sum("subscribe" in s for s in faye.seen) == 2, what="resubscribed after a handshake")
            second_client = [s["clientId"] for s in faye.seen if "subscribe" in s][1]
            assert second_client != first_client
            await faye.publish("/topic/Invoices", {"event": {"replayId": 7, "type": "created"}, "sobject": {"Id": "a"}})
            await wait_for(lambda: record.received == 1, what="event after the re-handshake")
            assert [e["event"] for e in await h.events()] == [{"replay": 7}]
            assert record.status == "started"
        finally:
            await leave(connection, member)
