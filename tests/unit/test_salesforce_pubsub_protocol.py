"""The Pub/Sub API core without sockets: replay starts, flow control, liveness, errors, CDC bitmaps."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listenerd.model import SalesforcePubsubOptions
from listenerd.outcome import Fail, Retry
from listenerd.sim.salesforce_pubsub import ACCOUNT_CHANGE_SCHEMA, bitmap_of
from listenerd.sources.salesforce_pubsub_protocol import (
    CUSTOM,
    EARLIEST,
    LATEST,
    GrpcError,
    Relogin,
    Resubscribe,
    Start,
    Subscription,
    bitmap_fields,
    replay_bytes,
    replay_decimal,
    start_for,
)


def test_replay_id_is_the_big_endian_number_and_back():
    raw = bytes.fromhex("00000000000f4a3b")
    assert replay_decimal(raw) == str(0x0F4A3B)
    assert replay_bytes(replay_decimal(raw)) == raw
    assert replay_bytes(str(1 << 70)) == (1 << 70).to_bytes(9, "big")
    with pytest.raises(ValueError):
        replay_bytes("-3")


@given(st.binary(min_size=8, max_size=8))
def test_any_8_byte_replay_id_survives_the_checkpoint(raw):
    assert replay_bytes(replay_decimal(raw)) == raw


@pytest.mark.parametrize(("replay", "stored", "attempts", "replay_from", "want"), [
    ("resume", None, 0, None, Start(LATEST)),
    ("resume", "42", 0, None, Start(CUSTOM, replay_bytes("42"))),
    ("new", "42", 0, None, Start(LATEST)),
    ("all", "42", 0, None, Start(EARLIEST)),
    ("all", None, 0, None, Start(EARLIEST)),
    ("new", "42", 1, None, Start(CUSTOM, replay_bytes("42"))),  # a retry within a launch never skips
    ("resume", "42", 0, "-2", Start(EARLIEST)),  # the checkpoint API's resume point wins
    ("resume", "42", 0, "-1", Start(LATEST)),
    ("new", None, 0, "7", Start(CUSTOM, replay_bytes("7"))),
    ("resume", "garbage", 0, None, Start(LATEST)),
])
def test_start_follows_the_cometd_rule(replay, stored, attempts, replay_from, want):
    assert start_for(replay, stored, attempts, replay_from) == want


def test_first_request_names_topic_and_start_and_asks_for_what_fits():
    sub = Subscription("/event/Order__e", Start(CUSTOM, replay_bytes("9")), batch=50)
    first = sub.open(now=0.0, room=1000)
    assert first == {"topic_name": "/event/Order__e", "replay_preset": 2, "replay_id": replay_bytes("9"),
                     "num_requested": 50}
    sub = Subscription("/event/Order__e", Start(LATEST), batch=50)
    assert sub.open(now=0.0, room=20)["num_requested"] == 20  # never more than the outbox takes
    assert Subscription("/e", Start(LATEST), batch=500).batch == 100  # Salesforce's most per request


def test_flow_control_tops_up_under_half_a_batch_and_only_with_room():
    sub = Subscription("/event/X__e", Start(LATEST), batch=10)
    sub.open(0.0, room=1000)
    sub.received(4, b"", 1.0)
    assert sub.owed == 6 and sub.top_up(room=1000) == 0  # more than half a batch still owed
    sub.received(2, b"", 1.0)
    assert sub.top_up(room=0) == 0  # the outbox is at its bound: ask for nothing
    assert sub.top_up(room=7) == 3  # never more owed than the outbox takes
    assert sub.owed == 7
    sub.received(7, b"", 2.0)
    assert sub.top_up(room=1000) == 10 and sub.owed == 10  # never more than one batch owed


@given(st.lists(st.tuples(st.integers(0, 10), st.integers(0, 50)), max_size=60))
def test_never_more_owed_than_a_batch_or_the_room(steps):
    sub = Subscription("/event/X__e", Start(LATEST), batch=10)
    sub.open(0.0, room=1000)
    for got, room in steps:
        sub.received(min(got, sub.owed), b"", 0.0)
        before = sub.owed
        more = sub.top_up(room)
        assert sub.owed <= 10 and (more == 0 or sub.owed <= room) and sub.owed == before + more


def test_silence_past_the_bound_is_a_heartbeat_retry_and_waiting_for_room_is_not():
    sub = Subscription("/event/X__e", Start(LATEST), batch=10, keepalive=270.0, margin=1.2)
    sub.open(now=0.0, room=10)
    assert sub.silent(324.0) is None
    outcome = sub.silent(325.0)
    assert isinstance(outcome, Retry) and outcome.kind == "heartbeat" and outcome.delay == 0
    sub.idle(300.0)
    assert sub.silent(325.0) is None


def test_auth_error_relogs_in_once_then_retries_named():
    sub = Subscription("/event/X__e", Start(LATEST), batch=10)
    error = GrpcError("UNAUTHENTICATED", "An authentication exception occurred.",
                      "sfdc.platform.eventbus.grpc.service.auth.error")
    assert isinstance(sub.failed(error), Relogin)
    again = sub.failed(error)
    assert isinstance(again, Retry) and again.kind == "refused" and "fresh session" in again.reason
    sub.received(0, b"", 1.0)  # a response after the re-login: the next refusal may log in again
    assert isinstance(sub.failed(error), Relogin)


def test_refused_replay_id_resubscribes_from_the_fallback_and_forgets_the_position():
    sub = Subscription("/event/X__e", Start(CUSTOM, replay_bytes("5")), batch=10, fallback=LATEST)
    sub.handed_on(replay_bytes("6"))
    sub.open(0.0, 10)
    action = sub.failed(GrpcError("INVALID_ARGUMENT", "The Replay ID validation failed.",
                                  "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"))
    assert isinstance(action, Resubscribe) and action.start == Start(LATEST)
    assert "replay id 6 was refused" in action.note and "new events only" in action.note
    assert sub.open(0.0, 10)["replay_preset"] == 0
    # a preset refused is not a replay id to fall back from
    assert isinstance(sub.failed(GrpcError("INVALID_ARGUMENT", "bad replay")), Fail)


@pytest.mark.parametrize(("code", "answered", "want"), [
    ("NOT_FOUND", False, Fail), ("PERMISSION_DENIED", False, Fail), ("INVALID_ARGUMENT", False, Fail),
    ("UNAVAILABLE", False, Retry), ("UNAVAILABLE", True, Retry), ("INTERNAL", True, Retry),
    ("RESOURCE_EXHAUSTED", True, Retry), ("DEADLINE_EXCEEDED", False, Retry),
])
def test_status_codes(code, answered, want):
    sub = Subscription("/event/X__e", Start(LATEST), batch=10)
    sub.open(0.0, 10)
    if answered:
        sub.received(0, b"", 1.0)
    outcome = sub.failed(GrpcError(code, "words", "sfdc.code"))
    assert isinstance(outcome, want) and "words (sfdc.code)" in outcome.reason
    if code == "UNAVAILABLE":
        assert outcome.kind == ("closed" if answered else "network")  # type: ignore[union-attr]
        assert outcome.delay == (0 if answered else None)  # type: ignore[union-attr]


def test_bitmaps_decode_as_salesforces_example_does():
    # Salesforce's Python example (forcedotcom/pub-sub-api python/util/ChangeEventHeaderUtility.py): the hex
    # as bits, reversed, each 1 at index i naming schema field i; "<i>-0x.." the same over field i's record.
    fields = [f["name"] for f in ACCOUNT_CHANGE_SCHEMA["fields"]]
    bits = bin(int("0x62", 16))[2:][::-1]  # 0b1100010 reversed: positions 1, 5, 6
    assert bitmap_fields(ACCOUNT_CHANGE_SCHEMA, ["0x62"]) == [fields[i] for i, b in enumerate(bits) if b == "1"]
    assert bitmap_fields(ACCOUNT_CHANGE_SCHEMA, ["0x62"]) == ["Name", "Phone", "Industry"]
    assert bitmap_fields(ACCOUNT_CHANGE_SCHEMA, ["4-0x3"]) == ["BillingAddress.Street", "BillingAddress.City"]
    assert bitmap_fields(ACCOUNT_CHANGE_SCHEMA, []) == []
    assert bitmap_fields(ACCOUNT_CHANGE_SCHEMA, ["zz", "99-0x1"]) == ["zz", "99-0x1"]  # kept, never lost


@given(st.sets(st.sampled_from(["Name", "Type", "ParentId", "Phone", "Industry", "AnnualRevenue", "OwnerId",
                                "BillingAddress.City", "BillingAddress.Street", "BillingAddress.Country"])))
def test_bitmaps_round_trip_with_the_simulators_encoder(names):
    decoded = bitmap_fields(ACCOUNT_CHANGE_SCHEMA, bitmap_of(ACCOUNT_CHANGE_SCHEMA, sorted(names)))
    assert sorted(decoded) == sorted(names)


def test_options_validate_topic_and_batch():
    assert SalesforcePubsubOptions(topic="/data/AccountChangeEvent").batch == 100
    for bad in ("Invoices", "/topic/Invoices", "/event/", "/event/a b"):
        with pytest.raises(ValueError, match="must be /event/"):
            SalesforcePubsubOptions(topic=bad)
    with pytest.raises(ValueError):
        SalesforcePubsubOptions(topic="/event/X__e", batch=101)


def test_pubsub_url_to_grpc_target():
    from listenerd.sources.salesforce_pubsub import target_of

    assert target_of("https://api.pubsub.salesforce.com:7443") == ("api.pubsub.salesforce.com:7443", True)
    assert target_of("https://pubsub.example.com") == ("pubsub.example.com:443", True)
    assert target_of("http://127.0.0.1:50051") == ("127.0.0.1:50051", False)
