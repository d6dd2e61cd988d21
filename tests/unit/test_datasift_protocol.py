"""DataSift protocol decisions without sockets: dispatch order, failure scope, delete identity, URLs, and the
machine: subscriptions on a live socket, when a listener is started, silence, how a socket ends."""

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from listenerd.model import SECRET_MASK
from listenerd.outcome import Fail, Retry
from listenerd.sources.datasift_protocol import (
    Count,
    DataSiftProtocol,
    End,
    Failure,
    Item,
    Malformed,
    Notice,
    Reconnect,
    Resolve,
    Send,
    Started,
    Tick,
    classify,
    decode_frame,
    public_url,
    stream_url,
)

H = "4f3af38ad1c31646561bc814c3e69af5"
H2 = "0123456789abcdef0123456789abcdef"
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
    assert decision == Failure("A username and API key are both required", None, credentials=True)


def test_failure_naming_a_hash_is_scoped_to_it_by_field_or_by_text():
    assert classify({"status": "failure", "message": "gone", "hash": H}) == Failure("gone", H, False)
    text = f"The hash {H2} does not exist"
    assert classify({"status": "failure", "message": text}, [H, H2]) == Failure(text, H2, False)
    # unknown hash in text with no subscriptions: unattributed, not credentials
    assert classify({"status": "failure", "message": text}) == Failure(text, None, False)


def test_error_status_is_a_failure_and_status_wins_over_everything_else():
    assert isinstance(classify({"status": "error", "message": "x"}), Failure)
    mixed = {"status": "failure", "message": "bad", "reconnect": True, "hash": H, "data": INTERACTION}
    assert classify(mixed) == Failure("bad", H, False)
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


def machine(silence=65.0, max_bytes=1 << 20, hashes=(H,), now=0.0, confirm=True):
    """A machine with one listener per hash of `hashes` joined (tickets 1, 2 ...), its socket open at `now`
    and (by default) confirmed by a tick."""
    m = DataSiftProtocol(url="wss://stream.example/multi", api_key=KEY, silence_timeout=silence,
                         max_frame_bytes=max_bytes)
    for h in hashes:
        m.join(h)
    m.opened(now)
    if confirm:
        m.receive(TICK, now)
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


def test_a_listener_is_started_once_its_hash_is_sent_and_the_socket_answers():
    m = machine(confirm=False)
    assert m.sync() == []  # subscribed at open, but nothing heard yet
    assert [type(a) for a in m.receive(b"{bad", 1)] == [Count]  # a skipped frame confirms nothing
    nobody = frame(status="failure", message="gone", hash=H2)
    assert [type(a) for a in m.receive(nobody, 1)] == [Notice]  # nor a failure
    assert not m.confirmed
    m = machine(confirm=False)
    assert m.receive(frame(status="warning", message="w"), 1)[0] == Started(frozenset({1}))
    m = machine(confirm=False)
    assert m.receive(frame(hash=H, data=INTERACTION), 1)[0] == Started(frozenset({1}))
    assert m.receive(TICK, 2) == []  # once confirmed, a tick says nothing new


def test_each_listener_is_reported_started_once_however_often_the_socket_syncs():
    m = machine(hashes=(H, H2), confirm=False)
    late = m.join(H)  # joins before the socket answered: reported with the others
    assert m.sync() == []
    assert m.receive(TICK, 1) == [Started(frozenset({1, 2, late}))]
    assert m.sync() == [] and m.receive(TICK, 2) == []  # already reported: not again
    newcomer = m.join(H2)
    assert m.sync() == [Started(frozenset({newcomer}))]  # only the newcomer, its hash already subscribed
    assert m.sync() == []


def test_subscribe_and_unsubscribe_while_connected():
    m = machine()
    second = m.join(H2)
    assert m.sync() == [Send("subscribe", H2), Started(frozenset({second}))]
    m.leave(1)
    assert m.sync() == [Send("unsubscribe", H)]  # the listener of H2 was reported before
    assert m.sync() == []  # nothing more to send


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
    assert m.receive(TICK, 1) == [Started(frozenset({stays}))]


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


def test_a_rejected_hash_is_never_unsubscribed_and_retried_only_after_a_new_definition():
    m = machine()
    m.receive(frame(status="failure", message="gone", hash=H), 1)
    assert m.sync() == []  # still wanted by the failing listener, but not subscribed again
    m.leave(1)  # the failed listener ends
    assert m.sync() == []  # never unsubscribed: the server already dropped it
    again = m.join(H)  # a new definition with the same hash
    assert m.sync() == [Send("subscribe", H), Started(frozenset({again}))]


def test_a_failure_for_a_hash_nobody_follows_is_noted_not_resolved():
    m = machine()
    [note] = m.receive(frame(status="failure", message="x", hash=H2), 1)
    assert isinstance(note, Notice) and note.level == "warning" and note.hash == H2


def test_a_failure_about_credentials_ends_the_socket_as_failed_and_any_other_as_retry():
    m = machine(hashes=(H, H2))
    [end] = m.receive(frame(status="failure", message=f"Invalid API key {KEY}"), 1)
    assert end == End(Fail(f"DataSift refused the credentials: Invalid API key {SECRET_MASK}"))
    [end] = machine().receive(frame(status="error", message="Internal error, please try again"), 1)
    assert end == End(Retry("refused", "DataSift reported a failure: Internal error, please try again"))


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
    (429, Retry("refused", "DataSift refused the connection to wss://stream.example/multi (HTTP 429)")),
    (420, Retry("refused", "DataSift refused the connection to wss://stream.example/multi (HTTP 420)")),
    (503, Retry("refused", "DataSift refused the connection to wss://stream.example/multi (HTTP 503)")),
])
def test_handshake_refusals(code, outcome):
    assert machine().handshake_refused(code) == outcome


def test_how_a_socket_ends_is_worded_and_kinded():
    m = machine()
    assert m.closed(None, None) == Retry("network", "Connection to DataSift lost (no close frame)")
    assert m.closed(None, (1009, "frame too big")) == Retry(
        "protocol", "Connection to DataSift closed by listenerd (code 1009: frame too big)")
    assert m.closed(None, (1011, "")).kind == "heartbeat"
    assert m.closed((1000, f"bye {KEY}"), None) == Retry(
        "closed", f"DataSift closed the connection (code 1000: bye {SECRET_MASK})")
    assert m.unreachable(f"refused at ?api_key={KEY}").reason.endswith(SECRET_MASK)
    assert m.unreachable("timed out", "timeout").kind == "timeout"
    assert isinstance(m.invalid_url(), Fail)
