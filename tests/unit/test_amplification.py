"""Mapping amplification (issue 17, finding 2): mappings are bounded, and an event too large to send is
set aside in its own listener's dead letters before its copies are built, never sent."""

import orjson
import pytest

from listenerd.config import ConfigError, validate
from listenerd.control import Invalid, _validated
from listenerd.delivery.outbox import OVERSIZED
from listenerd.mapping import EventTooLarge, check_bounds, compile_mapping
from listenerd.model import Limits
from tests.harness import Harness, integration, listener

BIG = "x" * 10_000


def test_a_mapping_naming_one_big_field_many_times_is_stopped_at_the_size_bound():
    mapping = compile_mapping({f"f{i}": "body" for i in range(400)})  # within the field bound; 4 MB of copies
    with pytest.raises(EventTooLarge) as caught:
        mapping.apply({"body": BIG}, max_bytes=1 << 20)
    assert 1 << 20 < caught.value.size < (1 << 20) + 20_000  # stopped at the bound, not after 400 copies
    assert len(mapping.apply({"body": "small"}, max_bytes=1 << 20)) == 400


def test_nested_values_named_many_times_are_measured_once_and_count_fully():
    mapping = compile_mapping({f"f{i}": "doc" for i in range(200)})
    with pytest.raises(EventTooLarge):
        mapping.apply({"doc": {"items": [BIG] * 2}}, max_bytes=1 << 20)  # 200 x 20 KB


@pytest.mark.parametrize(("mapping", "message"), [
    ({f"f{i}": "a" for i in range(6)}, "at most 5 fields"),
    ({"deep": ".".join(["a"] * 9)}, "mapping.deep: more than 8 path segments"),
    ({"long": "a" * 65}, "mapping.long: path longer than 64 characters"),
])
def test_bounds_name_the_field_and_the_limit(mapping, message):
    with pytest.raises(ValueError, match=message):
        check_bounds(mapping, 5, 64, 8)


def config_with(mapping, limits=None):
    return {"limits": limits or {}, "tenants": [{"id": "t", "integrations": {"pusher": {"key": "k", "secret": "s"}},
                                                  "listeners": [{"id": "L", "type": "pusher",
                                                                 "options": {"channel": "c"}, "mapping": mapping}]}]}


def test_check_reports_a_mapping_past_the_configured_bounds_with_its_location():
    with pytest.raises(ConfigError) as caught:
        validate(config_with({f"f{i}": "body" for i in range(20_000)}))  # the attack, at the default bound
    assert [str(p) for p in caught.value.problems] == [
        "tenants[0].listeners[0].mapping: at most 500 fields (limits.mapping-max-fields; got 20000)"]
    with pytest.raises(ConfigError) as caught:
        validate(config_with({"a": "x.y.z"}, {"mapping-max-path-segments": 2}))
    assert [p.location for p in caught.value.problems] == ["tenants[0].listeners[0].mapping.a"]
    assert validate(config_with({f"f{i}": "body" for i in range(600)}, {"mapping-max-fields": 1000}))


def test_the_api_refuses_a_mapping_past_the_bounds_naming_the_field():
    body = {"id": "L", "type": "pusher", "options": {"channel": "c"}, "mapping": {f"f{i}": "b" for i in range(501)}}
    with pytest.raises(Invalid) as caught:
        _validated(body, Limits())
    assert caught.value.fields == ["mapping"] and "at most 500 fields" in caught.value.message
    with pytest.raises(Invalid) as caught:
        _validated({**body, "mapping": {"x": "a." * 40 + "a"}}, Limits())
    assert caught.value.fields == ["mapping.x"]


async def test_an_oversized_event_goes_to_its_own_listeners_dead_letters_and_the_other_tenants_events_flow(tmp_path):
    async with Harness(tmp_path) as h:
        attacker = h.context("evil", listener(id="A", type="pusher", options={"channel": "c"},
                                              mapping={f"f{i}": "body" for i in range(400)}),
                             integration("pusher", key="k", secret="s"))
        victim = h.context("good", listener(id="V", type="pusher", options={"channel": "c"},
                                            mapping={"body": "body"}), integration("pusher", key="k", secret="s"))
        passthrough = h.context("evil", listener(id="P", type="pusher", options={"channel": "c"}),
                                integration("pusher", key="k", secret="s"))
        await victim.emit({"body": "first"})
        await attacker.emit({"body": BIG})                 # stopped while mapping: 400 x 10 KB
        await passthrough.emit({"body": "y" * (2 << 20)})  # no mapping: a 2 MiB envelope, measured whole
        await victim.emit({"body": "second"})
        await h.outbox.flush()
        assert [e["event"]["body"] for e in await h.events()] == ["first", "second"]
        assert h.metrics.oversized_events._value.get() == 2
        errors = {s.labels["listener"]: s.value for s in h.metrics.listener_errors.collect()[0].samples
                  if s.name.endswith("_total") and s.labels["kind"] == "oversized"}
        assert errors == {"A": 1, "P": 1}
        assert await h.dead_letters.of_tenant("good") == []
        letters = await h.dead_letters.of_tenant("evil")
        assert [(d.listener_id, d.status_code) for d in letters] == [("A", OVERSIZED), ("P", OVERSIZED)]
        assert "engine.max-event-bytes" in letters[0].response and "never sent" in letters[0].response
        kept = orjson.loads(letters[1].events)
        assert isinstance(kept[0], str) and len(kept[0]) == 64 * 1024  # the head, kept as text: never re-sent
        assert await h.dead_letters.requeue("evil", letters[1].id) == 0
        assert h.outbox.depth == 2
