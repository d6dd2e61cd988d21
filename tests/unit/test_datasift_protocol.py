"""DataSift protocol decisions without sockets: dispatch order, failure scope, delete identity, URLs, and the
machine: subscriptions on a live socket, when a listener is started, silence, how a socket ends."""

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from listenerd.model import SECRET_MASK
from listenerd.outcome import Fail, Retry
from listenerd.sources.datasift_protocol import (
    CONFIRM_WAIT,
    Count,
    DataSiftProtocol,
    End,
    Failure,
    Item,
    Malformed,
    Notice,
    Reconnect,
    ReconnectPolicy,
    Resolve,
    Send,
    Started,
    Tick,
    Unconfirmed,
    classify,
    decode_frame,
    public_url,
    stream_url,
)

H = "4f3af38ad1c31646561bc814c3e69af5"
H2 = "0123456789abcdef0123456789abcdef"
H3 = "fedcba9876543210fedcba9876543210"
INTERACTION = {"interaction": {"id": "1e1e875ab43fa233e074337458bc1dca", "type": "twitter",
                               "author": {"username": "johndoe"}},
               "twitter": {"user": {"screen_name": "johndoe"}}, "salience": {"content": {"sentiment": 4}}}


def test_tick_is_a_tick_even_though_it_has_a_status():
    assert classify({"tick": 1311694603, "status": "connected", "message": "Waiting for data"}) == Tick()
    assert classify({"tick": 1311694603}) == Tick()


@pytest.mark.parametrize("level", ["success", "warning"])
def test_success_and_warning_are_notices_scoped_to_their_hash(level):
    assert classify({"status": level, "message": "m", "hash": H}) == Notice(level, "m", H)
    assert classify({"status": level, "message": f"about {H} here"}, [H]) == Notice(level, f"about {H} here", H)
    assert classify({"status": "odd", "message": "x"}) == Notice("info", "x", None)


def test_failure_about_credentials_is_socket_wide():
    decision = classify({"status": "failure", "message": "A username and API key are both required"}, [H])
    assert decision == Failure("A username and API key are both required", frozenset(), credentials=True)


def test_failure_naming_hashes_is_scoped_to_them_by_field_by_list_or_by_text():
    assert classify({"status": "failure", "message": "gone", "hash": H}) == Failure("gone", frozenset({H}), False)
    listed = {"status": "failure", "message": "stopped", "hashes": [H, H2, 7, ""]}
    assert classify(listed) == Failure("stopped", frozenset({H, H2}), False)  # non-strings and blanks ignored
    text = f"The hash {H2} does not exist"
    assert classify({"status": "failure", "message": text}, [H, H2]) == Failure(text, frozenset({H2}), False)
    # unknown hash in text with no subscriptions: unattributed, not credentials
    assert classify({"status": "failure", "message": text}) == Failure(text, frozenset(), False)
    # a hash named is never a credentials failure, whatever the words
    assert classify({"status": "failure", "message": "bad API key", "hashes": [H]}).credentials is False


def test_error_status_is_a_failure_and_status_wins_over_everything_else():
    assert isinstance(classify({"status": "error", "message": "x"}), Failure)
    mixed = {"status": "failure", "message": "bad", "reconnect": True, "hash": H, "data": INTERACTION}
    assert classify(mixed) == Failure("bad", frozenset({H}), False)
    assert classify({"status": "warning", "message": "w", "reconnect": True}) == Notice("warning", "w", None)


def test_reconnect_comes_before_data():
    assert classify({"reconnect": True}) == Reconnect()
    assert classify({"reconnect": True, "hash": H, "data": INTERACTION}) == Reconnect()
    assert isinstance(classify({"reconnect": False, "hash": H, "data": INTERACTION}), Item)


def test_interaction_keyed_by_interaction_id():
    decision = classify({"hash": H, "data": INTERACTION})
    assert decision == Item(H, INTERACTION, False, "1e1e875ab43fa233e074337458bc1dca")


