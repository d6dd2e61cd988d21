"""Delivery end to end over loopback: supervisor + scripted sources -> outbox -> forwarder -> engine sim.

The issue's required cases: an engine outage (503 then 200), Retry-After, a refused batch (400) in
the dead-letter table and the API while later events flow, and the outbox at its bound pausing the
source with a truthful status. The kill -9 case is in test_delivery_crash.py.
"""

import asyncio
import tracemalloc

import aiohttp

from listenerd.daemon import Daemon
from listenerd.delivery.forwarder import Forwarder
from listenerd.model import Config
from listenerd.sim.engine import Answer, EngineSim
from listenerd.status import PAUSED
from tests.harness import Harness, desired, integration, listener, wait_for

CREDS = integration("pusher", key="k", secret="s3cr3t-value")


def numbered_source(total, pace=0.0):
    """A source that emits {"n": 0..total-1} and then idles, like a live stream."""

    async def run(ctx):
        ctx.started(f"Subscribed to channel: {ctx.listener.options.channel}")
        for n in range(total):
            await ctx.emit({"n": n, "who": ctx.listener_id}, key=f"{ctx.listener_id}-{n}")
            if pace:
                await asyncio.sleep(pace)
        await asyncio.Event().wait()

    return run


def config(tmp_path, url, **engine):
    return Config.model_validate({
        "store": {"path": str(tmp_path / "test.db")},
        "engine": {"url": url, "retry-initial": 0.05, "retry-max": 0.3, "linger-ms": 5, **engine},
    })


class Pipeline:
    """The daemon's delivery path without its API: real store, outbox, supervisor, forwarder, engine sim."""

    def __init__(self, tmp_path, sim, listeners=("A", "B"), outbox_bounds=None, **engine):
        self.sim = sim
        self.cfg = config(tmp_path, sim.url, **engine)
        self.h = Harness(tmp_path, self.cfg, **(outbox_bounds or {}))
        self.listeners = listeners

    async def __aenter__(self):
        await self.h.__aenter__()
        self.sup = self.h.supervisor()
        self.fw = Forwarder(self.cfg.engine, self.h.outbox, self.h.metrics, self.sup.forwarded)
        await self.fw.start()
        await self.sup.start({("t", lid): desired(listener(id=lid, type="pusher", options={"channel": lid}), CREDS)
                              for lid in self.listeners})
        return self

    async def __aexit__(self, *exc):
        await self.sup.stop()
        await self.h.outbox.close()
        await self.fw.stop(1.0)
        await self.h.__aexit__(*exc)

    def record(self, lid):
        return self.sup.status(("t", lid))


async def sim_started(**kwargs):
    sim = EngineSim(**kwargs)
    await sim.start()
    return sim


async def test_engine_outage_then_recovery_delivers_everything_in_order(tmp_path, scripted_source):
    sim = await sim_started()
    sim.fail_next(8, 503)
    scripted_source("pusher", numbered_source(300, pace=0.001))
    try:
        async with Pipeline(tmp_path, sim, **{"batch-max": 50}) as p:
            await wait_for(lambda: sim.scripted_left == 0, what="the outage to be retried through")
            assert sim.received == []  # nothing accepted while the engine answered 503
            await wait_for(lambda: len(sim.received) >= 600, timeout=20, what="all events delivered")
            for lid in ("A", "B"):
                numbers = [e["event"]["n"] for e in sim.events(lid)]
                assert numbers == list(range(300)), f"{lid} out of order or incomplete"
            assert len(set(sim.ids())) == 600
            await wait_for(lambda: p.record("A").forwarded == 300 and p.record("B").forwarded == 300,
                           what="forwarded counts")
            assert p.h.metrics.retried.labels("HTTP 503")._value.get() == 8
            assert p.h.outbox.depth == 0
    finally:
        await sim.stop()


async def test_retry_after_is_honoured(tmp_path, scripted_source):
    sim = await sim_started()
    sim.script([Answer(429, {"Retry-After": "2"}, {"error": "slow down"})])
    scripted_source("pusher", numbered_source(5))
    try:
        async with Pipeline(tmp_path, sim, listeners=("A",), **{"linger-ms": 50}):
            await wait_for(lambda: len(sim.received) == 5, what="delivered after the pause")
            first, second = sim.requests[0], sim.requests[1]
            assert first.status == 429 and second.status == 200
            assert second.at - first.at >= 1.99, f"retried after {second.at - first.at:.3f}s"
            assert second.at - first.at < 6  # and not forgotten
            assert [e["id"] for e in second.envelopes] == [e["id"] for e in first.envelopes]
    finally:
        await sim.stop()


