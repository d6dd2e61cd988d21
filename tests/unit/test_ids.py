"""Event ids and receipt times (`listenerd.delivery.ids`) alone: the fast paths give exactly what the
standard library gives, keyed ids never change, fresh ids never repeat (not even across a fork), and a
receipt time reads back to the microsecond it was written with."""

import os
import random
import re
import uuid
from datetime import UTC, datetime

import pytest

from listenerd.delivery import ids
from listenerd.delivery.ids import EVENT_NAMESPACE, event_id, received_at, received_epoch

UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def test_fast_ids_and_timestamps_match_the_standard_library():
    for key in ("1", "abc", "ü-ß", "", "x" * 500):
        assert event_id("t", "L", key) == str(uuid.uuid5(EVENT_NAMESPACE, f"t\x00L\x00{key}"))
    fresh = {event_id("t", "L", None) for _ in range(20_000)}
    assert len(fresh) == 20_000
    assert all(uuid.UUID(f).version == 4 and uuid.UUID(f).variant == uuid.RFC_4122 and str(uuid.UUID(f)) == f
               for f in fresh)
    variants = {f[19] for f in fresh}  # the variant digit's two free bits are random too
    assert variants == set("89ab")
    rng = random.Random(7)
    stamps = [rng.uniform(0, 2e9) for _ in range(5000)] + [1700000000.0, 1700000000.9999996, 1700000001.5]
    for ts in stamps:
        assert received_at(ts) == datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), ts


def test_ids_are_lowercase_rfc_4122_text_with_their_version_and_variant_bits():
    keyed = [event_id("t", f"L{n}", f"k{n}") for n in range(2000)]
    fresh = [event_id("t", "L", None) for _ in range(2000)]
    for text, version in [(k, "5") for k in keyed] + [(f, "4") for f in fresh]:
        assert UUID_TEXT.fullmatch(text), text
        assert text[14] == version and text[19] in "89ab", text  # version nibble; variant bits 10


def test_a_keyed_id_depends_on_tenant_listener_and_key_only_and_never_changes():
    first = event_id("t1", "L1", "k")
    assert event_id("t1", "L1", "k") == first
    assert len({first, event_id("t2", "L1", "k"), event_id("t1", "L2", "k"), event_id("t1", "L1", "k2")}) == 4
    # the separators keep (tenant, listener, key) apart however the text is split between them
    assert event_id("t", "L1", "k") != event_id("t", "L", "1k")
    for n in range(10_002):  # past the cache of per-listener hashers: it is cleared, the id stays
        event_id("t1", f"other{n}", "k")
    assert event_id("t1", "L1", "k") == first == str(uuid.uuid5(EVENT_NAMESPACE, "t1\x00L1\x00k"))


def test_fresh_ids_are_drawn_from_a_pool_that_refills_without_repeating():
    seen = {event_id("t", "L", None) for _ in range(3 * 4096 + 17)}  # several refills of the bulk pool
    assert len(seen) == 3 * 4096 + 17


def test_a_forked_child_never_hands_out_its_parents_next_fresh_ids():
    event_id("t", "L", None)  # the pool is filled: the parent's next ids are already decided
    assert ids._fresh
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first fresh ids, to the parent, and out
        try:
            os.write(write, "".join(event_id("t", "L", None) for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        text = pipe.read().decode()
    os.waitpid(pid, 0)
    child = {text[i:i + 36] for i in range(0, len(text), 36)}
    parent = {event_id("t", "L", None) for _ in range(10)}
    assert len(child) == 10 and not child & parent


def test_received_at_carries_a_rounded_microsecond_into_the_next_second_and_minute():
    assert received_at(1700000099.9999996) == "2023-11-14T22:15:00.000000Z"
    assert received_at(1700000099.25) == "2023-11-14T22:14:59.250000Z"  # the cached prefix follows back
    assert received_at(0.0) == "1970-01-01T00:00:00.000000Z"


def test_received_epoch_is_the_inverse_of_received_at():
    rng = random.Random(11)
    for ts in [rng.uniform(0, 2e9) for _ in range(5000)] + [0.0, 1700000099.9999996, 1700000099.25]:
        stamp = received_at(ts)
        back = received_epoch(stamp)
        assert abs(back - ts) <= 0.5e-6 + 1e-9 * abs(ts), (ts, stamp, back)  # to the microsecond it keeps
        assert received_at(back) == stamp
    assert received_epoch("2023-11-14T22:14:59.250000Z") == 1700000099.25


@pytest.mark.parametrize("stamp", ["", "2023-11-14T22:14:59Z", "2023-11-14 22:14:59.250000Z",
                                   "2023-11-14T22:14:59.250000+00:00", "yesterday"])
def test_received_epoch_refuses_what_received_at_never_writes(stamp):
    with pytest.raises(ValueError):
        received_epoch(stamp)