def test_delete_has_an_id_distinct_from_the_interaction():
    data = {"interaction": {"id": "1e1e875ab43fa233e074337458bc1dca"}, "deleted": True}
    decision = classify({"hash": H, "data": data})
    assert decision == Item(H, data, True, "deleted:1e1e875ab43fa233e074337458bc1dca")
    # Ruby / Python 0.x put `deleted` at the top level
    top = classify({"hash": H, "deleted": True, "data": {"interaction": {"id": "abc"}}})
    assert isinstance(top, Item) and top.deleted and top.key == "deleted:abc"


def test_interaction_without_an_id_has_no_key():
    assert classify({"hash": H, "data": {"twitter": {}}}) == Item(H, {"twitter": {}}, False, None)
    assert classify({"hash": H, "data": {"interaction": {"id": True}}}).key is None
    assert classify({"hash": H, "data": {"interaction": {"id": 42}}}).key == "42"


@pytest.mark.parametrize("message", [[1, 2], "text", 3, None, {}, {"hash": H}, {"hash": H, "data": [1]},
                                     {"data": INTERACTION}, {"hash": "", "data": INTERACTION}])
def test_wrong_shapes_are_malformed(message):
    assert isinstance(classify(message), Malformed)


def test_decode_frame_counts_bad_json_and_oversize_before_parsing():
    assert decode_frame(b'{"hash": "x", "data": {', 1000) == Malformed(
        decode_frame(b'{"hash": "x", "data": {', 1000).reason)
    assert decode_frame(b'{"hash": "x", "data": {', 1000).kind == "malformed"
    big = orjson.dumps({"hash": H, "data": {"interaction": {"id": "i", "content": "x" * 2000}}})
    oversized = decode_frame(big, 1000)
    assert isinstance(oversized, Malformed) and oversized.kind == "oversized"
    assert isinstance(decode_frame(big, len(big)), Item)
    assert isinstance(decode_frame(big.decode(), len(big)), Item)
    assert decode_frame("é" * 600, 1000).kind == "oversized"  # counted in bytes, not characters


@given(st.recursive(st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(),
                    lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids), max_leaves=20))
def test_classify_never_raises_on_any_json(value):
    classify(value, [H])
    decode_frame(orjson.dumps(value), 1 << 20, [H])


def test_stream_url_puts_credentials_in_the_query_and_public_url_strips_them():
    url = stream_url("wss://websocket.datasift.com/multi", "me", "k&y=1")
    assert url == "wss://websocket.datasift.com/multi?username=me&api_key=k%26y%3D1"
    assert stream_url("ws://h:1/multi?x=1", "u", "k") == "ws://h:1/multi?x=1&username=u&api_key=k"
    assert public_url(url) == "wss://websocket.datasift.com/multi"
    assert public_url("ws://user:pw@h:1/multi?api_key=k") == "ws://h:1/multi"


# ---------------------------------------------------------------- the machine

KEY = "api-key-s3cret"
TICK = orjson.dumps({"tick": 1, "status": "connected"})


def ok(stream_hash):
    """DataSift's confirmation of a subscribe."""
    return orjson.dumps({"status": "success", "message": f"Successfully subscribed to hash {stream_hash}"})


def machine(silence=65.0, max_bytes=1 << 20, hashes=(H,), now=0.0, confirm=True, wait=None, policy=None):
    """A machine with one listener per hash of `hashes` joined (tickets 1, 2 ...), its socket open at `now`
    and (by default) every hash confirmed by DataSift."""
    m = DataSiftProtocol(url="wss://stream.example/multi", api_key=KEY, silence_timeout=silence,
                         max_frame_bytes=max_bytes, confirm_wait=wait, policy=policy)
    for h in hashes:
        m.join(h)
    m.opened(now)
    if confirm:
        for h in hashes:
            m.receive(ok(h), now)
    return m


def frame(**message):
    return orjson.dumps(message)


