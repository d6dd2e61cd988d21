"""Every Salesforce streaming channel kind end to end over loopback: PushTopic (plain and filtered),
Platform Event, Change Data Capture (one object and all), generic streaming; each with its payload
root and `$` metadata, stable ids, and the PushTopic kept in step with the listener's query.
"""

from __future__ import annotations

import contextlib

import orjson
import pytest
import structlog

from listenerd.delivery.ids import event_id
from listenerd.model import Config
from listenerd.sim.salesforce import ORG_ID, SalesforceSim
from tests.harness import Harness, desired, integration, listener, wait_for

USER, PASSWORD = "u@example.com", "pa55-wordTOK"
KEY = ("t1", "LS1")


@pytest.fixture
async def sim():
    s = SalesforceSim(users={USER: PASSWORD}, clients={"ck": "cs-secret"}, long_poll=0.5)
    s.create_topic("Invoices", "SELECT Id, Name, Status__c FROM Invoice__c")
    s.define_platform_event("Order__e")
    s.enable_change_events("Account")
    s.enable_change_events("Contact")
    s.create_streaming_channel("/u/Notes")
    async with s:
        yield s


def creds(sim):
    return integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs-secret", "username": USER,
                                        "password": PASSWORD, "login-url": sim.url})


@contextlib.asynccontextmanager
async def running(tmp_path, sim, mapping=None, **options):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        spec = listener(id=KEY[1], type="salesforce", options=options, mapping=mapping or {})
        await sup.start({KEY: desired(spec, creds(sim))})
        yield h, sup.status(KEY)


async def started(record):
    await wait_for(lambda: record.status == "started", what="started")


def subscribes(sim):
    return [m for m in sim.requests if m["channel"] == "/meta/subscribe"]


async def test_platform_event_maps_from_payload_with_event_metadata(tmp_path, sim):
    mapping = {"amount": "Amount__c", "by": "CreatedById", "replay": "$event.replayId", "uuid": "$event.EventUuid",
               "channel": "$channel"}
    async with running(tmp_path, sim, mapping, topic="/event/Order__e") as (h, record):
        await started(record)
        assert record.message == "Subscribed to topic: /event/Order__e"
        ids = [sim.publish_event("Order__e", {"Amount__c": n}) for n in (5, 7)]
        await wait_for(lambda: record.received == 2, what="2 events")
        events = await h.events()
        first = events[0]["event"]
        assert [e["event"]["amount"] for e in events] == [5, 7]
        assert first["replay"] == ids[0] and first["channel"] == "/event/Order__e" and len(first["uuid"]) == 36
        assert first["by"].startswith("005")
        assert events[0]["id"] == event_id(*KEY, f"{ORG_ID}/event/Order__e/{ids[0]}")
        assert await h.store.get_checkpoint(*KEY) == str(ids[1])
    assert not sim.topic_updates and subscribes(sim)[0]["ext"] == {"replay": {"/event/Order__e": -1}}


@pytest.mark.parametrize("channel", ["/data/AccountChangeEvent", "/data/ChangeEvents"])
async def test_change_data_capture_maps_payload_and_header(tmp_path, sim, channel):
    mapping = {"name": "Name", "type": "$header.changeType", "ids": "$header.recordIds",
               "entity": "$header.entityName", "first": "$header.recordIds.0", "replay": "$event.replayId"}
    async with running(tmp_path, sim, mapping, topic=channel) as (h, record):
        await started(record)
        account = sim.publish_change("Account", "UPDATE", ["001A", "001B"], {"Name": "Acme"})
        contact = sim.publish_change("Contact", "CREATE", ["003C"], {"LastName": "Lee"})
        later = sim.publish_change("Account", "UNDELETE", ["001D"], {})
        await wait_for(lambda: record.received == (3 if channel == "/data/ChangeEvents" else 2), what="changes")
        events = await h.events()
        assert events[0]["event"] == {"name": "Acme", "type": "UPDATE", "ids": ["001A", "001B"],
                                      "entity": "Account", "first": "001A", "replay": account}
        assert events[0]["id"] == event_id(*KEY, f"{ORG_ID}{channel}/{account}")
        replays = [e["event"]["replay"] for e in events]
        assert replays == ([account, contact, later] if channel == "/data/ChangeEvents" else [account, later])
        if channel == "/data/ChangeEvents":
            assert events[1]["event"] == {"type": "CREATE", "ids": ["003C"], "entity": "Contact", "first": "003C",
                                          "replay": contact}


