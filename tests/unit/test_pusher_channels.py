"""The Pusher machine with several channels on one connection: listeners join and leave on the live
connection, per-channel status and errors, connection-wide outcomes; and what pusher-js does beyond the
bare protocol: encrypted channels, presence members, `user_id` on client events."""

import base64
import json

import pusher
from nacl.secret import SecretBox

from listenerd.model import PusherOptions
from listenerd.outcome import Fail, Retry
from listenerd.sources.pusher_protocol import (
    Count,
    Emit,
    PusherProtocol,
    Resolve,
    Send,
    Subscribed,
    decrypt,
    shared_secret,
    sign,
)

KEY, SECRET = "278d425bdf160c739803", "7ad3773142a6692b25b8"
MASTER = bytes(range(32))


def wants(channel, event=None):
    return PusherOptions(channel=channel, event=event).wants


def connection(**kw):
    kw.setdefault("now", 0.0)
    return PusherProtocol(key=KEY, secret=SECRET, **kw)


def frame(event, channel=None, data="{}", **extra):
    body = {"event": event, **({"channel": channel} if channel else {}), "data": data, **extra}
    return json.dumps(body)


def established(m, socket_id="1.1", now=0.0):
    return m.receive(frame("pusher:connection_established", data=json.dumps(
        {"socket_id": socket_id, "activity_timeout": 120})), now)


def succeeded(m, channel, now=0.0):
    return m.receive(frame("pusher_internal:subscription_succeeded", channel), now)


def sent(actions):
    return [json.loads(a.text) for a in actions if isinstance(a, Send)]


# ---------------------------------------------------------------- several channels, one connection


def test_every_channel_is_subscribed_once_and_each_listener_started_on_its_own_channel():
    m = connection()
    a, b = m.join("orders", wants("orders")), m.join("private-x", wants("private-x"))
    c = m.join("orders", wants("orders"))
    actions = established(m, "5.5")
    assert sent(actions) == [{"event": "pusher:subscribe", "data": {"channel": "orders"}},
                             {"event": "pusher:subscribe", "data": {
                                 "channel": "private-x", "auth": sign(KEY, SECRET, "5.5", "private-x")}}]
    assert succeeded(m, "private-x") == [Subscribed("private-x", frozenset({b}))]  # the others still pending
    assert succeeded(m, "orders") == [Subscribed("orders", frozenset({a, c}))]
    assert m.receive(frame("e", "orders"), 1) == [Emit({}, "orders", "e", (a, c))]


def test_a_listener_joining_and_leaving_the_live_connection_touches_only_its_channel():
    m = connection()
    a = m.join("orders", wants("orders"))
    established(m)
    succeeded(m, "orders")
    b = m.join("news", wants("news"))
    assert sent(m.sync(1)) == [{"event": "pusher:subscribe", "data": {"channel": "news"}}]
    assert succeeded(m, "news", 1) == [Subscribed("news", frozenset({b}))]
    late = m.join("orders", wants("orders"))  # a second listener on a subscribed channel: started at once
    assert m.sync(2) == [Subscribed("orders", frozenset({late}))]
    m.leave(late)
    assert m.sync(3) == []  # orders still has a listener
    m.leave(a)
    assert sent(m.sync(4)) == [{"event": "pusher:unsubscribe", "data": {"channel": "orders"}}]
    assert m.receive(frame("e", "orders"), 5) == []
    assert m.receive(frame("e", "news"), 5) == [Emit({}, "news", "e", (b,))]


def test_leaving_while_pending_unsubscribes_once_confirmed_and_a_rejoin_reinstates():
    m = connection()
    a = m.join("orders", wants("orders"))
    established(m)
    m.leave(a)
    assert m.sync(1) == [] and m.channel_state("orders") == "cancelled"  # as pusher-js cancelSubscription
    assert sent(succeeded(m, "orders")) == [{"event": "pusher:unsubscribe", "data": {"channel": "orders"}}]
    b = m.join("news", wants("news"))
    m.sync(2)
    m.leave(b)
    m.sync(3)
    again = m.join("news", wants("news"))
    assert m.sync(4) == [] and m.channel_state("news") == "pending"  # reinstated, not subscribed twice
    assert succeeded(m, "news") == [Subscribed("news", frozenset({again}))]


