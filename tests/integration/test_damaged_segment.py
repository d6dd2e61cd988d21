"""A stored segment damaged on disk never reaches the engine: the forwarder delivers around it.

Issue 20's probe saw one zeroed page sent as envelopes with NUL bytes and dead-lettered as the engine's
fault; here the forwarder leases past the damaged segment, which is in the dead letters with status 0.
"""

from listenerd.delivery.forwarder import Forwarder
from listenerd.model import Config
from listenerd.sim.engine import EngineSim
from tests.harness import Harness, wait_for


async def test_the_forwarder_delivers_around_a_damaged_segment(tmp_path, started):
    sim = await started(EngineSim())
    config = Config.model_validate({"store": {"path": str(tmp_path / "test.db")},
                                    "engine": {"url": sim.url, "linger-ms": 5, "batch-max": 4}})
    h = await started(Harness(tmp_path, config))
    for segment in range(3):
        for n in range(segment * 5, segment * 5 + 5):
            await h.outbox.append("t", "L1", "pusher", {"n": n})
        await h.outbox.flush()
    await h.store.transaction(lambda c: c.execute(
        "UPDATE outbox_bodies SET bodies = CAST(replace(CAST(bodies AS TEXT), '\"n\":7', '\"n\":8') AS BLOB) "
        "WHERE seq = 2"))
    forwarder = Forwarder(config.engine, h.outbox, h.metrics)
    await forwarder.start()
    try:
        await wait_for(lambda: len(sim.received) == 10 and h.outbox.depth == 0, what="the sound segments delivered")
    finally:
        await forwarder.stop(1.0)
    assert [e["event"]["n"] for e in sim.received] == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14]
    letter, = await h.dead_letters.of_tenant("t")
    assert letter.status_code == 0 and "failed its checksum (seq 2)" in letter.response
    assert h.metrics.registry.get_sample_value("listenerd_dead_lettered_events_total") == 0  # not the engine's
    assert h.metrics.registry.get_sample_value("listenerd_store_damaged_events_total") == 5
    assert h.outbox.size_bytes == 0