async def test_change_event_passes_whole_payload_without_mapping(tmp_path, sim):
    async with running(tmp_path, sim, topic="/data/AccountChangeEvent") as (h, record):
        await started(record)
        sim.publish_change("Account", "DELETE", ["001A"], {})
        await wait_for(lambda: record.received == 1, what="a delete")
        payload = (await h.events())[0]["event"]
        assert payload["ChangeEventHeader"]["changeType"] == "DELETE"


async def test_generic_streaming_payload_decoded_when_json(tmp_path, sim):
    mapping = {"text": "text", "replay": "$event.replayId", "at": "$event.createdDate", "channel": "$channel"}
    async with running(tmp_path, sim, mapping, topic="/u/Notes") as (h, record):
        await started(record)
        replay = sim.publish_generic("/u/Notes", orjson.dumps({"text": "hello"}).decode())
        sim.publish_generic("/u/Notes", "plain words")
        await wait_for(lambda: record.received == 2, what="2 notes")
        events = await h.events()
        assert events[0]["event"]["text"] == "hello" and events[0]["event"]["replay"] == replay
        assert events[0]["event"]["channel"] == "/u/Notes" and events[0]["event"]["at"].endswith("Z")
        assert "text" not in events[1]["event"]  # a plain string has no fields to map
        assert events[0]["id"] == event_id(*KEY, f"{ORG_ID}/u/Notes/{replay}")


async def test_missing_platform_event_fails_with_salesforce_words(tmp_path, sim):
    async with running(tmp_path, sim, topic="/event/Missing__e") as (_, record):
        await wait_for(lambda: record.status == "failed", what="failed")
        assert "doesn't exist {/event/Missing__e}" in record.message
    assert not [m for m in sim.requests if "PushTopic" in str(m)]


async def test_filtered_topic_delivers_matching_and_resumes_from_its_replay_id(tmp_path, sim):
    topic = "/topic/Invoices?Status__c=Open"
    mapping = {"name": "Name", "replay": "$event.replayId", "channel": "$channel"}
    async with running(tmp_path, sim, mapping, topic=topic) as (h, record):
        await started(record)
        assert subscribes(sim)[0]["subscription"] == topic
        assert subscribes(sim)[0]["ext"] == {"replay": {"/topic/Invoices": -1}}  # keyed without the query
        sim.publish("Invoices", {"Id": "a1", "Name": "open-1", "Status__c": "Open"})
        sim.publish("Invoices", {"Id": "a2", "Name": "closed-1", "Status__c": "Closed"})
        last = sim.publish("Invoices", {"Id": "a3", "Name": "open-2", "Status__c": "Open"})
        await wait_for(lambda: record.received == 2, what="the open ones")
        events = await h.events()
        assert [e["event"]["name"] for e in events] == ["open-1", "open-2"]
        assert events[1]["event"]["channel"] == topic
        assert events[1]["id"] == event_id(*KEY, f"{ORG_ID}/Invoices/{last}")
        assert await h.store.get_checkpoint(*KEY) == str(last)
    # down: more changes, open and closed
    sim.publish("Invoices", {"Id": "a4", "Name": "open-3", "Status__c": "Open"})
    sim.publish("Invoices", {"Id": "a5", "Name": "closed-2", "Status__c": "Closed"})
    async with running(tmp_path, sim, mapping, topic=topic) as (h, record):
        await started(record)
        assert subscribes(sim)[-1]["ext"] == {"replay": {"/topic/Invoices": last}}
        await wait_for(lambda: len(sim.events) == 5 and record.received == 1, what="the missed open one")
        sim.publish("Invoices", {"Id": "a6", "Name": "open-4", "Status__c": "Open"})
        await wait_for(lambda: record.received == 2, what="a new open one")
        assert [e["event"]["name"] for e in await h.events()] == ["open-1", "open-2", "open-3", "open-4"]


