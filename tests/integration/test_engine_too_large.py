"""An engine 413 (issue 17, finding 2): the batch is halved until the refused event is alone, so a batch
that mixes tenants dead-letters only the offending listener's event, and order holds for the rest."""

import orjson

from listenerd.delivery.forwarder import Forwarder
from listenerd.sim.engine import EngineSim
from tests.harness import Harness, wait_for
from tests.integration.test_forwarder import engine_config


async def test_a_413_splits_the_batch_until_the_big_event_is_alone(tmp_path):
    async with Harness(tmp_path) as h, EngineSim(max_body_bytes=64 * 1024) as sim:
        forwarder = Forwarder(engine_config(sim.url, **{"batch-max": 500, "linger-ms": 200}), h.outbox, h.metrics)
        for n in range(150):
            await h.outbox.append("good", "V", "pusher", {"n": n}, key=f"v{n}")
            if n == 97:  # below max-event-bytes, above what this engine takes in one body
                await h.outbox.append("evil", "A", "pusher", {"blob": "z" * 100_000}, key="big")
        await h.outbox.flush()
        await forwarder.start()
        try:
            await wait_for(lambda: h.outbox.depth == 0, what="everything delivered or set aside")
        finally:
            await forwarder.stop(1.0)
        assert [e["event"]["n"] for e in sim.events("V")] == list(range(150))  # all, in order
        assert await h.dead_letters.of_tenant("good") == []
        [letter] = await h.dead_letters.of_tenant("evil")
        assert letter.status_code == 413 and letter.listener_id == "A"
        [event] = orjson.loads(letter.events)
        assert event["tenant-id"] == "evil" and len(event["event"]["blob"]) == 100_000
        assert h.metrics.dead_lettered._value.get() == 1
        assert sum(1 for r in sim.requests if r.status == 413) <= 2 * 9  # halvings: about log2(151) per level
