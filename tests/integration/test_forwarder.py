"""The forwarder against the engine simulator over loopback: batching, auth, outcomes, stop."""

import asyncio
import time

from listenerd.delivery.forwarder import Forwarder
from listenerd.model import Engine
from listenerd.sim.engine import Answer, EngineSim
from tests.harness import Harness, wait_for
from tests.tls import self_signed


def engine_config(url, **extra):
    return Engine.model_validate({"url": url, "retry-initial": 0.05, "retry-max": 0.2, "linger-ms": 5, **extra})


class Rig:
    """Harness + engine sim + forwarder, torn down in order."""

    def __init__(self, tmp_path, token=None, engine_token=None, **engine):
        self.h = Harness(tmp_path)
        self.sim = EngineSim(token=token)
        self.engine = engine
        self.engine_token = engine_token
        self.forwarded: dict[tuple[str, str], int] = {}

    async def __aenter__(self):
        await self.h.__aenter__()
        await self.sim.start()
        extra = dict(self.engine)
        if self.engine_token:
            extra["token"] = self.engine_token
        self.fw = Forwarder(engine_config(self.sim.url, **extra), self.h.outbox, self.h.metrics, self.count)
        await self.fw.start()
        return self

    def count(self, tenant, listener, n):
        self.forwarded[(tenant, listener)] = self.forwarded.get((tenant, listener), 0) + n

    async def __aexit__(self, *exc):
        await self.fw.stop(1.0)
        await self.sim.stop()
        await self.h.__aexit__(*exc)

    async def emit(self, n, listener="L", start=0):
        for i in range(start, start + n):
            await self.h.outbox.append("t", listener, "pusher", {"n": i}, key=f"{listener}-{i}")


async def test_delivers_in_batches_with_bearer_token_and_counts(tmp_path):
    async with Rig(tmp_path, token="engine-secret-1", engine_token="engine-secret-1", **{"batch-max": 50}) as r:
        await r.emit(120, "A")
        await r.emit(30, "B")
        await wait_for(lambda: len(r.sim.received) == 150, what="all delivered")
        assert [e["event"]["n"] for e in r.sim.events("A")] == list(range(120))
        assert all(len(req.envelopes) <= 50 for req in r.sim.requests)
        assert all(req.authorization == "Bearer engine-secret-1" for req in r.sim.requests)
        await wait_for(lambda: r.h.outbox.depth == 0, what="acked")
        assert r.forwarded == {("t", "A"): 120, ("t", "B"): 30}
        assert r.h.metrics.delivered._value.get() == 150
        assert r.h.metrics.engine_latency._sum.get() > 0


async def test_linger_gathers_a_batch(tmp_path):
    async with Rig(tmp_path, **{"batch-max": 1000, "linger-ms": 200}) as r:
        for i in range(20):
            await r.h.outbox.append("t", "L", "pusher", {"n": i})
            await asyncio.sleep(0.002)
        await wait_for(lambda: len(r.sim.received) == 20, what="delivered")
        assert len(r.sim.requests) <= 2  # 20 events within the linger window: one request (two at most)


async def test_wrong_token_is_a_dead_letter_not_a_retry_loop(tmp_path):
    async with Rig(tmp_path, token="right-token", engine_token="wrong-token") as r:
        await r.emit(3)
        await wait_for(lambda: r.h.outbox.depth == 0, what="dead-lettered")
        letters = await r.h.dead_letters.of_tenant("t")
        assert len(letters) == 1 and letters[0].status_code == 401
        assert "invalid bearer token" in letters[0].response
        assert len(r.sim.requests) == 1 and r.sim.received == []
        assert r.h.metrics.dead_lettered._value.get() == 3


