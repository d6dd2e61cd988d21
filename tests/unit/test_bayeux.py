"""The Bayeux client state machine, message by message, without sockets."""

import orjson
import pytest

from listenerd.outcome import Fail, Retry
from listenerd.sources.bayeux import (
    BayeuxClient,
    Message,
    Refused,
    Rehandshake,
    Relogin,
    ReplayRejected,
    Subscribed,
)

TOPIC = "/topic/Invoices"


def client(replay=-1, **kw):
    return BayeuxClient({TOPIC: replay}, **kw)


def handshake_ok(c, client_id="c1", advice=None):
    req = c.next_request()
    assert req.kind == "handshake"
    reply = {"channel": "/meta/handshake", "successful": True, "clientId": client_id, "id": req.messages[0]["id"],
             "supportedConnectionTypes": ["long-polling"], "ext": {"replay": True}}
    if advice:
        reply["advice"] = advice
    assert c.receive([reply]) == []
    return req


def subscribe_ok(c):
    req = c.next_request()
    assert req.kind == "subscribe"
    out = c.receive([{"channel": "/meta/subscribe", "subscription": m["subscription"], "successful": True,
                      "id": m["id"]} for m in req.messages])
    return req, out


def connected(replay=-1, **kw):
    c = client(replay, **kw)
    handshake_ok(c)
    subscribe_ok(c)
    return c


def connect_reply(successful=True, **extra):
    return {"channel": "/meta/connect", "successful": successful, **extra}


def event(replay_id, channel=TOPIC, **sobject):
    return {"channel": channel, "data": {"event": {"replayId": replay_id, "type": "created",
                                                   "createdDate": "2026-11-23T00:00:00.000Z"},
                                         "sobject": {"Id": "a00", **sobject}}}


def test_handshake_asks_for_long_polling_and_replay():
    c = client()
    req = c.next_request()
    msg = req.messages[0]
    assert msg["channel"] == "/meta/handshake" and msg["supportedConnectionTypes"] == ["long-polling"]
    assert msg["ext"] == {"replay": True} and msg["version"] == "1.0"
    assert req.timeout == c.request_timeout
    with pytest.raises(RuntimeError):
        c.next_request()  # one request in flight at a time


def test_subscribe_carries_the_replay_map_then_connect_loops():
    c = client(replay=42)
    handshake_ok(c, "abc")
    assert c.replay_supported
    req, out = subscribe_ok(c)
    assert req.messages[0]["clientId"] == "abc"
    assert req.messages[0]["ext"] == {"replay": {TOPIC: 42}}
    assert out == [Subscribed(TOPIC, 42, False)]
    assert c.state == "connected"
    req = c.next_request()
    assert req.kind == "connect" and req.messages[0]["connectionType"] == "long-polling"
    assert req.messages[0]["clientId"] == "abc" and req.delay == 0
    ids = [req.messages[0]["id"]]
    assert c.receive([connect_reply(advice={"timeout": 110000, "interval": 0, "reconnect": "retry"})]) == []
    ids.append(c.next_request().messages[0]["id"])
    assert ids[0] != ids[1]


def test_events_update_the_replay_map_used_on_resubscribe():
    c = connected()
    c.next_request()
    out = c.receive([event(5, Name="A"), event(6, Name="B"), connect_reply()])
    assert [o.replay_id for o in out] == [5, 6]
    assert isinstance(out[0], Message) and out[0].data["sobject"]["Name"] == "A"
    c.next_request()
    out = c.receive([connect_reply(False, error="403::Unknown client", advice={"reconnect": "handshake"})])
    assert out == [Rehandshake("connect answered 403::Unknown client")]
    handshake_ok(c, "c2")
    req, out = subscribe_ok(c)
    assert req.messages[0]["ext"] == {"replay": {TOPIC: 6}} and req.messages[0]["clientId"] == "c2"
    assert out == [Subscribed(TOPIC, 6, True)]


