"""Many Salesforce listeners of one integration on one login and one Bayeux client, against the simulator.

What issue 13 asks of the shared client: listeners join and leave the live client without the others
noticing (no handshake, no login); a channel refused fails its listener alone; what ends the session
(401 expiry, `403::Unknown client`) reaches every listener and costs exactly one login; the org's
concurrent client limit and the login rate limit are `retrying`, named, after a long back-off.
"""

from __future__ import annotations

import contextlib
import re

import pytest

from listenerd.model import Config
from listenerd.sim.salesforce import SalesforceSim
from tests.harness import Harness, desired, integration, listener, wait_for

PASSWORD, TOKEN = "shared-pass", "SHAREDTOKEN"
MAPPING = {"name": "Name", "replay": "$event.replayId", "channel": "$channel"}


def creds(url: str, **over: str):
    fields = {"consumer-key": "ck", "consumer-secret": "cs-secret", "username": "u@example.com",
              "password": PASSWORD, "secret-token": TOKEN, "login-url": url, **over}
    return integration("salesforce", **fields)


def want(sim, topics, tenant="t1", **over):
    """One listener per topic (id `L<topic>`), all on the tenant's one integration."""
    integration_ = creds(sim.url, **over)
    return {(tenant, f"L{topic}"): desired(listener(id=f"L{topic}", type="salesforce",
                                                     options={"topic": topic}, mapping=MAPPING), integration_)
            for topic in topics}


@pytest.fixture
async def sim():
    s = SalesforceSim(users={"u@example.com": PASSWORD + TOKEN}, clients={"ck": "cs-secret"}, long_poll=0.5)
    for name in ("A", "B", "C", "D"):
        s.create_topic(name, f"SELECT Id, Name FROM {name}__c")
    async with s:
        yield s


@contextlib.asynccontextmanager
async def supervised(tmp_path, wanted):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        await sup.start(wanted)
        yield h, sup


def all_started(sup, keys):
    return all(sup.status(k) is not None and sup.status(k).status == "started" for k in keys)


def names(events):
    return [e["event"]["name"] for e in events]


def channels_of(sim):
    return [sorted(c.subscriptions) for c in sim.bayeux.values()]


async def test_listeners_join_and_leave_the_live_client_without_the_others_noticing(tmp_path, sim):
    wanted = want(sim, ["A", "B"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), what="A and B started")
        assert sim.logins == 1 and sim.handshakes == 1 and channels_of(sim) == [["/topic/A", "/topic/B"]]
        sim.publish("A", {"Id": "a1", "Name": "a-one"})
        sim.publish("B", {"Id": "b1", "Name": "b-one"})
        await wait_for(lambda: sup.status(("t1", "LA")).received == 1 and sup.status(("t1", "LB")).received == 1,
                       what="one event each")

        # C joins the live client, A leaves it: B sees nothing of either
        wanted = {**want(sim, ["B", "C"])}
        changes = await sup.reconcile(wanted)
        assert changes["started"] == [("t1", "LC")] and changes["removed"] == [("t1", "LA")]
        assert changes["unchanged"] == [("t1", "LB")]
        await wait_for(lambda: all_started(sup, wanted), what="C started")
        await wait_for(lambda: channels_of(sim) == [["/topic/B", "/topic/C"]], what="A unsubscribed, C subscribed")
        sim.publish("A", {"Id": "a2", "Name": "a-two"})  # nobody follows A any more
        sim.publish("B", {"Id": "b2", "Name": "b-two"})
        sim.publish("C", {"Id": "c1", "Name": "c-one"})
        await wait_for(lambda: sup.status(("t1", "LB")).received == 2 and sup.status(("t1", "LC")).received == 1,
                       what="B keeps flowing, C flows")
        assert names(await h.events("t1", "LB")) == ["b-one", "b-two"]
        assert names(await h.events("t1", "LC")) == ["c-one"]
        assert names(await h.events("t1", "LA")) == ["a-one"]
        assert sim.logins == 1 and sim.handshakes == 1 and sim.live_clients == 1  # no login, no re-handshake
        assert sup.status(("t1", "LB")).attempts == 0
        unsubscribes = [m for m in sim.requests if m["channel"] == "/meta/unsubscribe"]
        assert [m["subscription"] for m in unsubscribes] == ["/topic/A"]
    assert sim.live_clients == 0  # the last one out disconnected


