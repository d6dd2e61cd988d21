"""The Salesforce source against the simulator over loopback, driven by the real supervisor and outbox.

Each fault of the issue: bad credentials, connection refused, session expiry, unknown client,
advice handshake/retry/none, a dropped long poll, a replayId outside the retention window, a missing
topic with and without a query, silence, malformed JSON, a server restart, and the goodbye on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest
import structlog

from listenerd.delivery.ids import event_id
from listenerd.model import Config
from listenerd.sim.salesforce import ORG_ID, SalesforceSim
from tests.harness import Harness, desired, integration, listener, wait_for

PASSWORD, TOKEN = "pa55-word", "SECTOKEN123"
KEY = ("t1", "LS1")


def creds(url: str, **over: str):
    fields = {"consumer-key": "ck", "consumer-secret": "cs-secret", "username": "u@example.com",
              "password": PASSWORD, "secret-token": TOKEN, "login-url": url, **over}
    return integration("salesforce", **fields)


def spec(**options):
    options.setdefault("topic", "Invoices")
    return listener(id=KEY[1], type="salesforce", options=options,
                    mapping={"name": "Name", "kind": "$event.type", "replay": "$event.replayId",
                             "channel": "$channel", "at": "$event.createdDate"})


@pytest.fixture
async def sim():
    s = SalesforceSim(users={"u@example.com": PASSWORD + TOKEN}, clients={"ck": "cs-secret"}, long_poll=0.5)
    s.create_topic("Invoices", "SELECT Id, Name FROM Invoice__c")
    async with s:
        yield s


@contextlib.asynccontextmanager
async def running(tmp_path, sim_or_url, replay_checkpoint=None, creds_over=None, **options):
    url = sim_or_url if isinstance(sim_or_url, str) else sim_or_url.url
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    async with Harness(tmp_path, config) as h:
        if replay_checkpoint is not None:
            await h.store.set_checkpoint(*KEY, replay_checkpoint)
        sup = h.supervisor()
        await sup.start({KEY: desired(spec(**options), creds(url, **(creds_over or {})))})
        yield h, sup, sup.status(KEY)  # the harness stops the supervisor, also when the test fails


async def started(record, what="started"):
    await wait_for(lambda: record.status == "started", what=what)


def names(events):
    return [e["event"]["name"] for e in events]


async def test_events_flow_with_envelope_fields_ids_and_checkpoint(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        assert record.message == "Subscribed to topic: /topic/Invoices"
        ids = [sim.publish("Invoices", {"Id": f"a0{i}", "Name": f"INV-{i}"}, type="updated") for i in range(3)]
        await wait_for(lambda: record.received == 3, what="3 events")
        events = await h.events()
        assert names(events) == ["INV-0", "INV-1", "INV-2"]
        first = events[0]["event"]
        assert first["kind"] == "updated" and first["replay"] == ids[0] and first["channel"] == "/topic/Invoices"
        assert first["at"].endswith("Z")
        assert events[0]["id"] == event_id(*KEY, f"{ORG_ID}/Invoices/{ids[0]}")
        assert await h.store.get_checkpoint(*KEY) == str(ids[-1])
        subscribe = next(m for m in sim.requests if m["channel"] == "/meta/subscribe")
        assert subscribe["ext"] == {"replay": {"/topic/Invoices": -1}}


async def test_bad_credentials_fail_with_salesforce_words_and_no_secret(tmp_path, sim):
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, sim, creds_over={"password": "wrong-password"}) as (_, _, record):
            await wait_for(lambda: record.status == "failed", what="failed")
            await asyncio.sleep(0.2)  # a retry would have happened by now at a 0.05 s back-off
            assert record.attempts == 0
    assert "wrong-password" not in repr(logs) and TOKEN not in repr(logs) and "cs-secret" not in repr(logs)
    async with running(tmp_path, sim, creds_over={"password": "wrong-password"}) as (_, _, record):
        await wait_for(lambda: record.status == "failed", what="failed")
        assert record.message == "Salesforce rejected the login: invalid_grant: authentication failure"
        assert "wrong-password" not in record.message and TOKEN not in record.message
    async with running(tmp_path, sim, creds_over={"consumer-secret": "bad-secret"}) as (_, _, record):
        await wait_for(lambda: record.status == "failed", what="failed")
        assert "invalid_client: invalid client credentials" in record.message
    assert sim.logins == 0


async def test_connection_refused_retries(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with running(tmp_path, f"http://localhost:{port}") as (_, _, record):
        await wait_for(lambda: record.attempts >= 2, what="two attempts")
        assert record.status in ("retrying", "starting")
        assert f"Cannot reach http://localhost:{port}" in record.last_error


@pytest.mark.parametrize("http_401", [False, True])
async def test_session_expiry_logs_in_again_without_loss(tmp_path, sim, http_401):
    sim.http_401 = http_401
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a1", "Name": "before"})
        await wait_for(lambda: record.received == 1, what="first event")
        sim.expire_sessions()
        sim.publish("Invoices", {"Id": "a2", "Name": "during"})
        await wait_for(lambda: sim.logins == 2, what="a fresh login")
        sim.publish("Invoices", {"Id": "a3", "Name": "after"})
        await wait_for(lambda: record.received == 3, what="all events")
        assert names(await h.events()) == ["before", "during", "after"]
        assert record.status == "started" and record.attempts == 0


async def test_unknown_client_rehandshakes_and_resubscribes_with_last_replay_id(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        last = sim.publish("Invoices", {"Id": "a1", "Name": "one"})
        await wait_for(lambda: record.received == 1, what="first event")
        sim.forget_clients()
        sim.publish("Invoices", {"Id": "a2", "Name": "missed-while-forgotten"})
        await wait_for(lambda: record.received == 2, what="replayed event")
        subscribes = [m for m in sim.requests if m["channel"] == "/meta/subscribe"]
        assert len(subscribes) == 2 and subscribes[1]["ext"]["replay"] == {"/topic/Invoices": last}
        assert names(await h.events()) == ["one", "missed-while-forgotten"]
        assert sim.logins == 1 and record.status == "started"


@pytest.mark.parametrize("reconnect,error", [("handshake", None), ("retry", "500::Server busy")])
async def test_advice_handshake_and_retry_keep_the_stream(tmp_path, sim, reconnect, error):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a0", "Name": "zero"})
        await wait_for(lambda: record.received == 1, what="first event")
        sim.advise(reconnect, error)
        sim.publish("Invoices", {"Id": "a1", "Name": "one"})
        await wait_for(lambda: record.received == 2, what="event after advice")
        assert names(await h.events()) == ["zero", "one"]
        handshakes = [m for m in sim.requests if m["channel"] == "/meta/handshake"]
        assert len(handshakes) == (2 if reconnect == "handshake" else 1)
        assert record.status == "started" and record.attempts == 0


@pytest.mark.parametrize("replay", ["resume", "new"])
async def test_advice_none_is_reported_retrying_then_resumes_from_checkpoint(tmp_path, sim, replay):
    # `new` starts at -1 on launch, but a retry within the launch resumes from the checkpoint: no gap
    async with running(tmp_path, sim, replay=replay) as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a1", "Name": "one"})
        await wait_for(lambda: record.received == 1, what="first")
        sim.advise("none", "403::Organization total events daily limit exceeded")
        await wait_for(lambda: record.attempts >= 1, what="retry")
        assert "daily limit exceeded" in record.last_error
        sim.publish("Invoices", {"Id": "a2", "Name": "two"})
        await wait_for(lambda: record.received == 2, what="event after the retry")
        assert names(await h.events()) == ["one", "two"]
        assert record.status == "started"
        subscribes = [m for m in sim.requests if m["channel"] == "/meta/subscribe"]
        assert subscribes[-1]["ext"]["replay"]["/topic/Invoices"] > 0


async def test_dropped_long_poll_reconnects_without_loss(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        await wait_for(lambda: any(c.connects >= 2 for c in sim.bayeux.values()), what="a held connect")
        sim.drop_long_polls()
        sim.publish("Invoices", {"Id": "a1", "Name": "one"})
        await wait_for(lambda: record.received == 1, what="event after the drop")
        assert record.status == "started" and record.attempts == 0


async def test_replay_id_outside_retention_falls_back_to_all_and_says_so(tmp_path, sim):
    for i in range(10):
        sim.publish("Invoices", {"Id": f"a{i}", "Name": f"n{i}"})
    sim.purge(upto=8)
    async with running(tmp_path, sim, replay_checkpoint="3") as (h, sup, record):
        await started(record)
        await wait_for(lambda: record.received == 2, what="retained events")
        assert names(await h.events()) == ["n8", "n9"]
        assert "replayId 3 is no longer retained" in record.message and "all retained events" in record.message
        assert record.message.startswith("Subscribed to topic: /topic/Invoices")
        assert h.metrics.listener_errors.labels(*KEY, "replay_gap")._value.get() == 1


async def test_resume_from_checkpoint_and_all_and_new(tmp_path, sim):
    for i in range(4):
        sim.publish("Invoices", {"Id": f"a{i}", "Name": f"n{i}"})
    async with running(tmp_path, sim, replay_checkpoint="2") as (h, sup, record):
        await wait_for(lambda: record.received == 2, what="resume after 2")
        assert names(await h.events()) == ["n2", "n3"]
    (tmp_path / "all").mkdir()
    async with running(tmp_path / "all", sim, replay_checkpoint="2", replay="all") as (h, sup, record):
        await wait_for(lambda: record.received == 4, what="all")
    (tmp_path / "new").mkdir()
    async with running(tmp_path / "new", sim, replay_checkpoint="2", replay="new") as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a9", "Name": "fresh"})
        await wait_for(lambda: record.received == 1, what="new only")
        assert names(await h.events()) == ["fresh"]


async def test_missing_topic_without_query_fails_clearly(tmp_path, sim):
    async with running(tmp_path, sim, topic="Nope") as (_, _, record):
        await wait_for(lambda: record.status == "failed", what="failed")
        assert "PushTopic Nope does not exist" in record.message and "query" in record.message


async def test_missing_topic_with_query_is_created(tmp_path, sim):
    query = "SELECT Id, Name FROM Account"
    async with running(tmp_path, sim, topic="/topic/Accounts", query=query) as (h, _, record):
        await started(record)
        assert sim.topics["Accounts"]["Query"] == query
        sim.publish("Accounts", {"Id": "001", "Name": "Acme"})
        await wait_for(lambda: record.received == 1, what="event on the new topic")


async def test_bad_query_fails_with_salesforce_words(tmp_path, sim):
    async with running(tmp_path, sim, topic="Bad", query="SELECT Name FROM Account") as (_, _, record):
        await wait_for(lambda: record.status == "failed", what="failed")
        assert "INVALID_FIELD" in record.message


async def test_silence_is_reported_retrying_then_recovers(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a0", "Name": "zero"})
        await wait_for(lambda: record.received == 1, what="first event")
        sim.silence(True)
        await wait_for(lambda: record.status == "retrying", what="retrying on silence")
        # the Bayeux core is the judge: two timed-out polls; the supervisor's guard waits twice as long
        assert record.last_error == "Salesforce streaming: connect failed: timed out"
        sim.silence(False)
        sim.publish("Invoices", {"Id": "a1", "Name": "after-silence"})
        await wait_for(lambda: record.received == 2, what="event after recovery")
        assert names(await h.events()) == ["zero", "after-silence"]
        assert record.status == "started"


async def test_malformed_json_answer_is_recovered_by_replay(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a0", "Name": "zero"})
        await wait_for(lambda: record.received == 1, what="first")
        sim.corrupt_next_connect()
        sim.publish("Invoices", {"Id": "a1", "Name": "lost-in-garbage"})
        await wait_for(lambda: record.received == 2, what="replayed after garbage")
        events = await h.events()
        assert names(events) == ["zero", "lost-in-garbage"]
        assert len({e["id"] for e in events}) == 2
        assert h.metrics.listener_errors.labels(*KEY, "malformed")._value.get() == 1


async def test_server_restart_recovers_without_loss(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        sim.publish("Invoices", {"Id": "a0", "Name": "zero"})
        await wait_for(lambda: record.received == 1, what="first")
        await sim.restart()
        sim.publish("Invoices", {"Id": "a1", "Name": "one"})
        await wait_for(lambda: record.received == 2, what="after restart")
        assert names(await h.events()) == ["zero", "one"]


async def test_stop_unsubscribes_and_disconnects(tmp_path, sim):
    async with running(tmp_path, sim) as (h, sup, record):
        await started(record)
        client_id = next(iter(sim.bayeux))
    assert record.status == "stopped"
    tail = [m["channel"] for m in sim.requests if m.get("clientId") == client_id][-2:]
    assert tail == ["/meta/unsubscribe", "/meta/disconnect"]
    assert client_id not in sim.bayeux


@pytest.mark.parametrize("replay", ["resume", "new"])
async def test_a_checkpoint_set_like_the_api_restarts_from_there(tmp_path, sim, replay):
    async with running(tmp_path, sim, replay=replay) as (h, sup, record):
        await started(record)
        ids = [sim.publish("Invoices", {"Id": f"a{i}", "Name": f"n{i}"}) for i in range(4)]
        await wait_for(lambda: record.received == 4, what="four events")
        # what PUT .../checkpoint does: a restart that writes the checkpoint and resumes from it
        await sup.restart(KEY, while_stopped=lambda: h.store.set_checkpoint(*KEY, str(ids[1])),
                          replay_from=str(ids[1]))
        await wait_for(lambda: record.received == 6, what="the two events after the checkpoint, again")
        assert names(await h.events()) == ["n0", "n1", "n2", "n3", "n2", "n3"]
        events = await h.events()
        assert events[2]["id"] == events[4]["id"]  # a replay keeps the id: the engine de-duplicates


async def test_an_answer_past_the_size_bound_is_refused_not_buffered(tmp_path, sim):
    from listenerd.outcome import Retry
    from listenerd.sources.salesforce import Connection
    from listenerd.sources.salesforce_auth import Login

    async with Harness(tmp_path) as h:
        creds_ = creds(sim.url)
        spec_ = spec()
        login = Login(creds_, h.config.sources)
        connection = Connection(login, spec_.options.version, h.config.sources)
        connection.max_answer = 20_000
        member = connection.add(h.context(KEY[0], spec_, creds_), spec_.options, -1)
        try:
            await wait_for(lambda: any(c.subscriptions for c in sim.bayeux.values()), what="subscribed")
            sim.publish("Invoices", {"Id": "a0", "Name": "small"})
            await wait_for(lambda: h.records[KEY].received == 1, what="a small event")
            sim.publish("Invoices", {"Id": "a1", "Name": "x" * 50_000})
            outcome = await asyncio.wait_for(member.outcome, 10)
            # each new session asked for the events after "small" again (replay), until the machine gave up
            assert isinstance(outcome, Retry)
            assert "larger than 20000 bytes" in outcome.reason and "handshakes" in outcome.reason
            assert names(await h.events()) == ["small"]
            assert h.metrics.listener_errors.labels(*KEY, "oversized")._value.get() >= 3
        finally:
            connection.remove(member)
            await asyncio.wait({connection.task}, timeout=5)
