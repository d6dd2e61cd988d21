"""The Pub/Sub API source against the simulators over loopback gRPC, driven by the real supervisor and outbox.

Failure is a feature: bad credentials, refused connection, a dropped stream, an expired token, an
unknown topic, a refused replay id, silence, a restart resuming from the checkpoint, and the engine
down with flow control (the outbox bound holds, nothing is dropped, the stream resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
import structlog

from listenerd import version
from listenerd.delivery.ids import event_id
from listenerd.delivery.outbox import Outbox
from listenerd.model import Config
from listenerd.sim.salesforce import ORG_ID, SalesforceSim
from listenerd.sim.salesforce_pubsub import SalesforcePubsubSim
from listenerd.sources.salesforce_pubsub import PubSubChannels
from tests.harness import Harness, desired, integration, listener, wait_for
from tests.tls import self_signed

PASSWORD, TOKEN = "pa55-word", "SECTOKEN123"
KEY = ("t1", "LP1")
ORDERS = "/event/Order__e"
# The simulator keeps its promise with room to spare, as Salesforce does (a keepalive "at least every 270 s"
# against a bound of 270 x 1.2 s): a keepalive every 0.1 s against the listener's 0.5 x 1.2 s. With both at
# 0.3 s the bound left 60 ms for scheduling, and a loaded machine's late keepalive made a spurious new stream.
SIM_KEEPALIVE, KEEPALIVE = 0.1, 0.5


def creds(org_url: str, pubsub_url: str, **over: str):
    fields = {"consumer-key": "ck", "consumer-secret": "cs-secret", "username": "u@example.com",
              "password": PASSWORD, "secret-token": TOKEN, "login-url": org_url, "pubsub-url": pubsub_url, **over}
    return integration("salesforce", **fields)


def spec(listener_id: str = KEY[1], **options):
    options.setdefault("topic", ORDERS)
    return listener(id=listener_id, type="salesforce-pubsub", options=options,
                    mapping={"order": "OrderNumber__c", "replay": "$event.replayId", "schema": "$schema.id",
                             "channel": "$channel", "entity": "$header.entityName",
                             "changed": "$header.changedFields", "nulled": "$header.nulledFields",
                             "name": "Name", "city": "BillingAddress.City"})


@pytest.fixture
async def org():
    async with SalesforceSim(users={"u@example.com": PASSWORD + TOKEN}, clients={"ck": "cs-secret"}) as s:
        yield s


@pytest.fixture
async def bus(org):
    async with SalesforcePubsubSim(org, keepalive=SIM_KEEPALIVE) as s:
        yield s


@contextlib.asynccontextmanager
async def running(tmp_path, org, pubsub_url, checkpoint=None, creds_over=None, bounds=None, keepalive=KEEPALIVE,
                  specs=None, **options):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3},
                                    "sources": {"salesforce-pubsub-keepalive": keepalive}})
    async with Harness(tmp_path, config, **(bounds or {})) as h:
        if checkpoint is not None:
            await h.store.set_checkpoint(*KEY, checkpoint)
        sup = h.supervisor()
        login = creds(org if isinstance(org, str) else org.url, pubsub_url, **(creds_over or {}))
        await sup.start({(KEY[0], s.id): desired(s, login) for s in (specs or [spec(**options)])})
        yield h, sup, sup.status(KEY)


async def started(record):
    await wait_for(lambda: record.status == "started", what="started")


def orders(events):
    return [e["event"].get("order") for e in events]


async def test_events_flow_with_metadata_checkpoint_and_one_schema_fetch(tmp_path, org, bus):
    async with running(tmp_path, org, bus.url) as (h, sup, record):
        await started(record)
        assert record.message == f"Subscribed to {ORDERS} on the Pub/Sub API"
        ids = [bus.publish(ORDERS, {"OrderNumber__c": f"O-{i}"}) for i in range(5)]
        await wait_for(lambda: record.received == 5, what="5 events")
        events = await h.events()
        assert orders(events) == [f"O-{i}" for i in range(5)]
        first = events[0]["event"]
        assert first["replay"] == str(ids[0]) and first["channel"] == ORDERS
        assert first["schema"] == bus.topics[ORDERS].schema_id
        assert "entity" not in first  # a Platform Event has no ChangeEventHeader
        assert events[0]["id"] == event_id(*KEY, f"{ORG_ID}{ORDERS}/{ids[0]}")
        assert await h.store.get_checkpoint(*KEY) == str(ids[-1])
        assert bus.schema_requests == 1
        meta = bus.streams[0].metadata
        assert meta["instanceurl"] == org.url and meta["tenantid"] == ORG_ID and org.valid_token(meta["accesstoken"])
        # the channel's primary user agent (`net.user_agent`: a single node names no node), before gRPC's own
        assert meta["user-agent"].startswith(f"listenerd/{version()} grpc-"), meta["user-agent"]


async def test_change_data_capture_header_and_bitmaps_as_field_names(tmp_path, org, bus):
    async with running(tmp_path, org, bus.url, topic="/data/AccountChangeEvent") as (h, sup, record):
        await started(record)
        bus.publish_change("Account", "UPDATE", {"Name": "Acme", "BillingAddress": {"City": "Paris"}},
                           changed=["Name", "BillingAddress.City", "Industry"], nulled=["Phone"])
        await wait_for(lambda: record.received == 1, what="1 event")
        event = (await h.events())[0]["event"]
        assert event["entity"] == "Account" and event["name"] == "Acme" and event["city"] == "Paris"
        assert event["changed"] == ["Name", "Industry", "BillingAddress.City"]
        assert event["nulled"] == ["Phone"]


async def test_bad_credentials_fail_without_leaking_secrets(tmp_path, org, bus):
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, org, bus.url, creds_over={"password": "wrong-password"}) as (_, _, record):
            await wait_for(lambda: record.status == "failed", what="failed")
            assert record.message == "Salesforce rejected the login: invalid_grant: authentication failure"
    assert "wrong-password" not in repr(logs) and TOKEN not in repr(logs) and "cs-secret" not in repr(logs)
    assert bus.streams == []


async def test_refused_connection_is_retrying_and_names_the_endpoint(tmp_path, org):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with running(tmp_path, org, f"http://127.0.0.1:{port}") as (_, _, record):
        await wait_for(lambda: record.attempts >= 2, what="two attempts")
        assert record.status in ("retrying", "starting")
        assert "Pub/Sub API unavailable" in record.last_error


async def test_expired_token_logs_in_again_once_and_loses_nothing(tmp_path, org, bus):
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, org, bus.url) as (h, sup, record):
            await started(record)
            bus.publish(ORDERS, {"OrderNumber__c": "before"})
            await wait_for(lambda: record.received == 1, what="first event")
            logins = org.logins
            org.expire_sessions()
            bus.drop_streams()  # the stream ends; the next one presents the revoked token
            bus.publish(ORDERS, {"OrderNumber__c": "after"})
            await wait_for(lambda: record.received == 2, what="second event")
            assert orders(await h.events()) == ["before", "after"]
            assert org.logins == logins + 1
            assert ("UNAUTHENTICATED", "sfdc.platform.eventbus.grpc.service.auth.error") in bus.refused
            seen = repr(logs) + record.message + str(record.last_error) + repr(await h.events())
    tokens = {stream.metadata["accesstoken"] for stream in bus.streams}
    assert len(tokens) == 2 and not any(token in seen for token in tokens)  # the secret never shows


async def test_dropped_stream_resumes_after_the_last_event(tmp_path, org, bus):
    async with running(tmp_path, org, bus.url) as (h, sup, record):
        await started(record)
        bus.publish(ORDERS, {"OrderNumber__c": "one"})
        await wait_for(lambda: record.received == 1, what="first event")
        bus.drop_streams()
        bus.publish(ORDERS, {"OrderNumber__c": "two"})
        await wait_for(lambda: record.received == 2, what="second event after the drop")
        assert orders(await h.events()) == ["one", "two"]
        assert len(bus.streams) >= 2 and record.attempts >= 1


async def test_unknown_topic_fails_that_listener_only(tmp_path, org, bus):
    specs = [spec(), spec("LP2", topic="/event/Nope__e")]
    async with running(tmp_path, org, bus.url, specs=specs) as (h, sup, record):
        other = sup.status((KEY[0], "LP2"))
        await wait_for(lambda: other.status == "failed", what="unknown topic failed")
        assert "Salesforce refused topic /event/Nope__e" in other.message and "NOT_FOUND" not in other.message
        await started(record)
        bus.publish(ORDERS, {"OrderNumber__c": "still"})
        await wait_for(lambda: record.received == 1, what="the other listener goes on")
        channels = sup.shared.get(PubSubChannels).channels
        assert len(channels) == 1  # both listeners' streams went over one channel


async def test_refused_replay_id_resumes_with_retained_events_and_says_so(tmp_path, org, bus):
    old = [bus.publish(ORDERS, {"OrderNumber__c": f"old-{i}"}) for i in range(3)]
    bus.purge(upto=old[1])
    async with running(tmp_path, org, bus.url, checkpoint=str(old[0])) as (h, sup, record):
        await wait_for(lambda: record.received == 1, what="the retained event")
        assert orders(await h.events()) == ["old-2"]
        assert f"replay id {old[0]} was refused by Salesforce" in record.message
        assert "events in between may be missing" in record.message
        assert ("INVALID_ARGUMENT", "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted") in bus.refused


async def test_silence_is_retrying_then_resumes(tmp_path, org, bus):
    async with running(tmp_path, org, bus.url) as (h, sup, record):
        await started(record)
        await wait_for(lambda: bus.streams[0].keepalives >= 2, what="keepalives")
        assert len(bus.streams) == 1 and record.attempts == 0  # keepalives hold the stream
        bus.silence()
        await wait_for(lambda: record.attempts >= 1, what="a retry after silence")
        assert "No Pub/Sub API response" in record.last_error
        bus.silence(False)
        # a keepalive on a newer stream came after the silence: that stream lives (a "started" alone may be the
        # status of a stream opened while still silent and about to be given up; an event published then would
        # be before the next stream's LATEST start)
        await wait_for(lambda: record.status == "started" and bus.streams[-1] is not bus.streams[0]
                       and bus.streams[-1].keepalives >= 1, what="subscribed again")
        bus.publish(ORDERS, {"OrderNumber__c": "after silence"})  # after it: `resume` without a checkpoint is LATEST
        await wait_for(lambda: record.received == 1, what="resumed")


async def test_restart_resumes_from_the_checkpoint(tmp_path, org, bus):
    async with running(tmp_path, org, bus.url) as (h, sup, record):
        await started(record)
        bus.publish(ORDERS, {"OrderNumber__c": "first"})
        await wait_for(lambda: record.received == 1, what="first event")
    missed = bus.publish(ORDERS, {"OrderNumber__c": "while stopped"})
    async with running(tmp_path, org, bus.url) as (h, sup, record):
        await wait_for(lambda: record.received == 1, what="the missed event")
        events = await h.events()
        assert orders(events) == ["first", "while stopped"]
        assert await h.store.get_checkpoint(*KEY) == str(missed)


async def test_engine_down_flow_control_holds_the_bound_and_resumes(tmp_path, org, bus):
    total = 40
    async with running(tmp_path, org, bus.url, bounds={"max_events": 10}, batch=4) as (h, sup, record):
        await started(record)
        for i in range(total):
            bus.publish(ORDERS, {"OrderNumber__c": f"O-{i}"})
        await wait_for(lambda: h.outbox.depth == 10, what="outbox at its bound")
        await asyncio.sleep(0.5)  # the stream would have sent more by now if it had been asked
        stream = bus.streams[-1]
        assert h.outbox.depth == 10 and stream.sent == 10 and stream.requested == 10
        assert stream.most_owed <= 4
        delivered: list[bytes] = []
        while len(delivered) < total:  # the engine comes back: drain as the forwarder would
            rows = await h.outbox.lease(7)
            if rows:
                delivered += [bytes(r.body) for r in rows]
                await h.outbox.ack(rows)
            await asyncio.sleep(0.01)
            assert h.outbox.depth <= 10
        assert record.received == total and bus.streams[-1] is stream  # one stream all along: it resumed
        assert stream.sent == total <= stream.requested and stream.most_owed <= 4
        assert [f'"O-{i}"'.encode() in body for i, body in enumerate(delivered)] == [True] * total


def tls_files(tmp_path):
    """A throwaway CA's (key, certificate) PEM bytes for the simulator, and the bundle a client trusts."""
    _, ca_bundle = self_signed(tmp_path)
    cert = Path(ca_bundle).read_bytes()
    return (Path(ca_bundle.replace("-cert.pem", "-key.pem")).read_bytes(), cert), ca_bundle