def test_nothing_is_sent_before_the_socket_opens_then_every_hash_once():
    m = DataSiftProtocol(url="u", api_key=KEY, silence_timeout=65, max_frame_bytes=1000)
    m.join(H2)
    m.join(H)
    assert m.sync() == []
    assert m.opened(0) == [Send("subscribe", H2), Send("subscribe", H)]  # sorted; nobody started before an answer
    assert m.sync() == []
    assert orjson.loads(Send("subscribe", H).text) == {"action": "subscribe", "hash": H}
    assert orjson.loads(Send("unsubscribe", H).text) == {"action": "unsubscribe", "hash": H}


def test_a_listener_is_started_once_datasift_confirms_its_hash():
    m = machine(confirm=False)
    assert m.sync() == []  # subscribed at open, but nothing heard yet
    assert [type(a) for a in m.receive(b"{bad", 1)] == [Count]  # a skipped frame confirms nothing
    nobody = frame(status="failure", message="gone", hash=H2)
    assert [type(a) for a in m.receive(nobody, 1)] == [Notice]  # nor a failure
    assert not m.confirmed
    assert m.receive(TICK, 1) == [] and m.confirmed  # the socket answers; the subscription is not confirmed yet
    assert m.receive(frame(status="warning", message="w"), 1) == [Notice("warning", "w", None)]
    unsubscribed = f"Successfully unsubscribed from hash {H}"
    assert m.receive(frame(status="success", message=unsubscribed), 1) == [Notice("success", unsubscribed, H)]
    started, note = m.receive(ok(H), 2)
    assert started == Started(frozenset({1})) and note == Notice("success", f"Successfully subscribed to hash {H}", H)
    assert m.receive(ok(H), 3) == [Notice("success", f"Successfully subscribed to hash {H}", H)]  # once
    assert m.subscribed == {H}


def test_a_listener_is_started_by_the_first_interaction_for_its_hash():
    m = machine(hashes=(H, H2), confirm=False)
    actions = m.receive(frame(hash=H, data=INTERACTION), 1)
    assert actions[0] == Started(frozenset({1})) and isinstance(actions[1], Item)  # started, then its event
    assert [type(a) for a in m.receive(frame(hash=H, data=INTERACTION), 2)] == [Item]  # started once only
    assert m.receive(TICK, 2) == []  # the listener of H2 still waits for its own confirmation
    assert m.subscribed == {H}


def test_a_hash_unconfirmed_past_the_wait_says_so_once_and_may_still_start():
    m = machine(hashes=(H, H2), confirm=False, wait=5.0, now=10.0)
    assert m.deadline() == pytest.approx(15.0)  # the wait, well before the 65 s of silence
    assert m.tick(14.9) == []
    m.receive(ok(H2), 12.0)
    [late] = m.tick(15.0)
    assert late == Unconfirmed(frozenset({1}), f"Subscribed to stream {H}; DataSift has not confirmed it after 5s")
    assert m.tick(16.0) == [] and m.deadline() == pytest.approx(12.0 + 65.0)  # said once; silence is next
    assert m.receive(ok(H), 17.0)[0] == Started(frozenset({1}))  # a late confirmation still starts it
    # frames arriving all the time: the wait is checked on each of them too
    busy = machine(confirm=False, wait=5.0)
    assert busy.receive(TICK, 4.0) == []
    assert busy.receive(TICK, 5.0) == [Unconfirmed(frozenset({1}), f"Subscribed to stream {H}; DataSift has not "
                                                                   f"confirmed it after 5s")]


def test_the_wait_is_a_documented_constant_read_for_each_socket(monkeypatch):
    assert DataSiftProtocol(url="u", api_key=KEY, silence_timeout=65, max_frame_bytes=1).confirm_wait == CONFIRM_WAIT
    monkeypatch.setattr("listenerd.sources.datasift_protocol.CONFIRM_WAIT", 0.5)
    assert DataSiftProtocol(url="u", api_key=KEY, silence_timeout=65, max_frame_bytes=1).confirm_wait == 0.5