def test_a_channel_error_ends_only_its_listeners():
    m = connection()
    a, b = m.join("private-x", wants("private-x")), m.join("orders", wants("orders"))
    established(m)
    succeeded(m, "orders")
    [resolve] = m.receive(frame("pusher:subscription_error", "private-x",
                                {"type": "AuthError", "error": "bad", "status": 401}), 1)
    assert resolve == Resolve(frozenset({a}), Fail("Pusher refused the subscription to channel private-x: "
                                                   "bad (status 401)"))
    assert m.state == "open" and m.receive(frame("e", "orders"), 2) == [Emit({}, "orders", "e", (b,))]
    assert m.sync(3) == []  # not subscribed again until a listener joins anew
    m.join("private-x", wants("private-x"))
    assert sent(m.sync(4))[0]["data"]["channel"] == "private-x"


def test_a_pusher_error_naming_one_of_several_pending_channels_ends_that_one():
    m = connection()
    a, b = m.join("private-a", wants("private-a")), m.join("private-ab", wants("private-ab"))
    established(m)
    [resolve] = m.receive(frame("pusher:error", data={"message": "Invalid signature for 1.1:private-ab"}), 1)
    assert resolve.members == {b} and isinstance(resolve.outcome, Fail)
    assert m.channel_state("private-a") == "pending" and a in m.members


def test_connection_wide_outcomes_concern_every_listener():
    m = connection(activity_timeout=10, pong_timeout=5)
    m.join("a", wants("a"))
    m.join("b", wants("b"))
    established(m)
    assert m.closed(4100, "Over capacity")[0].kind == "refused"  # a bare outcome: the whole connection
    m = connection(activity_timeout=10, pong_timeout=5)
    m.join("a", wants("a"))
    established(m)
    succeeded(m, "a")
    m.tick(10)
    [outcome] = m.tick(15)
    assert isinstance(outcome, Retry) and outcome.kind == "heartbeat"


def test_a_subscription_timeout_ends_that_channel_and_a_late_confirmation_is_unsubscribed():
    m = connection(pong_timeout=5)
    a, b = m.join("slow", wants("slow")), m.join("quick", wants("quick"))
    established(m)
    succeeded(m, "quick")
    [resolve] = m.tick(5.0)
    assert resolve.members == {a} and resolve.outcome.kind == "timeout"
    assert sent(succeeded(m, "slow", 6)) == [{"event": "pusher:unsubscribe", "data": {"channel": "slow"}}]
    assert b in m.members and m.state == "open"


def test_pusher_subscription_and_count_frames_are_not_forwarded():
    m = connection()
    a = m.join("orders", wants("orders"))
    established(m)
    assert m.receive(frame("pusher_internal:subscription_count", "orders", {"subscription_count": 2}), 1) == []
    assert m.receive(frame("pusher:something", "orders"), 1) == []
    assert a in m.members


# ---------------------------------------------------------------- encrypted channels


def encrypted_event(channel, payload, master=MASTER):
    """What the official `pusher` library publishes on an encrypted channel."""
    return json.dumps(pusher.crypto.encrypt(channel, json.dumps(payload), master))


def test_encrypted_channel_opens_what_the_official_library_encrypts():
    m = connection(master_key=MASTER)
    a = m.join("private-encrypted-x", wants("private-encrypted-x"))
    actions = established(m, "2.2")
    assert sent(actions)[0]["data"]["auth"] == sign(KEY, SECRET, "2.2", "private-encrypted-x")
    assert m.receive(frame("paid", "private-encrypted-x", encrypted_event("private-encrypted-x", {"id": 7})),
                     1) == [Emit({"id": 7}, "private-encrypted-x", "paid", (a,))]