async def test_tls_is_verified_against_the_ca_bundle_and_refused_without_it(tmp_path, org):
    (key, cert), ca_bundle = tls_files(tmp_path)
    async with SalesforcePubsubSim(org, keepalive=SIM_KEEPALIVE, tls=(key, cert)) as secure:
        assert secure.url.startswith("https://")
        config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                        "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3},
                                        "sources": {"ca-bundle": ca_bundle, "salesforce-pubsub-keepalive": KEEPALIVE}})
        async with Harness(tmp_path, config) as h:
            sup = h.supervisor()
            await sup.start({KEY: desired(spec(), creds(org.url, secure.url))})
            record = sup.status(KEY)
            await started(record)
            secure.publish(ORDERS, {"OrderNumber__c": "over TLS"})
            await wait_for(lambda: record.received == 1, what="an event over TLS")
        (tmp_path / "untrusted").mkdir()
        async with running(tmp_path / "untrusted", org, secure.url) as (_, _, record):  # the system's CAs only
            await wait_for(lambda: record.attempts >= 2, what="retries")
            assert record.status in ("retrying", "starting") and "Pub/Sub API unavailable" in record.last_error
            assert "CERTIFICATE_VERIFY_FAILED" in record.last_error  # the operator reads why
            assert len(secure.streams) == 1  # the untrusted listener never got a stream