def test_each_listener_is_reported_started_once_however_often_the_socket_syncs():
    m = machine(hashes=(H, H2), confirm=False)
    late = m.join(H)  # joins before DataSift answered: reported with the others of its hash
    assert m.sync() == []
    assert m.receive(ok(H), 1)[0] == Started(frozenset({1, late}))
    assert m.receive(ok(H2), 1)[0] == Started(frozenset({2}))
    assert m.sync() == [] and m.receive(TICK, 2) == []  # already reported: not again
    newcomer = m.join(H2)
    assert m.sync() == [Started(frozenset({newcomer}))]  # only the newcomer, its hash already confirmed
    assert m.sync() == []


def test_subscribe_and_unsubscribe_while_connected():
    m = machine()
    second = m.join(H2)
    assert m.sync() == [Send("subscribe", H2)]  # started once DataSift confirms it
    assert m.receive(ok(H2), 1)[0] == Started(frozenset({second}))
    m.leave(1)
    assert m.sync() == [Send("unsubscribe", H)]  # the listener of H2 was reported before
    assert m.sync() == []  # nothing more to send
    again = m.join(H)
    assert m.sync() == [Send("subscribe", H)]  # subscribed again: confirmed afresh
    assert m.receive(ok(H), 2)[0] == Started(frozenset({again}))


def test_a_second_listener_of_a_hash_shares_its_subscription():
    m = machine()
    second = m.join(H)
    assert m.sync() == [Started(frozenset({second}))]  # the newcomer is started, nothing is sent again
    m.leave(1)
    assert m.sync() == []  # one listener still follows it
    m.leave(second)
    assert m.sync() == [Send("unsubscribe", H)]


def test_a_quick_leave_and_join_sends_nothing():
    m = machine()
    m.leave(1)
    again = m.join(H)  # a restart with a changed mapping: the hash stays subscribed
    assert m.sync() == [Started(frozenset({again}))]


def test_a_listener_that_left_before_its_hash_was_sent_is_never_reported():
    m = DataSiftProtocol(url="u", api_key=KEY, silence_timeout=65, max_frame_bytes=1000)
    gone, stays = m.join(H), m.join(H2)
    m.leave(gone)
    assert m.opened(0) == [Send("subscribe", H2)]
    assert m.receive(TICK, 1) == []
    assert m.receive(ok(H2), 1)[0] == Started(frozenset({stays}))


def test_items_and_deletes_are_emitted_to_their_hash():
    m = machine()
    [emit] = m.receive(frame(hash=H, data=INTERACTION), 1)
    assert emit == Item(H, INTERACTION, False, "1e1e875ab43fa233e074337458bc1dca")
    [delete] = m.receive(frame(hash=H, data={"interaction": {"id": "abc"}, "deleted": True}), 2)
    assert delete.deleted and delete.key == "deleted:abc"


def test_a_failure_naming_a_hash_by_field_or_text_resolves_only_its_listeners():
    m = machine(hashes=(H, H2))
    [resolve] = m.receive(frame(status="failure", message="gone", hash=H), 1)
    assert resolve == Resolve(H, Fail(f"DataSift refused stream {H}: gone"))
    assert H in m.rejected and H not in m.sent
    [resolve] = m.receive(frame(status="failure", message=f"The hash {H2} does not exist"), 2)
    assert resolve.hash == H2 and isinstance(resolve.outcome, Fail)


def test_a_failure_naming_hashes_in_a_list_resolves_those_listeners_and_keeps_the_socket():
    m = machine(hashes=(H, H2, H3))
    actions = m.receive(frame(status="failure", message="Streams stopped", hashes=[H, H3, "other"]), 1)
    assert actions == [Resolve(H, Fail(f"DataSift refused stream {H}: Streams stopped")),
                       Resolve(H3, Fail(f"DataSift refused stream {H3}: Streams stopped")),
                       Notice("warning", "datasift failure for a hash no listener follows: Streams stopped", "other")]
    assert not any(isinstance(a, End) for a in actions) and m.open
    assert m.sent == {H2} and m.rejected >= {H, H3}
    assert [type(a) for a in m.receive(frame(hash=H2, data=INTERACTION), 2)] == [Item]  # the other still flows