async def test_filtered_topic_without_the_pushtopic_creates_it_by_name(tmp_path, sim):
    async with running(tmp_path, sim, topic="/topic/Cases?Priority=High",
                       query="SELECT Id, Priority FROM Case") as (_, record):
        await started(record)
        assert sim.topics["Cases"]["Query"] == "SELECT Id, Priority FROM Case"


async def test_pushtopic_whose_query_changed_is_updated_and_logged(tmp_path, sim):
    sim.create_topic("Renamed", "SELECT Id FROM Invoice__c", api_version=45.0, NotifyForFields="All")
    query = "SELECT Id, Name FROM Invoice__c WHERE Amount__c > 10"
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, sim, {"name": "Name"}, topic="Renamed", query=query) as (h, record):
            await started(record)
            sim.publish("Renamed", {"Id": "a1", "Name": "big"})
            await wait_for(lambda: record.received == 1, what="an event")
    assert sim.topic_updates == [{"Query": query, "ApiVersion": 58.0, "NotifyForFields": "Referenced"}]
    assert sim.topics["Renamed"]["Query"] == query and sim.topics["Renamed"]["ApiVersion"] == 58.0
    updated = [e for e in logs if e["event"] == "PushTopic updated to the listener's query"]
    assert len(updated) == 1 and updated[0]["changed"] == "Query, ApiVersion, NotifyForFields"
    # the same query, spaced differently: kept as it is
    async with running(tmp_path, sim, topic="Renamed", query="  " + query.replace(" ", "  ")) as (_, record):
        await started(record)
    assert len(sim.topic_updates) == 1


async def test_pushtopic_without_query_is_kept_or_missing_fails(tmp_path, sim):
    sim.create_topic("Legacy", "SELECT Id FROM Foo__c", api_version=40.0)
    async with running(tmp_path, sim, topic="Legacy") as (_, record):
        await started(record)
    assert sim.topic_updates == [] and sim.topics["Legacy"]["ApiVersion"] == 40.0
    async with running(tmp_path, sim, topic="Nope") as (_, record):
        await wait_for(lambda: record.status == "failed", what="failed")
        assert "PushTopic Nope does not exist" in record.message


async def test_two_listeners_on_one_topic_filtered_differently_both_run(tmp_path, sim):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        open_, closed = ("t1", "OPEN"), ("t1", "CLOSED")
        await sup.start({
            open_: desired(listener(id="OPEN", type="salesforce", options={"topic": "/topic/Invoices?Status__c=Open"},
                                    mapping={"n": "Name"}), creds(sim)),
            closed: desired(listener(id="CLOSED", type="salesforce",
                                     options={"topic": "/topic/Invoices?Status__c=Closed"}, mapping={"n": "Name"}),
                            creds(sim))})
        await wait_for(lambda: all(sup.status(k).status == "started" for k in (open_, closed)), what="both")
        sim.publish("Invoices", {"Id": "a1", "Name": "o", "Status__c": "Open"})
        sim.publish("Invoices", {"Id": "a2", "Name": "c", "Status__c": "Closed"})
        await wait_for(lambda: sup.status(open_).received == 1 and sup.status(closed).received == 1, what="one each")
        assert [e["event"]["n"] for e in await h.events("t1", "OPEN")] == ["o"]
        assert [e["event"]["n"] for e in await h.events("t1", "CLOSED")] == ["c"]
        assert sim.handshakes == 2  # one client per replay key: each filter has its own replayId