async def test_a_listener_changed_resubscribes_on_the_live_client_from_its_checkpoint(tmp_path, sim):
    wanted = want(sim, ["A", "B"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), what="A and B started")
        sim.publish("B", {"Id": "b1", "Name": "b-one"})
        await wait_for(lambda: sup.status(("t1", "LB")).received == 1, what="B's first event")
        changed = dict(wanted)
        spec = wanted[("t1", "LB")].listener.model_copy(update={"mapping": {"renamed": "Name"}})
        changed[("t1", "LB")] = desired(spec, wanted[("t1", "LB")].integration)
        assert (await sup.reconcile(changed))["restarted"] == [("t1", "LB")]
        await wait_for(lambda: all_started(sup, changed), what="B started again")
        sim.publish("A", {"Id": "a1", "Name": "a-one"})
        sim.publish("B", {"Id": "b2", "Name": "b-two"})
        await wait_for(lambda: sup.status(("t1", "LA")).received == 1, what="A flows")
        await wait_for(lambda: sup.status(("t1", "LB")).received >= 2, what="B flows")
        assert [e["event"] for e in await h.events("t1", "LB")][-1] == {"renamed": "b-two"}
        subscribes = [m for m in sim.requests if m["channel"] == "/meta/subscribe" and m["subscription"] == "/topic/B"]
        assert subscribes[-1]["ext"]["replay"]["/topic/B"] > 0  # from its checkpoint, not -1
        assert sim.logins == 1 and sim.handshakes == 1 and sup.status(("t1", "LA")).attempts == 0


async def test_a_refused_channel_fails_its_listener_alone(tmp_path, sim):
    sim.deny_subscribe("/topic/B")
    wanted = want(sim, ["A", "B"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: sup.status(("t1", "LB")).status == "failed", what="B failed")
        assert sup.status(("t1", "LB")).message == (
            "Subscription to /topic/B refused: 400::The channel you requested to subscribe to doesn't exist "
            "{/topic/B}")
        await wait_for(lambda: sup.status(("t1", "LA")).status == "started", what="A started")
        # the same on the live client: C is refused, A goes on
        sim.deny_subscribe("/topic/C", "403::Forbidden: no read access to C__c")
        wanted = {**wanted, **want(sim, ["C"])}
        await sup.reconcile(wanted)
        await wait_for(lambda: sup.status(("t1", "LC")).status == "failed", what="C failed")
        assert "403::Forbidden: no read access to C__c" in sup.status(("t1", "LC")).message
        sim.publish("A", {"Id": "a1", "Name": "a-one"})
        await wait_for(lambda: sup.status(("t1", "LA")).received == 1, what="A flows")
        assert sup.status(("t1", "LA")).status == "started" and sup.status(("t1", "LA")).attempts == 0
        assert sim.logins == 1 and sim.handshakes == 1 and channels_of(sim) == [["/topic/A"]]


@pytest.mark.parametrize("fault", ["expire_sessions", "http_401", "forget_clients"])
async def test_a_session_error_reaches_every_listener_and_costs_one_login(tmp_path, sim, fault):
    if fault == "http_401":
        sim.http_401 = True
    wanted = want(sim, ["A", "B", "C"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), what="all started")
        for topic in "ABC":
            sim.publish(topic, {"Id": f"{topic}1", "Name": f"{topic}-before"})
        await wait_for(lambda: all(sup.status(k).received == 1 for k in wanted), what="one event each")
        if fault == "forget_clients":
            sim.forget_clients()
        else:
            sim.expire_sessions()
        for topic in "ABC":
            sim.publish(topic, {"Id": f"{topic}2", "Name": f"{topic}-during"})
        await wait_for(lambda: all(sup.status(k).received == 2 for k in wanted), what="every listener recovered")
        for topic in "ABC":
            assert names(await h.events("t1", f"L{topic}")) == [f"{topic}-before", f"{topic}-during"]
        assert sim.logins == (1 if fault == "forget_clients" else 2)  # exactly one new login for the session
        assert sim.handshakes == 2 and sim.live_clients == 1
        assert all(sup.status(k).status == "started" and sup.status(k).attempts == 0 for k in wanted)


async def test_connects_that_fail_are_retried_on_the_same_client_before_any_handshake(tmp_path, sim):
    wanted = want(sim, ["A", "B"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), what="all started")
        client_id = next(iter(sim.bayeux))
        sim.fail_connects(4)  # more than the one retry a timed-out connect gets
        await wait_for(lambda: not sim._failing_connects, what="four connects refused")
        sim.publish("A", {"Id": "a1", "Name": "a-after"})
        await wait_for(lambda: sup.status(("t1", "LA")).received == 1, what="A flows on the same client")
        connects = [m for m in sim.requests if m["channel"] == "/meta/connect"]
        assert {m["clientId"] for m in connects} == {client_id}
        assert sim.handshakes == 1 and sim.logins == 1
        assert all(sup.status(k).status == "started" and sup.status(k).attempts == 0 for k in wanted)


async def test_an_abandoned_client_is_told_before_a_new_one_is_made(tmp_path, sim):
    wanted = want(sim, ["A", "B"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), what="all started")
        first = next(iter(sim.bayeux))
        sim.silence(True)  # connects time out on the same clientId, then the client is given up
        await wait_for(lambda: all(sup.status(k).status == "retrying" for k in wanted), what="both retrying")
        assert sup.status(("t1", "LA")).last_error == "Salesforce streaming: connect failed: timed out"
        connects = [m for m in sim.requests if m["channel"] == "/meta/connect" and m["clientId"] == first]
        assert len(connects) >= 3  # the first, the held one, and the retry on the same clientId
        await wait_for(lambda: any(m["channel"] == "/meta/disconnect" and m.get("clientId") == first
                                   for m in sim.requests), what="the old client disconnected")
        sim.silence(False)
        await wait_for(lambda: all_started(sup, wanted), what="started again")
        assert sim.logins == 1 and sim.live_clients == 1


async def test_thirty_listeners_of_a_developer_org_share_one_client_and_one_login(tmp_path, sim):
    assert sim.max_clients == 20
    topics = [f"T{i:02d}" for i in range(30)]
    for topic in topics:
        sim.create_topic(topic, f"SELECT Id FROM {topic}__c")
    wanted = want(sim, topics)
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), timeout=30, what="30 listeners started")
        assert sim.logins == 1 and sim.live_clients == 1 and sim.handshakes == 1
        sim.publish("T29", {"Id": "x", "Name": "last"})
        await wait_for(lambda: sup.status(("t1", "LT29")).received == 1, what="an event on the 30th")


