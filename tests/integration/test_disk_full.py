"""A real full disk under the whole daemon: the store on a small tmpfs filled by a filler file.

While the disk is full: nothing committed is lost, nothing is sent twice, memory stays bounded (sources
pause), and every place an operator looks says so (statuses, /readyz, the metric, API writes 503 with
Retry-After); once space returns the daemon recovers by itself. The unit-level twins, with an injected
SQLITE_FULL, are in tests/unit/test_store_faults.py.
"""

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from listenerd import config as config_module
from listenerd.daemon import Daemon
from listenerd.delivery import outbox as outbox_module
from listenerd.sim.engine import EngineSim
from listenerd.systemd import Notifier
from tests.daemon import Api, base_config
from tests.harness import outbox_envelopes, wait_for

FULL = "database or disk is full"
TENANT = """
[[tenants]]
id = "t1"

[tenants.integrations.pusher]
key = "app-key"
secret = "pusher-secret-of-disk-full-tests"

[[tenants.listeners]]
id = "CFG1"
type = "pusher"
options = { channel = "cfg" }
mapping = { n = "n", pad = "pad" }
"""


async def padded_source(ctx):
    """Subscribes, then emits {"n": i, "pad": 1 KiB} every 2 ms (so a full disk shows within seconds)."""
    ctx.started(f"Subscribed to channel: {ctx.listener.options.channel}")
    n = 0
    while True:
        await ctx.emit({"n": n, "pad": "x" * 1024})
        n += 1
        await asyncio.sleep(0.002)


@pytest.fixture
async def rig(tmp_path, small_disk, scripted_source, monkeypatch):
    """(daemon, api, engine, disk): the daemon in-process, its store on the small disk; stopped at teardown."""
    monkeypatch.setattr(outbox_module, "UNCOMMITTED_MAX_BYTES", 256 * 1024)  # the memory bound, small to see it
    scripted_source("pusher", padded_source)
    async with EngineSim() as engine:
        path = tmp_path / "listenerd.toml"
        path.write_text(base_config(small_disk.path, engine.url, TENANT))
        daemon = Daemon(config_module.load(path, {}), str(path), notifier=Notifier(None))
        await daemon.start()
        api = Api(daemon.api_url)
        try:
            yield daemon, api, engine, small_disk
        finally:
            small_disk.unfill()
            await api.close()
            if daemon.ready:
                await daemon.stop()


def store_errors(daemon, op):
    return daemon.metrics.store_errors.labels(op)._value.get()


async def test_a_full_disk_is_said_everywhere_loses_nothing_sends_nothing_twice_and_recovers(rig):
    daemon, api, engine, disk = rig
    await api.wait_status("t1", "CFG1", "started")
    await wait_for(lambda: len(engine.received) > 50, what="events delivered")
    await engine.refuse()  # the engine goes down: the outbox must grow, so commits need new space
    disk.fill()
    await wait_for(lambda: store_errors(daemon, "commit") >= 1, what="a failed commit")

    status = await api.status("t1", "CFG1")
    assert status["status"] == "started" and f"store failing: {FULL}" in status["message"]
    assert status["last-error"] == f"store failing: {FULL}"
    code, ready = await api.call("GET", "/readyz", token=False)
    assert code == 503 and ready["store"] is False and FULL in ready["reason"]
    _, metrics = await api.call("GET", "/metrics", token=False)
    assert 'listenerd_store_errors_total{op="commit"}' in metrics
    assert daemon.status_line().endswith(f"; store failing: {FULL}")  # systemd's STATUS= line
    async with api.session.post(api.base_url + "/1.0/tenants/t1/listeners", headers={
            "Authorization": f"Bearer {api.token}"}, json={"type": "pusher", "options": {"channel": "x"}}) as answer:
        assert answer.status == 503 and answer.headers["Retry-After"] == "5"
        assert FULL in (await answer.json())["error"]

    async def paused():
        return "(paused: store failing" in (await api.status("t1", "CFG1"))["message"]
    await wait_for(paused, what="the source paused at the memory bound")
    held = daemon.outbox._queued_bytes
    assert held <= 256 * 1024
    await asyncio.sleep(0.5)
    assert daemon.outbox._queued_bytes == held  # not one more event read off the source

    await engine.accept()  # the engine is back while the disk is still full
    await asyncio.sleep(1.0)
    assert len(engine.ids()) == len(set(engine.ids()))  # nothing sent twice while full

    disk.unfill()
    await wait_for(lambda: not daemon.outbox.health.failing, what="the store recovered", timeout=15)
    code, _ = await api.call("GET", "/readyz", token=False)
    assert code == 200
    await wait_for(lambda: daemon.outbox.depth < 100 and len(engine.received) > 1000, what="the backlog delivered",
                   timeout=20)
    status = await api.status("t1", "CFG1")
    assert status["message"] == "Subscribed to channel: cfg"
    numbers = {e["event"]["n"] for e in engine.received}
    assert numbers == set(range(max(numbers) + 1))  # every event the source handed over reached the engine


async def test_stopping_while_the_disk_is_full_says_what_memory_held_and_what_the_store_holds(rig):
    daemon, api, engine, disk = rig
    await api.wait_status("t1", "CFG1", "started")
    await engine.refuse()
    disk.fill()

    async def paused():
        return "(paused: store failing" in (await api.status("t1", "CFG1"))["message"]
    await wait_for(paused, what="the source paused at the memory bound")
    with capture_logs() as logs:
        await daemon.stop()
    stopped, = [e for e in logs if e["event"] == "listenerd stopped"]
    assert stopped["log_level"] == "error" and stopped["never_written"] > 0
    disk.unfill()
    stored = outbox_envelopes(Path(daemon.config.store.path))
    assert stopped["undelivered"] == len(stored) > 0