def test_shared_secret_is_the_server_libraries_derivation():
    assert shared_secret("private-encrypted-x", MASTER) == pusher.crypto.generate_shared_secret(
        b"private-encrypted-x", MASTER)


def test_a_payload_that_does_not_decrypt_is_counted_and_not_forwarded():
    m = connection(master_key=MASTER)
    a = m.join("private-encrypted-x", wants("private-encrypted-x"))
    established(m)
    wrong_key = encrypted_event("private-encrypted-x", {"id": 1}, master=bytes(32))
    for data in (wrong_key, '{"id": 1}', json.dumps({"nonce": "!!", "ciphertext": "x"})):
        [count] = m.receive(frame("paid", "private-encrypted-x", data), 1)
        assert isinstance(count, Count) and count.kind == "decrypt" and count.members == {a}


def test_an_encrypted_channel_without_a_master_key_fails_its_listener():
    m = connection()
    a, b = m.join("private-encrypted-x", wants("private-encrypted-x")), m.join("orders", wants("orders"))
    actions = established(m)
    [resolve] = [x for x in actions if isinstance(x, Resolve)]
    assert resolve.members == {a} and "encryption-master-key" in resolve.outcome.reason
    assert sent(actions) == [{"event": "pusher:subscribe", "data": {"channel": "orders"}}] and b in m.members


def test_decrypt_plain_text():
    box = SecretBox(shared_secret("private-encrypted-c", MASTER))
    nonce = bytes(24)
    body = {"nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(box.encrypt(b"hello", nonce).ciphertext).decode()}
    assert decrypt(body, box) == "hello"


# ---------------------------------------------------------------- presence members and user_id


def test_presence_members_reach_only_the_listeners_that_asked():
    m = connection()
    plain = m.join("presence-room", wants("presence-room"))
    watcher = m.join("presence-room", wants("presence-room", event="none"), members=True)
    established(m)
    succeeded(m, "presence-room")
    added = json.dumps({"user_id": "2", "user_info": {"name": "Ann"}})
    assert m.receive(frame("pusher_internal:member_added", "presence-room", added), 1) == [
        Emit({"user_id": "2", "user_info": {"name": "Ann"}}, "presence-room", "pusher:member_added", (watcher,))]
    assert m.receive(frame("pusher_internal:member_removed", "presence-room", '{"user_id":"2"}'), 2) == [
        Emit({"user_id": "2"}, "presence-room", "pusher:member_removed", (watcher,))]
    assert plain in m.members


def test_a_client_events_user_id_travels_with_it():
    m = connection()
    a = m.join("presence-room", wants("presence-room"))
    established(m)
    assert m.receive(frame("client-typing", "presence-room", '{"x":1}', user_id="u-9"), 1) == [
        Emit({"x": 1}, "presence-room", "client-typing", (a,), "u-9")]


# ---------------------------------------------------------------- `listenerd check`


def test_check_refuses_a_channel_name_pusher_would_refuse():
    from listenerd import config

    def problems(channel):
        text = f"""
[[tenants]]
id = "t1"
[tenants.integrations.pusher]
key = "k"
secret = "s"
encryption-master-key = "{base64.b64encode(MASTER).decode()}"
[[tenants.listeners]]
id = "L1"
type = "pusher"
options = {{ channel = "{channel}", members = true }}
"""
        try:
            config.parse(text, {})
        except config.ConfigError as exc:
            return [str(p) for p in exc.problems]
        return []

    assert problems("presence-" + "a" * 155) == []  # 164 characters, prefix included
    assert problems("presence-" + "a" * 156) == [
        "tenants[0].listeners[0].options.channel: at most 164 characters, as Pusher allows (got 165)"]
    assert problems("a:b") == ["tenants[0].listeners[0].options.channel: only letters, digits and "
                               "_ - = @ , . ; may be used in a Pusher channel name"]
