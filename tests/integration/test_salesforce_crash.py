"""kill -9 of the real daemon (`listenerd run --config`) while PushTopic events stream in.

The Salesforce simulator and the engine simulator run in the test process; the daemon is a child
process. The engine is slow, so the outbox holds a backlog at the kill. Salesforce keeps events for
replay and the replayId checkpoint is committed with the outbox, so after the restart *every* event
published reaches the engine (also those published while the daemon was dead), and each one under the
single id derived from (org, topic, replayId): no loss, no event under two ids.
"""

import asyncio
import contextlib

from listenerd.delivery.ids import event_id
from listenerd.sim.engine import EngineSim
from listenerd.sim.salesforce import ORG_ID, SalesforceSim
from tests.daemon import Api, DaemonProcess, base_config
from tests.harness import outbox_envelopes, wait_for

PASSWORD, TOKEN, SECRET = "crash-pass-4321", "CRASHTOKEN77", "crash-consumer-secret"


def tenants(url: str) -> str:
    return f"""
[[tenants]]
id = "t"

[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "{SECRET}"
username = "u@example.com"
password = "{PASSWORD}"
secret-token = "{TOKEN}"
login-url = "{url}"

[[tenants.listeners]]
id = "LS"
type = "salesforce"
options = {{ topic = "Invoices" }}
mapping = {{ name = "Name", replay = "$event.replayId" }}
"""


async def test_kill_9_mid_stream_no_event_lost_none_under_two_ids(tmp_path, started):
    engine = await started(EngineSim())
    engine.delay = 0.05
    sim = SalesforceSim(users={"u@example.com": PASSWORD + TOKEN}, clients={"ck": SECRET}, long_poll=0.5)
    sim.create_topic("Invoices", "SELECT Id, Name FROM Invoice__c")
    await started(sim)
    daemon = DaemonProcess(tmp_path, base_config(tmp_path, engine.url, tenants(sim.url)))
    published: list[int] = []

    async def publish() -> None:
        n = 0
        while True:
            published.append(sim.publish("Invoices", {"Id": f"a{n:06d}", "Name": f"INV-{n}"}))
            n += 1
            await asyncio.sleep(0.003)

    publisher: asyncio.Task | None = None
    try:
        api = Api(await daemon.start())
        try:
            await api.wait_status("t", "LS", "started")
        finally:
            await api.close()
        publisher = asyncio.create_task(publish())
        await wait_for(lambda: len(engine.received) >= 40, timeout=20, what="events delivered before the kill")
        daemon.kill9()
        waiting = outbox_envelopes(tmp_path / "listenerd.db")
        assert waiting, "no backlog at the kill; nothing was tested"
        print(f"at the kill: {len(engine.received)} delivered, {len(waiting)} waiting in the outbox")
        await wait_for(lambda: len(published) >= len(engine.received) + len(waiting) + 50,
                       what="events published while the daemon is dead")

        engine.delay = 0.0
        api = Api(await daemon.start())
        try:
            await api.wait_status("t", "LS", "started")
            await wait_for(lambda: len(published) > 0 and published[-1] - published[0] > 300, timeout=20,
                           what="more events after the restart")
        finally:
            await api.close()
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        expected = set(published)
        await wait_for(lambda: {e["event"]["replay"] for e in engine.received} >= expected, timeout=30,
                       what="every published event at the engine")
        assert await daemon.stop() == 0
    finally:
        if publisher is not None:
            publisher.cancel()
        if daemon.process and daemon.process.poll() is None:
            daemon.kill9()

    ids: dict[int, set[str]] = {}
    for envelope in engine.received:
        replay_id = envelope["event"]["replay"]
        assert envelope["id"] == event_id("t", "LS", f"{ORG_ID}/Invoices/{replay_id}")
        ids.setdefault(replay_id, set()).add(envelope["id"])
    assert set(ids) == set(published), "an event was lost or invented"
    assert all(len(v) == 1 for v in ids.values())
    assert sim.logins == 2
    log = daemon.log_text()
    assert PASSWORD not in log and SECRET not in log and TOKEN not in log