async def test_refused_connections_are_retried_until_the_engine_listens(tmp_path):
    async with Rig(tmp_path) as r:
        await r.sim.refuse()
        await r.emit(10)
        await wait_for(lambda: r.fw.attempt >= 2, what="network retries")
        assert r.h.metrics.retried.labels("network")._value.get() >= 2  # the kind is the label, from net.kind_of
        assert r.fw.last_error.startswith("POST to the engine failed: ") and "Cannot connect" in r.fw.last_error
        assert r.h.outbox.depth == 10
        await r.sim.accept()
        await wait_for(lambda: len(r.sim.received) == 10, what="delivered after accept")


async def test_timeout_is_retried_with_the_same_ids(tmp_path):
    async with Rig(tmp_path, timeout=0.2) as r:
        r.sim.delay = 0.5
        await r.emit(5)
        await wait_for(lambda: r.fw.attempt >= 1, what="a timeout")
        assert r.h.metrics.retried.labels("timeout")._value.get() >= 1
        assert r.fw.last_error == "POST to the engine failed: timed out"
        r.sim.delay = 0
        await wait_for(lambda: len(r.sim.received) >= 5, what="delivered")
        # the slow requests may have been processed by the engine too: same ids, so it can de-duplicate
        assert set(r.sim.ids()) == {e["id"] for e in r.sim.received[:5]}
        assert [e["event"]["n"] for e in r.sim.received[-5:]] == list(range(5))


async def test_stop_flushes_within_the_bound_and_leaves_the_rest_durable(tmp_path):
    async with Rig(tmp_path) as r:
        await r.emit(20)
        await wait_for(lambda: len(r.sim.received) == 20, what="delivered")
        r.sim.fail_next(1000, 503)
        await r.emit(5, start=20)
        await wait_for(lambda: r.fw.attempt >= 1, what="a retry")
        started = time.monotonic()
        await r.fw.stop(0.3)
        assert time.monotonic() - started < 3
        assert r.h.outbox.depth == 5  # undelivered, still durable
        assert [e["event"]["n"] for e in await r.h.events()] == list(range(20, 25))


async def test_stop_delivers_what_is_waiting_when_the_engine_answers(tmp_path):
    async with Rig(tmp_path, **{"linger-ms": 10_000, "batch-max": 10_000}) as r:
        await r.emit(50)
        await r.h.outbox.flush()
        await r.fw.stop(5.0)  # stop cuts the linger short and sends
        assert len(r.sim.received) == 50 and r.h.outbox.depth == 0


async def test_engine_sim_answers_a_scripted_body_and_headers(tmp_path):
    async with Rig(tmp_path) as r:
        r.sim.script([Answer(422, {"X-Why": "schema"}, "event.username: required")])
        await r.emit(2)
        await wait_for(lambda: r.h.outbox.depth == 0, what="dead-lettered")
        letter, = await r.h.dead_letters.of_tenant("t")
        assert letter.status_code == 422 and letter.response == "event.username: required"


async def test_a_failed_ack_is_retried_never_sent_again_and_ids_stay_the_same(tmp_path):
    async with Rig(tmp_path, **{"batch-max": 5}) as r:
        store = r.h.store
        await store.run(lambda c: c.execute("CREATE TABLE block (x)"))
        await store.run(lambda c: c.execute("INSERT INTO block VALUES (1)"))
        for change in ("DELETE", "UPDATE"):  # an ack deletes a delivered segment or moves past its head
            await store.run(lambda c, change=change: c.execute(
                f"CREATE TRIGGER keep_{change} BEFORE {change} ON outbox_segments WHEN EXISTS (SELECT 1 FROM block) "
                "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"))
        await r.emit(12)
        acks_failed = r.h.metrics.store_errors.labels("ack")
        await wait_for(lambda: acks_failed._value.get() >= 3, what="the failed ack retried")
        # the engine has the first batch and the one sent while its ack ran: nothing more goes, nothing twice
        assert len(r.sim.requests) == 2 and len(r.sim.ids()) == len(set(r.sim.ids())) == 10
        assert r.h.outbox.depth == 12  # nothing acked, nothing lost
        await store.run(lambda c: c.execute("DELETE FROM block"))
        await wait_for(lambda: r.h.outbox.depth == 0, what="acked once the store works")
        by_n = {}
        for e in r.sim.received:
            by_n.setdefault(e["event"]["n"], set()).add(e["id"])
        assert sorted(by_n) == list(range(12)) and all(len(ids) == 1 for ids in by_n.values())
        firsts = []
        for e in r.sim.received:
            if e["event"]["n"] not in firsts:
                firsts.append(e["event"]["n"])
        assert firsts == list(range(12))
        assert r.forwarded == {("t", "L"): 12}




