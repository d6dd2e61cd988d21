"""Mapping: dot paths, array indexes, `$` metadata, unresolved paths left out; property-based."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from listenerd.mapping import compile_mapping

PAYLOAD = {"interaction": {"author": {"username": "alice"}, "tags": ["a", "b"]},
           "salience": {"content": {"sentiment": 3}}, "twitter": {"user": {"screen_name": "alice_tw"}},
           "nothing": None, "10": "ten"}


def test_contract_example():
    mapping = compile_mapping({"username": "interaction.author.username", "sentiment": "salience.content.sentiment",
                               "id": "twitter.user.screen_name"})
    assert mapping.apply(PAYLOAD) == {"username": "alice", "sentiment": 3, "id": "alice_tw"}


def test_indexes_missing_paths_null_and_numeric_keys():
    mapping = compile_mapping({"second": "interaction.tags.1", "gone": "interaction.tags.5",
                               "deep": "interaction.author.username.x", "null": "nothing", "num": "10"})
    assert mapping.apply(PAYLOAD) == {"second": "b", "null": None, "num": "ten"}
    assert mapping.unresolved(PAYLOAD) == ["gone", "deep"]


def test_metadata_paths():
    mapping = compile_mapping({"kind": "$event.type", "replay": "$event.replayId", "chan": "$channel",
                               "absent": "$hash"})
    meta = {"$event": {"type": "created", "replayId": 7}, "$channel": "/topic/X"}
    assert mapping.apply({"Id": 1}, meta) == {"kind": "created", "replay": 7, "chan": "/topic/X"}


def test_empty_mapping_passes_payload_through():
    assert compile_mapping({}).apply(PAYLOAD) is PAYLOAD
    assert compile_mapping(None).apply([1, 2]) == {"value": [1, 2]}


@pytest.mark.parametrize("bad", [{"x": ""}, {"x": "a..b"}, {"x": ".a"}, {"": "a"}, {"x": 3}])
def test_bad_paths_are_refused_when_compiled(bad):
    with pytest.raises(ValueError):
        compile_mapping(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(min_size=1, max_size=4), children,
                                                                       max_size=4),
    max_leaves=20)
segment = st.text(alphabet="abcxyz019$_", min_size=1, max_size=4)
paths = st.lists(segment, min_size=1, max_size=4).map(".".join)


@given(payload=json_values, mapping=st.dictionaries(st.text(min_size=1, max_size=5), paths, max_size=5))
def test_any_payload_maps_without_error_and_only_to_declared_fields(payload, mapping):
    compiled = compile_mapping(mapping)
    event = compiled.apply(payload, {"$event": payload})
    assert set(event) <= set(mapping) if mapping else True
    assert set(compiled.unresolved(payload, {"$event": payload})) == set(mapping) - set(event)


@given(tree=st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=3),
                            st.dictionaries(st.text(alphabet="abc", min_size=1, max_size=3), st.integers(),
                                            min_size=1, max_size=3), min_size=1, max_size=3))
def test_every_existing_leaf_resolves(tree):
    mapping = {f"{a}_{b}": f"{a}.{b}" for a, inner in tree.items() for b in inner}
    event = compile_mapping(mapping).apply(tree)
    assert event == {f"{a}_{b}": v for a, inner in tree.items() for b, v in inner.items()}


@given(items=st.lists(st.integers(), max_size=6), index=st.integers(min_value=0, max_value=8))
def test_numeric_segments_index_arrays(items, index):
    event = compile_mapping({"v": f"list.{index}"}).apply({"list": items})
    assert event == ({"v": items[index]} if index < len(items) else {})