async def test_refused_batch_is_dead_lettered_listed_by_the_api_and_later_events_flow(tmp_path, scripted_source):
    sim = await sim_started()
    sim.script([Answer(400, {}, {"error": "event.username: required"})])
    gate = asyncio.Event()

    async def run(ctx):
        ctx.started("Subscribed to channel: A")
        for n in range(3):
            await ctx.emit({"n": n}, key=str(n))
        await gate.wait()  # later events only after the refusal
        for n in range(3, 10):
            await ctx.emit({"n": n}, key=str(n))
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    cfg = Config.model_validate({
        "server": {"listen": "127.0.0.1:0", "tokens": [{"name": "ops", "token": "api-token-123"}]},
        "engine": {"url": sim.url, "retry-initial": 0.05, "linger-ms": 20},
        "store": {"path": str(tmp_path / "d.db")},
        "supervisor": {"stop-timeout": 2},
        "tenants": [{"id": "t", "name": "T", "integrations": {"pusher": {"key": "k", "secret": "s3cr3t-value"}},
                     "listeners": [{"id": "A", "name": "a", "type": "pusher", "options": {"channel": "A"}}]}],
    })
    daemon = Daemon(cfg)
    await daemon.start()
    try:
        await wait_for(lambda: daemon.metrics.dead_lettered._value.get() == 3, what="a dead letter")
        gate.set()
        await wait_for(lambda: len(sim.received) == 7, what="later events delivered")
        assert [e["event"]["n"] for e in sim.received] == list(range(3, 10))
        headers = {"Authorization": "Bearer api-token-123"}
        base = f"{daemon.api_url}/1.0/tenants/t/dead-letters"
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.get(base) as response:
                assert response.status == 200
                letters = await response.json()
            assert len(letters) == 1
            letter = letters[0]
            assert set(letter) == {"id", "listener-id", "status-code", "response", "failed-at", "events"}
            assert letter["listener-id"] == "A" and letter["status-code"] == 400
            assert "event.username: required" in letter["response"]
            assert [e["event"]["n"] for e in letter["events"]] == [0, 1, 2]
            refused_ids = [e["id"] for e in letter["events"]]

            async with http.post(f"{base}/999/retry") as response:
                assert response.status == 404 and "error" in await response.json()
            async with http.post(f"{base}/{letter['id']}/retry") as response:
                assert response.status == 202
            await wait_for(lambda: len(sim.received) == 10, what="the retried batch delivered")
            assert [e["id"] for e in sim.received[7:]] == refused_ids  # same ids on retry
            async with http.get(base) as response:
                assert await response.json() == []

            sim.script([Answer(400, {}, "nope")])
            await daemon.outbox.append("t", "A", "pusher", {"n": 10})
            await wait_for(lambda: daemon.metrics.dead_lettered._value.get() == 4, what="second dead letter")
            async with http.get(base) as response:
                (second,) = await response.json()
            async with http.delete(f"{base}/{second['id']}") as response:
                assert response.status == 204
            async with http.delete(f"{base}/{second['id']}") as response:
                assert response.status == 404
            async with http.get(base, headers={"Authorization": "Bearer wrong-token"}) as response:
                assert response.status == 401
    finally:
        await daemon.stop()
        await sim.stop()


async def test_full_outbox_pauses_the_source_truthfully_and_resumes_when_the_engine_drains(tmp_path,
                                                                                          scripted_source):
    sim = await sim_started()
    await sim.refuse()  # engine down: nothing drains
    emitted = []

    async def run(ctx):
        ctx.started("Subscribed to channel: A")
        for n in range(2000):
            await ctx.emit({"n": n, "pad": "x" * 100}, key=str(n))
            emitted.append(n)
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    try:
        async with Pipeline(tmp_path, sim, listeners=("A",), outbox_bounds={"max_events": 200},
                            **{"batch-max": 100}) as p:
            record = p.record("A")
            await wait_for(lambda: record.message.endswith(PAUSED), what="paused status")
            assert record.status == "started"
            await p.h.outbox.flush()
            assert p.h.outbox.depth == 200 and len(emitted) == 200
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
            await wait_for(lambda: p.fw.attempt >= 3, what="retries while paused")
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            assert len(emitted) == 200 and p.h.outbox.depth == 200  # nothing read, nothing dropped
            assert grown < 512 * 1024, f"memory grew by {grown} bytes while paused"
            assert p.h.metrics.backpressure._value.get() >= 1

            await sim.accept()
            await wait_for(lambda: len(sim.received) == 2000, timeout=20, what="everything delivered")
            assert [e["event"]["n"] for e in sim.received] == list(range(2000))
            await wait_for(lambda: not record.message.endswith(PAUSED), what="pause note cleared")
            assert record.message == "Subscribed to channel: A"
    finally:
        await sim.stop()