async def test_tls_is_verified_with_the_configured_ca_bundle_and_refused_without(tmp_path):
    server_ctx, ca_bundle = self_signed(tmp_path)
    sim = EngineSim(ssl_context=server_ctx)
    await sim.start()
    try:
        assert sim.url.startswith("https://")
        async with Harness(tmp_path) as h:
            untrusted = Forwarder(engine_config(sim.url), h.outbox, h.metrics)
            await untrusted.start()
            await h.outbox.append("t", "L", "pusher", {"n": 1})
            await wait_for(lambda: untrusted.attempt >= 1, what="a refused TLS handshake")
            assert "certificate" in untrusted.last_error.lower() and sim.requests == []
            await untrusted.stop(0.1)
            trusted = Forwarder(engine_config(sim.url, **{"ca-bundle": ca_bundle}), h.outbox, h.metrics)
            await trusted.start()
            await wait_for(lambda: len(sim.received) == 1, what="delivery over verified TLS")
            await trusted.stop(1.0)
    finally:
        await sim.stop()


async def test_a_redirect_is_retried_never_followed_so_nothing_is_acked_unseen(tmp_path):
    async with Rig(tmp_path) as r:
        r.sim.script([Answer(301, {"Location": r.sim.url + "/elsewhere"}, {}),
                      Answer(302, {"Location": "/elsewhere"}, {})])
        await r.emit(5)
        await wait_for(lambda: len(r.sim.received) == 5, what="delivered after the redirects")
        assert [e["event"]["n"] for e in r.sim.received] == [0, 1, 2, 3, 4]
        assert len(r.sim.requests) == 3 and all(len(req.envelopes) == 5 for req in r.sim.requests)
        assert await r.h.dead_letters.of_tenant("t") == []


async def test_retry_after_zero_is_not_a_tight_loop(tmp_path):
    async with Rig(tmp_path, **{"retry-initial": 0.3}) as r:
        r.sim.script([Answer(503, {"Retry-After": "0"}, {})])
        started = time.monotonic()
        await r.emit(1)
        await wait_for(lambda: len(r.sim.received) == 1, what="delivered")
        assert time.monotonic() - started >= 0.3  # the floor is engine.retry-initial


async def test_a_group_taken_while_a_batch_is_out_has_its_backlog_sent_next(tmp_path):
    """A cluster node takes a group (its backlog has lower seqs) while a batch is at the engine: the backlog
    goes in the next batch, before the node's newer events, not stranded below the cursor."""
    async with Rig(tmp_path, **{"batch-max": 20}) as r:
        held = {"H"}
        r.h.outbox.keep = lambda tenant, listener: listener in held  # what cluster.Cluster.keeps answers
        await r.emit(3, "G")  # the old owner's events: not this node's group yet
        await r.h.outbox.flush()
        r.sim.silence()
        await r.emit(5, "H")
        await wait_for(lambda: r.fw.in_flight == 5, what="H's batch at the engine")
        held.add("G")
        r.fw.rewind()  # what the cluster does on taking G
        r.sim.silence(False)
        await r.emit(2, "H", start=5)
        await wait_for(lambda: r.h.outbox.depth == 0, what="G's backlog and H's events delivered")
        order = [(e["listener-id"], e["event"]["n"]) for e in r.sim.received]
        assert [n for lid, n in order if lid == "G"] == [0, 1, 2]
        assert [n for lid, n in order if lid == "H"] == list(range(7))
        assert order.index(("G", 0)) < order.index(("H", 5)), order  # and none sent twice