async def test_restart_mid_stream_resumes_after_the_last_committed_event(tmp_path, org, bus):
    total = 300
    for i in range(total):
        bus.publish(ORDERS, {"OrderNumber__c": f"O-{i:03d}"})
    async with running(tmp_path, org, bus.url, replay="all", batch=5) as (h, sup, record):
        await wait_for(lambda: record.received >= 40, what="part of the backlog")
    # stopped mid-stream; `all` would start from EARLIEST again, but the checkpoint set through the API
    # (as `PUT .../checkpoint` does) and `resume` both continue after the last committed event
    first_run = len(bus.streams)
    async with running(tmp_path, org, bus.url, replay="resume", batch=5) as (h, sup, record):
        await wait_for(lambda: len(bus.streams) > first_run and bus.streams[-1].sent > 0, what="the second stream")
        await wait_for(lambda: h.outbox.depth == total, what="the whole backlog, once", timeout=20)
        # `depth` counts events queued for the store too: read what the store holds once they are committed
        await h.outbox.flush()
        events = await h.events()
        assert orders(events) == [f"O-{i:03d}" for i in range(total)]  # no gap, no duplicate, in order
        assert len({e["id"] for e in events}) == total


async def test_a_retry_while_a_commit_is_late_resumes_after_the_queued_events(tmp_path, org, bus, monkeypatch):
    # a retry within a run resumes from the stored checkpoint: read while the writer still held the events
    # queued before, it was behind them (here: none stored, so `all` from EARLIEST) and they came twice
    total = 100
    for i in range(total):
        bus.publish(ORDERS, {"OrderNumber__c": f"O-{i:03d}"})
    commit, late = Outbox._commit, asyncio.Event()

    async def late_commit(outbox, group):  # a slow disk: the writer is behind
        await late.wait()
        await commit(outbox, group)

    monkeypatch.setattr(Outbox, "_commit", late_commit)
    async with running(tmp_path, org, bus.url, replay="all", batch=5) as (h, sup, record):
        await wait_for(lambda: h.outbox.depth >= 20, what="events queued, not committed")
        bus.drop_streams()
        await wait_for(lambda: record.attempts >= 1, what="the retry")
        await asyncio.sleep(0.2)  # the retry reads its resume point while the commits are late
        late.set()
        await wait_for(lambda: record.received >= total, what="the whole backlog", timeout=20)
        await h.outbox.flush()
        assert orders(await h.events()) == [f"O-{i:03d}" for i in range(total)]  # no duplicate, no gap


