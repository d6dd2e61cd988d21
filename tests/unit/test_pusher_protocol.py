"""The Pusher protocol 7 machine without sockets: handshake, signing, liveness, close codes, errors, and
several channels on one connection (per-channel state and errors, connection-wide closes), early events,
encrypted channels, presence members and `user_id`."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listenerd.model import PusherOptions
from listenerd.outcome import Fail, Retry
from listenerd.sources.pusher_protocol import (
    Count,
    Emit,
    Established,
    PusherProtocol,
    Resolve,
    Send,
    Subscribed,
    build_url,
    classify_close,
    decode_data,
    sign,
)

KEY, SECRET = "278d425bdf160c739803", "7ad3773142a6692b25b8"  # poxa's published test vectors


def machine(channel="orders", event=None, members=False, **kw):
    """A connection opened at 0 with one listener (ticket 1) on `channel`."""
    kw.setdefault("activity_timeout", 120.0)
    kw.setdefault("pong_timeout", 30.0)
    kw.setdefault("now", 0.0)
    m = PusherProtocol(key=KEY, secret=SECRET, **kw)
    m.channel = channel  # the test's note of its one listener's channel
    m.ticket = m.join(channel, PusherOptions(channel=channel, event=event).wants, members=members)
    return m


def established(socket_id="123.456", activity=120):
    return json.dumps({"event": "pusher:connection_established",
                       "data": json.dumps({"socket_id": socket_id, "activity_timeout": activity})})


def subscribed(m, socket_id="123.456", activity=120, now=0.0):
    actions = m.receive(established(socket_id, activity), now)
    assert m.receive(json.dumps({"event": "pusher_internal:subscription_succeeded", "channel": m.channel}),
                     now) == [Subscribed(m.channel, frozenset({m.ticket}))]
    return actions


def event(name, data, channel="orders"):
    frame = {"event": name, "channel": channel}
    if data is not ...:
        frame["data"] = data
    return json.dumps(frame)


# ---------------------------------------------------------------- URL and signatures


def test_url_from_cluster_host_port_and_tls():
    assert build_url(key="k").startswith("wss://ws-mt1.pusher.com:443/app/k?protocol=7&client=listenerd&version=")
    assert build_url(key="k", cluster="eu").startswith("wss://ws-eu.pusher.com:443/app/k?")
    assert build_url(key="k", host="127.0.0.1", port=6001, tls=False).startswith("ws://127.0.0.1:6001/app/k?")
    assert build_url(key="k", host="pusher.local", tls=False).startswith("ws://pusher.local:80/")  # never 443 on ws
    assert build_url(key="k", host="::1", port=5, tls=False).startswith("ws://[::1]:5/")


def test_signatures_match_published_vectors():
    assert sign(KEY, SECRET, "1234.1234", "private-foobar") == (
        f"{KEY}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4")
    data = '{"user_id":10,"user_info":{"name":"Mr. Pusher"}}'
    assert sign(KEY, SECRET, "1234.1234", "presence-foobar", data) == (
        f"{KEY}:afaed3695da2ffd16931f457e338e6c9f2921fa133ce7dac49f529792be6304c")


# ---------------------------------------------------------------- handshake and subscription


def test_subscribes_only_after_connection_established_and_public_channels_are_unsigned():
    m = machine()
    assert m.receive(event("order", '{"id":1}'), 0) == []  # nothing before the handshake
    actions = m.receive(established("1.2", activity=50), 1.0)
    assert actions[0] == Established("1.2", 50.0)
    assert json.loads(actions[1].text) == {"event": "pusher:subscribe", "data": {"channel": "orders"}}
    # not confirmed yet: delivered all the same, as pusher-js delivers it (channel.ts handleEvent)
    assert m.receive(event("order", '{"id":0}'), 1.5) == [Emit({"id": 0}, "orders", "order", (1,))]
    assert m.receive(json.dumps({"event": "pusher_internal:subscription_succeeded", "channel": "orders"}),
                     2.0) == [Subscribed("orders", frozenset({1}))]
    assert m.receive(event("order", '{"id":1}'), 2.1) == [Emit({"id": 1}, "orders", "order", (1,))]


def test_private_channel_is_signed_with_each_connections_socket_id():
    first = machine("private-foobar").receive(established("1234.1234"), 0)[1]
    body = json.loads(first.text)["data"]
    assert body == {"channel": "private-foobar",
                    "auth": f"{KEY}:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"}
    second = machine("private-foobar").receive(established("999.1"), 0)[1]
    assert json.loads(second.text)["data"]["auth"] == sign(KEY, SECRET, "999.1", "private-foobar")
    assert json.loads(second.text)["data"]["auth"] != body["auth"]


def test_presence_channel_signs_exactly_the_channel_data_it_sends():
    frame = json.loads(machine("presence-room", user_id="u-1").receive(established("5.6"), 0)[1].text)["data"]
    assert json.loads(frame["channel_data"])["user_id"] == "u-1"
    assert frame["auth"] == sign(KEY, SECRET, "5.6", "presence-room", frame["channel_data"])


def test_handshake_without_socket_id_retries():
    m = machine()
    actions = m.receive(json.dumps({"event": "pusher:connection_established", "data": "{}"}), 0)
    assert isinstance(actions[0], Retry) and "socket_id" in actions[0].reason


def test_handshake_and_subscription_time_out():
    m = machine(connect_timeout=5)
    assert m.deadline() == 5
    assert isinstance(m.tick(5.0)[0], Retry)
    m = machine(pong_timeout=7)
    m.receive(established(), 0)
    assert m.deadline() == 7
    [resolve] = m.tick(7.0)  # that listener only: the connection goes on
    assert isinstance(resolve, Resolve) and resolve.members == {m.ticket}
    assert isinstance(resolve.outcome, Retry) and "did not confirm the subscription" in resolve.outcome.reason
    assert m.state == "open" and not m.members


# ---------------------------------------------------------------- data and the event filter


@pytest.mark.parametrize(("raw", "decoded"), [
    ('{"id":42,"state":"paid"}', {"id": 42, "state": "paid"}),  # JSON string: decoded twice
    ({"id": 42}, {"id": 42}),  # an object
    ("plain text", "plain text"),  # not JSON: kept raw
    ("[1,2]", [1, 2]),
    (..., None),  # absent
])
def test_data_is_accepted_as_string_object_or_absent(raw, decoded):
    m = machine()
    subscribed(m)
    assert m.receive(event("e", raw), 1) == [Emit(decoded, "orders", "e", (1,))]


@pytest.mark.parametrize(("wanted", "sent", "forwarded"), [
    (None, ["a", "b", "pusher:x", "pusher_internal:member_added"], ["a", "b"]),
    ("*", ["a", "b"], ["a", "b"]),
    ("a", ["a", "b"], ["a"]),
    (["a", "c"], ["a", "b", "c"], ["a", "c"]),
])
def test_event_filter(wanted, sent, forwarded):
    m = machine(event=wanted)
    subscribed(m)
    out = [a.event for name in sent for a in m.receive(event(name, "{}"), 1) if isinstance(a, Emit)]
    assert out == forwarded


def test_events_of_other_channels_are_ignored():
    m = machine()
    subscribed(m)
    assert m.receive(event("a", "{}", channel="other"), 1) == []


# ---------------------------------------------------------------- liveness


def test_answers_ping_with_pong():
    m = machine()
    subscribed(m)
    [send] = m.receive(json.dumps({"event": "pusher:ping", "data": {}}), 1)
    assert json.loads(send.text)["event"] == "pusher:pong"


def test_pings_after_the_shorter_activity_timeout_and_reconnects_without_pong():
    m = machine(activity_timeout=120, pong_timeout=30)
    subscribed(m, activity=10, now=0)  # server asks for 10 s: min(120, 10)
    assert m.activity_timeout == 10 and m.heartbeat_bound == 40
    assert m.deadline() == 10
    assert m.tick(9.9) == []
    [ping] = m.tick(10.0)
    assert json.loads(ping.text) == {"event": "pusher:ping", "data": {}}
    assert m.deadline() == 40
    assert m.tick(39) == []
    [outcome] = m.tick(40.0)
    assert outcome == Retry("heartbeat", "No pong from Pusher within 30s of a ping; reconnecting", delay=0)
    assert m.tick(50.0) == [] and m.deadline() == float("inf")  # ended: nothing more to decide


def test_any_frame_counts_as_liveness():
    m = machine(activity_timeout=10)
    subscribed(m, now=0)
    m.tick(10.0)  # ping sent
    m.receive(event("order", "{}"), 12.0)  # an event, not a pong, proves liveness too
    assert m.ping_sent_at is None and m.deadline() == 22.0
    assert m.tick(21.0) == []


def test_configured_activity_wins_when_shorter_than_the_servers():
    m = machine(activity_timeout=3)
    subscribed(m, activity=120)
    assert m.activity_timeout == 3


# ---------------------------------------------------------------- close codes and errors


@pytest.mark.parametrize(("code", "kind", "delay"), [
    (4000, Fail, None), (4001, Fail, None), (4009, Fail, None), (4099, Fail, None),
    (4100, Retry, None), (4199, Retry, None), (4200, Retry, 0), (4201, Retry, 0), (4299, Retry, 0),
    (4301, Retry, None), (1000, Retry, None), (1006, Retry, None), (None, Retry, None), (1009, Retry, None),
])
def test_close_code_classes(code, kind, delay):
    outcome = classify_close(code, "why")
    assert isinstance(outcome, kind)
    if kind is Retry:
        assert outcome.delay == delay


@pytest.mark.parametrize(("code", "kind"), [
    (None, "network"), (1006, "network"), (1009, "protocol"), (4100, "refused"), (4200, "reconnect-advice"),
    (4301, "closed"), (1000, "closed"),
])
def test_close_code_kinds(code, kind):
    assert classify_close(code, "why").kind == kind


def test_close_reason_is_clear_for_an_operator():
    m = machine()
    m.receive(json.dumps({"event": "pusher:error", "data": {"code": 4001, "message": "App key x not found"}}), 0)
    [outcome] = m.closed(4001, "")
    assert outcome == Fail("Pusher refused the connection with close code 4001: the app does not exist - check "
                           "the app key and cluster (server said: App key x not found)")
    assert "4100: over capacity" in classify_close(4100, "").reason


def test_a_frame_over_our_size_limit_is_counted_and_retried_with_back_off():
    m = machine()
    subscribed(m)
    count, outcome = m.closed(1009, None, sent=1009)  # the WebSocket layer refused the frame and closed
    assert count == Count("oversized", "Pusher sent a frame over the size limit (sources.max-frame-bytes)")
    assert outcome == Retry("protocol", "Pusher sent a frame over the size limit (sources.max-frame-bytes); "
                                        "reconnecting")
    assert m.deadline() == float("inf")


def test_a_close_we_did_not_start_for_size_is_not_counted():
    assert machine().closed(1006, None) == [Retry("network", "Connection to Pusher dropped without a close frame")]
    assert machine().closed(4200, "", sent=4200) == [classify_close(4200, "")]  # the echo of the server's close


def test_pusher_error_without_channel_is_informational():
    m = machine()
    subscribed(m)
    [count] = m.receive(json.dumps({"event": "pusher:error", "data": {"code": 4301, "message": "rate"}}), 1)
    assert isinstance(count, Count) and count.kind == "pusher_error"
    assert m.channel_state("orders") == "subscribed"


def test_pusher_error_naming_the_channel_fails_the_subscription():
    m = machine("private-x")
    m.receive(established(), 0)
    [resolve] = m.receive(json.dumps({"event": "pusher:error", "data": {
        "code": None, "message": "Invalid signature: Expected HMAC SHA256 hex digest of 1.2:private-x"}}), 1)
    assert isinstance(resolve, Resolve) and resolve.members == {m.ticket}
    outcome = resolve.outcome
    assert isinstance(outcome, Fail) and "subscription to channel private-x" in outcome.reason


@pytest.mark.parametrize(("data", "kind"), [
    ({"type": "AuthError", "error": "The connection is unauthorized.", "status": 401}, Fail),
    (json.dumps({"type": "AuthError", "error": "bad", "status": 403}), Fail),
    ({"type": "LimitReached", "error": "too many", "status": 4009}, Fail),
    ({"error": "upstream", "status": 503}, Retry),
])
def test_subscription_error(data, kind):
    m = machine("private-x")
    m.receive(established(), 0)
    [resolve] = m.receive(json.dumps({"event": "pusher:subscription_error", "channel": "private-x", "data": data}), 1)
    assert isinstance(resolve, Resolve) and resolve.members == {m.ticket}
    outcome = resolve.outcome
    assert isinstance(outcome, kind)
    assert outcome.reason.startswith("Pusher refused the subscription to channel private-x: ")


@pytest.mark.parametrize("frame", ["not json", "[1,2]", '{"data":"x"}', '{"event":5}', b"\x00binary"])
def test_malformed_frames_are_counted_not_fatal(frame):
    m = machine()
    subscribed(m)
    [count] = m.receive(frame, 1)
    assert isinstance(count, Count) and count.kind == "malformed"
    assert m.receive(event("ok", "{}"), 2) == [Emit({}, "orders", "ok", (1,))]


def test_decode_data():
    assert decode_data('{"a":1}') == {"a": 1}
    assert decode_data("x{") == "x{"
    assert decode_data(None) is None


@given(st.text(max_size=200) | st.binary(max_size=50))
def test_arbitrary_frames_never_raise(frame):
    m = machine()
    subscribed(m)
    for action in m.receive(frame, 1):
        assert isinstance(action, Count | Emit | Send | Subscribed | Established | Resolve | Retry | Fail)