def next_attempt_seconds(message: str) -> float:
    return float(re.search(r"next attempt in ([0-9.]+)s", message).group(1))


async def test_the_org_client_limit_is_retrying_and_named(tmp_path, sim):
    sim.max_clients = 1
    first, second = want(sim, ["A"], tenant="t1"), want(sim, ["B"], tenant="t2")  # two integrations, one org
    async with supervised(tmp_path, {**first, **second}) as (h, sup):
        await wait_for(lambda: sup.status(("t2", "LB")).status == "retrying"
                       or sup.status(("t1", "LA")).status == "retrying", what="one refused")
        await wait_for(lambda: sum(sup.status(k).status == "started" for k in (*first, *second)) == 1,
                       what="the other started")
        refused = next(sup.status(k) for k in (*first, *second) if sup.status(k).status == "retrying")
        assert "limit of concurrent streaming clients" in refused.message
        assert "403::Organization concurrent user limit exceeded" in refused.message
        assert next_attempt_seconds(refused.message) >= 48  # minutes, not the usual back-off
        assert sim.live_clients == 1 and sim.logins == 2


async def test_the_login_rate_limit_is_retrying_and_named(tmp_path, sim):
    sim.max_logins_per_hour = 0
    wanted = want(sim, ["A", "B"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all(sup.status(k).status == "retrying" for k in wanted), what="retrying")
        for key in wanted:
            record = sup.status(key)
            assert "login rate limit" in record.message and "LOGIN_RATE_EXCEEDED" in record.message
            assert next_attempt_seconds(record.message) >= 48
        assert sim.logins == 0 and sim.login_attempts == 1  # one attempt for both, not one per listener


async def test_a_session_expiry_under_two_hundred_listeners_costs_one_login(tmp_path, sim):
    topics = [f"E{i:03d}" for i in range(200)]
    for topic in topics:
        sim.create_topic(topic, f"SELECT Id FROM {topic}__c")
    wanted = want(sim, topics)
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), timeout=60, what="200 listeners started")
        assert sim.logins == 1 and sim.live_clients == 1
        sim.expire_sessions()
        await wait_for(lambda: sim.handshakes == 2 and sum(len(c.subscriptions) for c in sim.bayeux.values()) == 200,
                       timeout=30, what="every channel resubscribed on a new client")
        sim.publish("E199", {"Id": "x", "Name": "after"})
        await wait_for(lambda: sup.status(("t1", "LE199")).received == 1, timeout=30, what="event after expiry")
        assert sim.logins == 2 and sim.live_clients == 1  # exactly one new login
        assert all_started(sup, wanted) and all(sup.status(k).attempts == 0 for k in wanted)


async def test_a_bug_in_the_control_lane_ends_the_client_loudly_and_it_recovers(tmp_path, sim, monkeypatch):
    from listenerd.sources.bayeux import BayeuxClient

    wanted = want(sim, ["A"])
    async with supervised(tmp_path, wanted) as (h, sup):
        await wait_for(lambda: all_started(sup, wanted), what="A started")

        def broken(self, request, messages):
            raise RuntimeError("boom")

        monkeypatch.setattr(BayeuxClient, "control_answer", broken)
        wanted = {**wanted, **want(sim, ["C"])}
        await sup.reconcile(wanted)  # C joins the live client: its subscribe answer hits the bug
        await wait_for(lambda: sup.status(("t1", "LA")).attempts >= 1, what="A retried")
        assert sup.status(("t1", "LA")).last_error == "Unexpected error: RuntimeError: boom"
        monkeypatch.undo()
        await wait_for(lambda: all_started(sup, wanted), what="both started on a new client")
        assert sim.logins == 1