def test_events_on_other_channels_and_without_replay_id_are_handled():
    c = connected()
    c.next_request()
    out = c.receive([{"channel": "/topic/Other", "data": {}}, {"channel": TOPIC, "data": {"x": 1}}, connect_reply()])
    assert out == [Message(TOPIC, {"x": 1}, None)]
    assert c.subscriptions[TOPIC] == -1


def test_advice_interval_and_timeout_are_followed():
    c = connected(margin=1.5, slack=0.5)
    c.next_request()
    c.receive([connect_reply(advice={"timeout": 2000, "interval": 250, "reconnect": "retry"})])
    req = c.next_request()
    assert req.delay == 0.25
    assert req.timeout == pytest.approx(2 * 1.5 + 0.5)
    # the client gives up after two timed-out connects (max_transport_retries=1), each after its wait
    assert c.heartbeat_bound == pytest.approx(2 * (0.25 + 3.5))


@pytest.mark.parametrize("retries", [0, 1, 3])
def test_the_heartbeat_bound_is_the_silence_after_which_the_client_gives_up(retries):
    c = connected(max_transport_retries=retries, service="Salesforce streaming")
    c.next_request()
    c.receive([connect_reply(advice={"timeout": 2000, "interval": 250, "reconnect": "retry"})])
    bound, silent = c.heartbeat_bound, 0.0
    out: list = []
    while not out:  # every connect times out: the server went silent
        req = c.next_request()
        silent += req.delay + req.timeout
        out = c.transport_error("connect failed: timed out", "timeout")
    assert out == [Retry("timeout", "Salesforce streaming: connect failed: timed out")]
    assert silent == pytest.approx(bound)  # what the source declares is exactly when this client ends it


def test_every_retry_names_the_service():
    c = client(service="Salesforce streaming")
    c.next_request()
    [out] = c.receive([{"channel": "/meta/handshake", "successful": False, "error": "403::Handshake denied"}])
    assert out == Retry("refused", "Salesforce streaming: Handshake refused: 403::Handshake denied")
    c = connected(service="Salesforce streaming")
    c.next_request()
    [out] = c.receive([connect_reply(False, error="403::Unknown", advice={"reconnect": "none"})])
    assert out.reason == "Salesforce streaming: connect answered 403::Unknown; the server advised no reconnect"


def test_advice_handshake_on_a_successful_connect_rehandshakes():
    c = connected(replay=-2)
    c.next_request()
    out = c.receive([event(9), connect_reply(advice={"reconnect": "handshake"})])
    assert isinstance(out[0], Message) and isinstance(out[1], Rehandshake)
    req = handshake_ok(c)
    assert req.messages[0]["channel"] == "/meta/handshake"
    req, _ = subscribe_ok(c)
    assert req.messages[0]["ext"]["replay"][TOPIC] == 9


def test_advice_is_reset_at_each_handshake():
    c = connected()
    c.next_request()
    c.receive([connect_reply(False, error="403::Unknown client", advice={"reconnect": "handshake", "interval": 5000})])
    handshake_ok(c)
    subscribe_ok(c)
    assert c.next_request().delay == 0  # the old interval does not survive the handshake


def test_advice_none_ends_the_session():
    c = connected()
    c.next_request()
    out = c.receive([connect_reply(False, error="403::Organization total events daily limit exceeded",
                                   advice={"reconnect": "none"})])
    assert len(out) == 1 and isinstance(out[0], Retry) and "daily limit" in out[0].reason
    assert c.state == "closed"


def test_advice_retry_on_failed_connect_retries_then_gives_up():
    c = connected()
    c.next_request()
    assert c.receive([connect_reply(False, error="500::server busy", advice={"reconnect": "retry"})]) == []
    req = c.next_request()
    assert req.kind == "connect" and req.delay > 0
    out = c.receive([connect_reply(False, error="500::server busy")])
    assert isinstance(out[0], Retry)


def test_401_on_connect_means_relogin_then_handshake():
    c = connected()
    c.next_request()
    out = c.receive([connect_reply(False, error="401::Authentication invalid", advice={"reconnect": "none"})])
    assert out == [Relogin("connect answered 401::Authentication invalid")]
    c.relogged_in()
    req = c.next_request()
    assert req.kind == "handshake"
    assert all("clientId" not in m for m in req.messages)