async def test_a_payload_its_schema_cannot_decode_is_counted_and_skipped(tmp_path, org, bus):
    async with running(tmp_path, org, bus.url) as (h, sup, record):
        await started(record)
        await bus.send_raw(ORDERS, b"\xff\xff\xff")  # a long that never ends: not an Order__e
        good = bus.publish(ORDERS, {"OrderNumber__c": "after the bad one"})
        await wait_for(lambda: record.received == 1, what="the good event")
        assert orders(await h.events()) == ["after the bad one"]
        assert h.metrics.listener_errors.labels(*KEY, "malformed")._value.get() == 1
        assert await h.store.get_checkpoint(*KEY) == str(good) and record.status == "started"


async def test_a_quiet_stream_not_refused_counts_as_subscribed(tmp_path, org):
    # headers held until the first message, and no keepalive for 30 s: accepted once not refused for 3 s
    async with SalesforcePubsubSim(org, keepalive=30, headers_at_once=False) as quiet, \
            running(tmp_path, org, quiet.url, keepalive=30) as (h, sup, record):
        await wait_for(lambda: record.status == "started", timeout=6, what="started without a response")
        assert quiet.streams[0].responses == 0 and quiet.streams[0].keepalives == 0
        quiet.publish(ORDERS, {"OrderNumber__c": "first"})
        await wait_for(lambda: record.received == 1, what="the first event")
