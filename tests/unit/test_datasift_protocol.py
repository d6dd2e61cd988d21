"""DataSift protocol decisions without sockets: dispatch order, failure scope, delete identity, URLs."""

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from listenerd.sources.datasift_protocol import (
    Failure,
    Item,
    Malformed,
    Notice,
    Reconnect,
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