def test_handshake_denied_with_401_reason_relogs_in_once_then_retries():
    c = client()
    c.next_request()
    denied = {"channel": "/meta/handshake", "successful": False, "error": "403::Handshake denied",
              "ext": {"sfdc": {"failureReason": "401::Authentication invalid"}}, "advice": {"reconnect": "none"}}
    out = c.receive([denied])
    assert isinstance(out[0], Relogin) and "401::Authentication invalid" in out[0].reason
    c.relogged_in()
    c.next_request()
    out = c.receive([denied])
    assert isinstance(out[0], Retry)  # never a login loop


def test_other_handshake_refusals_retry_with_backoff():
    c = client()
    c.next_request()
    out = c.receive([{"channel": "/meta/handshake", "successful": False, "error": "403::Handshake denied",
                      "ext": {"sfdc": {"failureReason": "403::Organization concurrent user limit exceeded"}}}])
    assert isinstance(out[0], Retry) and "concurrent user limit" in out[0].reason


def test_http_401_means_relogin():
    c = connected()
    c.next_request()
    assert isinstance(c.http_error(401, "Unauthorized")[0], Relogin)


def test_http_5xx_and_network_errors_retry_connect_once_then_end():
    c = connected()
    c.next_request()
    assert c.http_error(503) == []
    c.next_request()
    assert c.transport_error("connection reset") == [Retry("network", "Bayeux: connection reset")]


def test_a_successful_connect_resets_the_failure_count():
    c = connected()
    for _ in range(5):
        c.next_request()
        assert c.transport_error("dropped") == []
        c.next_request()
        assert c.receive([connect_reply()]) == []


def test_network_error_during_handshake_or_subscribe_ends_the_session():
    c = client()
    c.next_request()
    assert isinstance(c.transport_error("refused")[0], Retry)
    c = client()
    handshake_ok(c)
    c.next_request()
    assert isinstance(c.transport_error("reset")[0], Retry)


def test_handshake_loops_are_bounded():
    c = client()
    outs = []
    for i in range(5):
        handshake_ok(c, f"c{i}")
        c.next_request()
        outs = c.receive([{"channel": "/meta/subscribe", "subscription": TOPIC, "successful": False,
                           "error": "403::Unknown client"}])
        if isinstance(outs[0], Retry):
            break
    assert isinstance(outs[0], Retry) and i == 2


def test_replay_id_outside_retention_falls_back_and_reports():
    c = client(replay=82, replay_fallback=-2)
    handshake_ok(c)
    c.next_request()
    error = ("400::The replayId {82} you provided was invalid. Please provide a valid ID, -2 to replay all "
             "events, or -1 to replay only new events.")
    out = c.receive([{"channel": "/meta/subscribe", "subscription": TOPIC, "successful": False, "error": error}])
    assert out == [ReplayRejected(TOPIC, 82, -2, error)]
    req, out = subscribe_ok(c)
    assert req.messages[0]["ext"] == {"replay": {TOPIC: -2}}
    assert out == [Subscribed(TOPIC, -2, False)]


def test_replay_id_outside_retention_fails_without_a_fallback():
    c = client(replay=82, replay_fallback=None)
    handshake_ok(c)
    c.next_request()
    out = c.receive([{"channel": "/meta/subscribe", "subscription": TOPIC, "successful": False,
                      "error": "400::The replayId {82} you provided was invalid."}])
    # the channel alone fails (its listener), not the client that carries the others
    assert isinstance(out[0], Refused) and out[0].channel == TOPIC
    assert isinstance(out[0].outcome, Fail) and "82" in out[0].outcome.reason
    assert TOPIC not in c.subscriptions and c.state == "connected"


def test_missing_channel_fails_with_the_server_text():
    c = client()
    handshake_ok(c)
    c.next_request()
    error = "400::The channel you requested to subscribe to doesn't exist {/topic/Invoices}"
    out = c.receive([{"channel": "/meta/subscribe", "subscription": TOPIC, "successful": False, "error": error}])
    assert out == [Refused(TOPIC, Fail(f"Subscription to {TOPIC} refused: {error}"))]


