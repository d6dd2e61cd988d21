"""Event ids and receipt times (`listenerd.delivery.ids`) alone: the fast paths give exactly what the
standard library gives, keyed ids never change, fresh ids never repeat (not even across a fork)."""

import random
import uuid
from datetime import UTC, datetime

from listenerd.delivery.ids import EVENT_NAMESPACE, event_id, received_at


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
