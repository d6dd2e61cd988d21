"""Dead letters: refused rows moved out of the outbox, listed, requeued with their ids and order, discarded.

The SQL functions run alone on a bare connection; `DeadLetters` runs over a real store and outbox
(a requeue must count its events back into the outbox and wake the forwarder); the JSON shape is
the API's (`listenerd.api.dead_letters.dead_letter_json`).
"""

import orjson

from listenerd.api.dead_letters import dead_letter_json
from tests.harness import Harness


async def shown(h, tenant_id):
    """A tenant's dead letters as the API answers them."""
    return [dead_letter_json(letter) for letter in await h.dead_letters.of_tenant(tenant_id)]


def ns(rows):
    return [orjson.loads(r.body)["event"]["n"] for r in rows]


async def test_dead_letters_listed_requeued_with_same_ids_and_discarded(tmp_path):
    async with Harness(tmp_path) as h:
        for n in range(4):
            await h.outbox.append("t", "L1" if n % 2 else "L2", "pusher", {"n": n}, key=str(n))
        await h.outbox.append("other", "L1", "pusher", {"n": 99})
        await h.outbox.flush()
        rows = await h.outbox.lease(4)
        await h.outbox.dead_letter(rows, 400, '{"error": "bad event"}')
        assert h.outbox.depth == 1
        letters = await shown(h, "t")
        assert [d["listener-id"] for d in letters] == ["L2", "L1"]  # one per listener, first seen first
        first = letters[0]
        assert first["status-code"] == 400 and first["response"] == '{"error": "bad event"}'
        assert first["failed-at"].endswith("Z")
        assert [e["event"]["n"] for e in first["events"]] == [0, 2]
        assert await shown(h, "other") == []
        assert await h.dead_letters.requeue("other", int(first["id"])) is None  # tenant-scoped

        assert await h.dead_letters.requeue("t", int(first["id"])) == 2
        queued = await h.events("t", "L2")
        assert [e["id"] for e in queued] == [e["id"] for e in first["events"]]
        assert queued[0]["received-at"] == first["events"][0]["received-at"]
        assert h.outbox.depth == 3
        assert [d["id"] for d in await shown(h, "t")] == [letters[1]["id"]]

        assert await h.dead_letters.discard("t", int(letters[1]["id"]))
        assert not await h.dead_letters.discard("t", int(letters[1]["id"]))
        assert await shown(h, "t") == []


async def test_dead_letter_of_part_of_a_segment_and_requeue_with_the_same_ids(tmp_path):
    async with Harness(tmp_path) as h:
        for n in range(6):
            await h.outbox.append("t", "L", "pusher", {"n": n})
        await h.outbox.flush()
        rows = await h.outbox.lease(6)
        await h.outbox.dead_letter(rows[2:4], 400, "no")
        assert ns(await h.outbox.lease(100)) == [0, 1, 4, 5]
        letter, = await shown(h, "t")
        assert [e["event"]["n"] for e in letter["events"]] == [2, 3]
        assert await h.dead_letters.requeue("t", int(letter["id"])) == 2
        again = await h.outbox.lease(100)
        assert ns(again) == [0, 1, 4, 5, 2, 3]
        assert [orjson.loads(r.body)["id"] for r in again[4:]] == [orjson.loads(r.body)["id"] for r in rows[2:4]]
        assert h.outbox.depth == 6 and h.outbox.size_bytes == sum(len(r.body) for r in again)