def test_faye_style_401_unknown_client_rehandshakes_not_relogin():
    c = connected()
    c.next_request()
    out = c.receive([connect_reply(False, error="401:c1:Unknown client", advice={"reconnect": "handshake"})])
    assert isinstance(out[0], Rehandshake)


def test_malformed_or_missing_replies():
    c = connected()
    c.next_request()
    assert isinstance(c.malformed("not JSON")[0], Rehandshake)
    handshake_ok(c)
    subscribe_ok(c)
    c.next_request()
    assert c.receive({"unexpected": True}) == []  # no connect reply: a transport failure, retried once
    c.next_request()
    assert isinstance(c.receive("garbage")[0], Rehandshake)


def test_server_without_long_polling_is_a_failure():
    c = client()
    c.next_request()
    out = c.receive([{"channel": "/meta/handshake", "successful": True, "clientId": "x",
                      "supportedConnectionTypes": ["websocket"]}])
    assert isinstance(out[0], Fail)


def test_stop_unsubscribes_and_disconnects():
    c = connected()
    c.next_request()  # a connect is in flight when the task is cancelled
    req = c.stop_request()
    assert [m["channel"] for m in req.messages] == ["/meta/unsubscribe", "/meta/disconnect"]
    assert req.messages[0]["subscription"] == TOPIC and all(m["clientId"] == "c1" for m in req.messages)
    assert c.state == "closed"
    assert client().stop_request() is None


def test_batched_subscribe_of_several_channels():
    c = BayeuxClient({"/topic/A": -1, "/topic/B": -2})
    handshake_ok(c)
    req = c.next_request()
    assert [m["subscription"] for m in req.messages] == ["/topic/A", "/topic/B"]
    out = c.receive([{"channel": "/meta/subscribe", "subscription": "/topic/A", "successful": True}])
    assert out == [Subscribed("/topic/A", -1, False)] and c.state == "subscribing"
    req = c.next_request()  # B had no answer yet: it is asked again, A is not
    assert [m["subscription"] for m in req.messages] == ["/topic/B"]
    assert c.receive([{"channel": "/meta/subscribe", "subscription": "/topic/B", "successful": True}]) == [
        Subscribed("/topic/B", -2, False)]
    assert c.state == "connected"


# ---------------------------------------------------------------- several channels on one client

A, B, C = "/topic/A", "/topic/B", "/topic/C"


def two_channels():
    c = BayeuxClient({A: -1, B: 5})
    handshake_ok(c)
    subscribe_ok(c)
    c.next_request()  # the connect is held
    return c


def test_each_channel_subscribes_with_its_own_replay_id():
    c = BayeuxClient({A: -1, B: 5})
    handshake_ok(c)
    req, out = subscribe_ok(c)
    assert [m["ext"] for m in req.messages] == [{"replay": {A: -1}}, {"replay": {B: 5}}]
    assert out == [Subscribed(A, -1, False), Subscribed(B, 5, False)]
    c.next_request()
    out = c.receive([event(7, A), event(9, B), connect_reply()])
    assert [(o.channel, o.replay_id) for o in out] == [(A, 7), (B, 9)]
    assert c.subscriptions == {A: 7, B: 9}


def test_a_channel_added_to_the_live_client_subscribes_beside_the_held_connect():
    c = two_channels()
    assert c.control_request() is None  # nothing to say
    c.add(C, 42)
    req = c.control_request()
    assert req.kind == "subscribe" and [m["subscription"] for m in req.messages] == [C]
    assert req.messages[0]["ext"] == {"replay": {C: 42}} and req.messages[0]["clientId"] == "c1"
    assert c.control_request() is None  # one control request at a time
    out = c.control_answer(req, [{"channel": "/meta/subscribe", "subscription": C, "successful": True}])
    assert out == [Subscribed(C, 42, False)]
    # the held connect goes on: no handshake, the other channels untouched
    assert c.receive([event(10, C), connect_reply()]) == [Message(C, event(10, C)["data"], 10)]
    assert c.next_request().kind == "connect" and c.subscribed == {A, B, C}


