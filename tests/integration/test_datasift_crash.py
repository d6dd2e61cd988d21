"""kill -9 of the real daemon (`listenerd run --config`) while DataSift interactions stream in.

The DataSift simulator and the engine simulator run in the test process; the daemon is a child
process. The engine is slow, so the outbox holds a backlog at the kill. After the restart every
event that was committed (already delivered, or waiting in the outbox on disk) reaches the engine,
each under the one id derived from its interaction id (deletes under an id of their own), and the
restarted daemon resubscribes and streams again. DataSift has no replay: interactions published
while the daemon is down are not expected (at least once from receipt, per CONTRACT section 4).
"""

import asyncio
import contextlib

from websockets.protocol import State

from listenerd.delivery.ids import event_id
from listenerd.sim.datasift import DataSiftSim
from listenerd.sim.engine import EngineSim
from tests.daemon import Api, DaemonProcess, base_config
from tests.harness import outbox_envelopes, wait_for

SECRET = "datasift-crash-key-9876"
HASHES = {"A": "4f3af38ad1c31646561bc814c3e69af5", "B": "0123456789abcdef0123456789abcdef"}


def tenants(url: str) -> str:
    listeners = "".join(f"""
[[tenants.listeners]]
id = "{lid}"
type = "datasift"
options = {{ hash = "{h}" }}
mapping = {{ iid = "interaction.id", user = "interaction.author.username", deleted = "$deleted", hash = "$hash" }}
""" for lid, h in HASHES.items())
    return f"""
[[tenants]]
id = "t"

[tenants.integrations.datasift]
username = "user"
api-key = "{SECRET}"
stream-url = "{url}"
{listeners}"""


def subscribed_live(sim: DataSiftSim) -> set[str]:
    return {h for c in sim.connections if c.ws.state is State.OPEN for h in c.hashes}


def source_key(envelope: dict) -> str:
    event = envelope["event"]
    return f"deleted:{event['iid']}" if event["deleted"] else event["iid"]


async def test_kill_9_mid_stream_every_committed_event_reaches_the_engine_with_a_stable_id(tmp_path, started):
    engine = await started(EngineSim())
    engine.delay = 0.05  # a slow engine: a backlog waits in the outbox when the kill comes
    sim = await started(DataSiftSim(users={"user": SECRET}, tick_interval=0.5))
    daemon = DaemonProcess(tmp_path, base_config(tmp_path, engine.url, tenants(sim.url)))
    published: dict[str, set[str]] = {lid: set() for lid in HASHES}

    async def publish() -> None:
        n = 0
        while True:
            for lid, h in HASHES.items():
                data = await sim.interaction(h)
                published[lid].add(data["interaction"]["id"])
                if n % 5 == 0:
                    await sim.delete(h, data["interaction"]["id"])
                    published[lid].add("deleted:" + data["interaction"]["id"])
            n += 1
            await asyncio.sleep(0.003)

    publisher: asyncio.Task | None = None
    try:
        api = Api(await daemon.start())
        try:
            for lid in HASHES:
                await api.wait_status("t", lid, "started")
        finally:
            await api.close()
        publisher = asyncio.create_task(publish())
        await wait_for(lambda: len(engine.received) >= 40, timeout=20, what="events delivered before the kill")
        daemon.kill9()
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        before = list(engine.received)
        waiting = outbox_envelopes(tmp_path / "listenerd.db")
        assert waiting, "no backlog at the kill; nothing was tested"
        committed = {e["id"]: e for e in before + waiting}
        print(f"at the kill: {len(before)} delivered, {len(waiting)} waiting in the outbox")

        engine.delay = 0.0
        api = Api(await daemon.start())
        try:
            await wait_for(lambda: set(engine.ids()) >= set(committed), timeout=30,
                           what="every committed event delivered after the restart")
            for lid in HASHES:
                await api.wait_status("t", lid, "started")
            await wait_for(lambda: subscribed_live(sim) >= set(HASHES.values()), what="resubscribed after restart")
            fresh = await sim.interaction(HASHES["A"], username="after_restart")
            await wait_for(lambda: any(e["event"]["iid"] == fresh["interaction"]["id"] for e in engine.received),
                           what="streaming again after the restart")
        finally:
            await api.close()
        assert await daemon.stop() == 0
    finally:
        if publisher is not None:
            publisher.cancel()
        if daemon.process and daemon.process.poll() is None:
            daemon.kill9()

    ids_per_event: dict[tuple[str, str], set[str]] = {}
    for envelope in engine.received:
        lid = envelope["listener-id"]
        key = source_key(envelope)
        assert envelope["event"]["hash"] == HASHES[lid]
        assert key in published[lid] or envelope["event"]["user"] == "after_restart"
        assert envelope["id"] == event_id("t", lid, key), "the id derives from the interaction id"
        ids_per_event.setdefault((lid, key), set()).add(envelope["id"])
    assert all(len(ids) == 1 for ids in ids_per_event.values()), "one event delivered under two ids"
    deletes = [k for _, k in ids_per_event if k.startswith("deleted:")]
    assert deletes and all(ids_per_event[(lid, k.removeprefix("deleted:"))] != ids_per_event[(lid, k)]
                           for lid, k in ids_per_event if k.startswith("deleted:")
                           and (lid, k.removeprefix("deleted:")) in ids_per_event)
    assert SECRET not in daemon.log_text()