def test_a_warning_that_a_hash_does_not_exist_fails_that_listener_only():
    m = machine(hashes=(H, H2), confirm=False)
    text = f"The hash {H} doesn't exist"  # named in the text only, as DataSift words it
    note, resolve = m.receive(frame(status="warning", message=text), 1)
    assert note == Notice("warning", text, H)
    assert resolve == Resolve(H, Fail(f"DataSift refused stream {H}: {text}"))
    assert m.sent == {H2} and H in m.rejected and m.open
    assert m.receive(ok(H2), 2)[0] == Started(frozenset({2}))
    # other warnings about a hash are notices; a missing hash nobody follows fails nobody
    assert machine().receive(frame(status="warning", message="close to a limit", hash=H), 1) == [
        Notice("warning", "close to a limit", H)]
    assert machine().receive(frame(status="warning", message=f"The hash {H2} doesn't exist", hash=H2), 1) == [
        Notice("warning", f"The hash {H2} doesn't exist", H2)]


def test_a_rejected_hash_is_never_unsubscribed_and_retried_only_after_a_new_definition():
    m = machine()
    m.receive(frame(status="failure", message="gone", hash=H), 1)
    assert m.sync() == []  # still wanted by the failing listener, but not subscribed again
    m.leave(1)  # the failed listener ends
    assert m.sync() == []  # never unsubscribed: the server already dropped it
    again = m.join(H)  # a new definition with the same hash
    assert m.sync() == [Send("subscribe", H)]
    assert m.receive(ok(H), 2)[0] == Started(frozenset({again}))


def test_a_failure_for_a_hash_nobody_follows_is_noted_not_resolved():
    m = machine()
    [note] = m.receive(frame(status="failure", message="x", hash=H2), 1)
    assert isinstance(note, Notice) and note.level == "warning" and note.hash == H2


def test_a_failure_about_credentials_ends_the_socket_as_failed_and_any_other_as_retry():
    m = machine(hashes=(H, H2))
    [end] = m.receive(frame(status="failure", message=f"Invalid API key {KEY}"), 1)
    assert end == End(Fail(f"DataSift refused the credentials: Invalid API key {SECRET_MASK}"))
    [end] = machine().receive(frame(status="error", message="Internal error, please try again"), 1)
    assert end == End(Retry("refused", "DataSift reported a failure: Internal error, please try again", 1.0))


def test_reconnect_advice_ends_the_socket_for_an_immediate_retry():
    [end] = machine().receive(frame(reconnect=True), 1)
    assert end == End(Retry("reconnect-advice", "DataSift asked for a reconnect", 0))


def test_silence_ends_the_socket_at_its_bound_and_frames_or_listening_defer_it():
    m = machine(silence=1.0, now=10.0)
    assert m.heartbeat_bound == 1.0  # what its listeners declare to the supervisor
    assert m.deadline() == pytest.approx(11.0)
    assert m.tick(10.9) == []
    m.receive(TICK, 10.5)
    assert m.deadline() == pytest.approx(11.5)
    m.listening(12.0)  # the driver was busy emitting under back-pressure until now
    assert m.tick(12.9) == []
    [end] = m.tick(13.0)
    assert end == End(Retry("heartbeat", "No data or tick from DataSift for 1s; reconnecting", 0))
    assert machine(silence=65.0).deadline() == pytest.approx(65.0)


def test_malformed_and_oversized_frames_are_counted_for_their_hash_or_everyone():
    m = machine(max_bytes=200, hashes=(H, H2))
    [count] = m.receive(b"{not json", 1)
    assert count.kind == "malformed" and count.hashes == {H, H2}  # names no hash: every listener's
    [count] = m.receive(frame(hash=H, data=[1]), 2)
    assert count == Count("malformed", "stream message without a data object", frozenset({H}))
    [count] = m.receive(orjson.dumps({"hash": H, "data": {"x": "y" * 300}}), 3)
    assert count.kind == "oversized" and count.hashes == {H, H2}  # refused before parsing: no hash known
    [count] = m.receive(frame(hash="nobody", data=[1]), 4)
    assert count.hashes == frozenset()  # a hash no listener follows counts against none