def test_a_channel_removed_from_the_live_client_is_unsubscribed_alone():
    c = two_channels()
    c.remove(A)
    req = c.control_request()
    assert req.kind == "unsubscribe" and [(m["channel"], m["subscription"]) for m in req.messages] == [
        ("/meta/unsubscribe", A)]
    assert c.control_answer(req, [{"channel": "/meta/unsubscribe", "subscription": A, "successful": True}]) == []
    out = c.receive([event(3, A), event(11, B), connect_reply()])  # a late event of A is not A's any more
    assert out == [Message(B, event(11, B)["data"], 11)] and c.subscribed == {B}


def test_a_channel_refused_on_the_live_client_fails_alone():
    c = two_channels()
    c.add(C, -1)
    req = c.control_request()
    error = "400::The channel you requested to subscribe to doesn't exist {/topic/C}"
    out = c.control_answer(req, [{"channel": "/meta/subscribe", "subscription": C, "successful": False,
                                  "error": error}])
    assert out == [Refused(C, Fail(f"Subscription to {C} refused: {error}"))]
    assert c.state == "connected" and c.subscribed == {A, B} and C not in c.subscriptions
    assert c.receive([connect_reply()]) == []


def test_a_session_error_on_the_control_lane_is_left_to_the_connect():
    c = two_channels()
    c.add(C, -1)
    req = c.control_request()
    out = c.control_answer(req, [{"channel": "/meta/subscribe", "subscription": C, "successful": False,
                                  "error": "403::Unknown client"}])
    assert out == [] and c.control_request() is None  # held: no subscribe loop on a dead session
    out = c.receive([connect_reply(False, error="403::Unknown client", advice={"reconnect": "handshake"})])
    assert out == [Rehandshake("connect answered 403::Unknown client")]  # once, for the whole client
    handshake_ok(c, "c2")
    req, out = subscribe_ok(c)
    assert {m["subscription"] for m in req.messages} == {A, B, C}
    assert out == [Subscribed(A, -1, True), Subscribed(B, 5, True), Subscribed(C, -1, False)]


def test_a_control_answer_from_an_older_session_is_ignored():
    c = two_channels()
    c.add(C, -1)
    req = c.control_request()
    c.receive([connect_reply(False, error="403::Unknown client", advice={"reconnect": "handshake"})])
    handshake_ok(c, "c2")
    assert c.control_answer(req, [{"channel": "/meta/subscribe", "subscription": C, "successful": True}]) == []
    sub = c.next_request()
    assert {m["subscription"] for m in sub.messages} == {A, B, C}


def test_a_control_request_without_answer_waits_for_the_next_connect():
    c = two_channels()
    c.add(C, -1)
    req = c.control_request()
    assert c.control_failed(req) == [] and c.control_request() is None
    c.receive([connect_reply()])
    assert [m["subscription"] for m in c.control_request().messages] == [C]


def test_subscribes_are_cut_below_salesforce_body_limit():
    channels = {f"/topic/Topic{i:04d}": -1 for i in range(1000)}
    c = BayeuxClient(channels)
    handshake_ok(c)
    seen = []
    while c.state == "subscribing":
        req = c.next_request()
        assert len(orjson.dumps(req.messages)) <= 32_768
        seen += [m["subscription"] for m in req.messages]
        c.receive([{"channel": "/meta/subscribe", "subscription": m["subscription"], "successful": True}
                   for m in req.messages])
    assert seen == list(channels) and c.state == "connected"
    req = c.stop_request()
    assert len(orjson.dumps(req.messages)) <= 32_768 and req.messages[-1]["channel"] == "/meta/disconnect"