def test_notices_are_masked_and_scoped():
    [note] = machine().receive(frame(status="warning", message=f"close to your limit, key {KEY}", hash=H), 1)
    assert note == Notice("warning", f"close to your limit, key {SECRET_MASK}", H)


@pytest.mark.parametrize(("code", "outcome"), [
    (401, Fail("DataSift rejected the credentials (HTTP 401)")),
    (403, Fail("DataSift rejected the credentials (HTTP 403)")),
    (404, Fail("DataSift refused the connection to wss://stream.example/multi (HTTP 404)")),
    (429, Retry("refused", "DataSift refused the connection to wss://stream.example/multi (HTTP 429)", 10.0)),
    (420, Retry("refused", "DataSift refused the connection to wss://stream.example/multi (HTTP 420)", 10.0)),
    (503, Retry("refused", "DataSift refused the connection to wss://stream.example/multi (HTTP 503)", 10.0)),
])
def test_handshake_refusals(code, outcome):
    assert machine().handshake_refused(code) == outcome


def test_how_a_socket_ends_is_worded_and_kinded():
    m = machine()
    assert m.closed(None, None) == Retry("network", "Connection to DataSift lost (no close frame)", 1.0)
    assert m.closed(None, (1009, "frame too big")) == Retry(
        "protocol", "Connection to DataSift closed by listenerd (code 1009: frame too big)", 2.0)
    assert m.closed(None, (1011, "")).kind == "heartbeat"
    assert m.closed((1000, f"bye {KEY}"), None) == Retry(
        "closed", f"DataSift closed the connection (code 1000: bye {SECRET_MASK})", 4.0)
    assert m.unreachable(f"refused at ?api_key={KEY}").reason.endswith(SECRET_MASK)
    assert m.unreachable("timed out", "timeout").kind == "timeout"
    assert isinstance(m.invalid_url(), Fail)


# ---------------------------------------------------------------- the reconnect policy (datasift-python's)


def test_network_errors_back_off_linearly_by_a_second_up_to_16s():
    policy = ReconnectPolicy()
    assert [policy.network_error() for _ in range(18)] == [float(n) for n in range(1, 17)] + [16.0, 16.0]


def test_http_errors_back_off_exponentially_from_10s_to_320s():
    policy = ReconnectPolicy()
    assert [policy.http_error() for _ in range(8)] == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 320.0, 320.0]


def test_mixed_errors_never_shorten_the_delay_and_an_answer_resets_it():
    policy = ReconnectPolicy()
    policy.network_error(), policy.network_error(), policy.network_error()
    assert policy.http_error() == 10.0  # 3 s doubled is under the first HTTP step
    assert policy.network_error() == 11.0
    assert policy.http_error() == 22.0
    assert policy.network_error() == 22.0  # past the linear cap: a network error keeps the longer delay
    policy.reset()
    assert policy.network_error() == 1.0


def test_the_policy_outlives_a_socket_and_resets_when_datasift_answers():
    policy = ReconnectPolicy()
    first = machine(confirm=False, policy=policy)
    assert first.unreachable("refused").delay == 1.0
    second = machine(confirm=False, policy=policy)  # the next socket of the same credentials
    assert second.handshake_refused(503).delay == 10.0
    third = machine(confirm=False, policy=policy)
    assert third.closed(None, None).delay == 11.0
    fourth = machine(confirm=False, policy=policy)
    fourth.receive(TICK, 1)  # DataSift answered: the back-off starts afresh
    assert fourth.closed(None, None).delay == 1.0
    assert fourth.receive(frame(reconnect=True), 2) == [End(Retry("reconnect-advice", "DataSift asked for a "
                                                                                      "reconnect", 0))]