def test_the_org_client_limit_is_named_in_the_retry():
    c = client(service="Salesforce streaming")
    c.next_request()
    [out] = c.receive([{"channel": "/meta/handshake", "successful": False, "error": "403::Handshake denied",
                        "ext": {"sfdc": {"failureReason": "403::Organization concurrent user limit exceeded"}},
                        "advice": {"reconnect": "none"}}])
    assert isinstance(out, Retry)
    assert "limit of concurrent streaming clients" in out.reason
    assert "403::Organization concurrent user limit exceeded" in out.reason


def test_a_client_given_up_is_named_for_its_disconnect():
    c = two_channels()
    [out] = c.malformed("not JSON")  # the server still holds c1: the driver tells it before a new handshake
    assert out == Rehandshake("malformed answer from the server (not JSON)", abandoned="c1")
    c = two_channels()
    [out] = c.receive([connect_reply(False, error="403::Unknown client", advice={"reconnect": "handshake"})])
    assert out.abandoned is None  # the server forgot it already
    c = two_channels()
    c.transport_error("timed out", "timeout")
    c.next_request()
    [out] = c.transport_error("timed out", "timeout")
    assert isinstance(out, Retry)  # retried once on the same clientId, then given up:
    req = c.stop_request()  # ... and told
    assert [m["channel"] for m in req.messages][-1] == "/meta/disconnect" and req.messages[-1]["clientId"] == "c1"


def test_connects_that_fail_fast_are_retried_on_the_same_client_within_the_window():
    c = BayeuxClient({A: -1}, connect_retry_window=10.0)
    handshake_ok(c)
    subscribe_ok(c)
    waits, out = [], []
    while not out:
        req = c.next_request()
        assert req.kind == "connect" and req.messages[0]["clientId"] == "c1"  # never a new handshake meanwhile
        waits.append(req.delay)
        out = c.http_error(503, "Service Unavailable")
    assert waits[1:5] == [0.1, 0.2, 0.4, 0.8] and max(waits) == 5.0  # growing, capped
    assert sum(waits[:-1]) >= 10.0 > sum(waits[:-2])  # the window spent, then `max_transport_retries` (1) more
    assert out == [Retry("refused", "Bayeux: HTTP 503: Service Unavailable")]
    assert c.heartbeat_bound == pytest.approx(10.0 + 2 * c.poll_timeout + 0.1)


def test_a_successful_connect_restores_the_whole_window():
    c = BayeuxClient({A: -1}, connect_retry_window=1.0)
    handshake_ok(c)
    subscribe_ok(c)
    for _ in range(3):
        for _ in range(4):
            c.next_request()
            assert c.transport_error("connection reset") == []
        c.next_request()
        assert c.receive([connect_reply()]) == []
    assert c.next_request().delay == 0


def test_timed_out_connects_are_not_retried_within_the_window():
    c = BayeuxClient({A: -1}, connect_retry_window=60.0)
    handshake_ok(c)
    subscribe_ok(c)
    c.next_request()
    assert c.transport_error("timed out", "timeout") == []
    c.next_request()
    assert isinstance(c.transport_error("timed out", "timeout")[0], Retry)  # silence: the bound, not the window


def test_filtered_channel_is_keyed_without_its_query_and_takes_events_either_way():
    """EMP-Connector's `topicWithoutQueryString`: the replay map names `/topic/X`; an event may carry the
    channel with or without the filter, and belongs to the filtered subscription in both cases."""
    filtered = TOPIC + "?Status__c=Open"
    c = BayeuxClient({filtered: 41})
    handshake_ok(c)
    req, out = subscribe_ok(c)
    assert req.messages[0]["subscription"] == filtered
    assert req.messages[0]["ext"] == {"replay": {TOPIC: 41}}
    assert out == [Subscribed(filtered, 41, False)]
    c.next_request()
    got = c.receive([event(42, channel=filtered), event(43, channel=TOPIC), event(44, channel="/topic/Other"),
                     connect_reply()])
    assert [(m.channel, m.replay_id) for m in got if isinstance(m, Message)] == [(filtered, 42), (filtered, 43)]
    assert c.subscriptions[filtered] == 43
    c.remove(filtered)
    c.next_request()
    assert [m for m in c.receive([event(45, channel=TOPIC), connect_reply()]) if isinstance(m, Message)] == []
