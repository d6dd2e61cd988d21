"""A store that cannot write (an injected SQLITE_FULL) and a wall clock that steps: the outbox, the forwarder
and the statuses keep the promise (nothing lost, nothing sent twice, memory bounded) and say what happens.

The same with a real full disk (a tmpfs) and the whole daemon is tests/integration/test_disk_full.py.
"""

import asyncio
import sqlite3
import time
from datetime import datetime

import orjson
from structlog.testing import capture_logs

from listenerd.delivery import outbox as outbox_module
from listenerd.delivery import segments
from listenerd.delivery.forwarder import Forwarder
from listenerd.model import Config, Engine
from listenerd.testing import InjectedDiskFull
from tests.harness import Harness, desired, integration, listener, wait_for

FULL = "database or disk is full"
CREDS = integration("pusher", key="k", secret="s3cr3t-value")


class FakeEngine:
    """The engine's answer without HTTP (unit tests open no socket): accepts every batch and remembers it."""

    def __init__(self):
        self.batches: list[list[str]] = []

    async def post(self, body):
        self.batches.append([e["id"] for e in orjson.loads(body)])
        return None

    def ids(self):
        return [i for batch in self.batches for i in batch]


def forwarder(h, engine, **settings):
    fw = Forwarder(Engine.model_validate({"url": "http://engine.invalid/", "retry-initial": 0.05, "retry-max": 0.2,
                                          "linger-ms": 5, **settings}), h.outbox, h.metrics)
    fw._post = engine.post
    return fw


def store_failing_lines(logs):
    return [e for e in logs if e["event"].startswith("store failing")]


async def append(h, numbers, listener_id="L", **extra):
    for n in numbers:
        await h.outbox.append("t", listener_id, "pusher", {"n": n}, key=f"{listener_id}-{n}", **extra)


# -- commits


async def test_while_commits_fail_appends_pause_at_the_uncommitted_bound_and_all_commit_after(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "UNCOMMITTED_MAX_BYTES", 20_000)
    async with Harness(tmp_path) as h:
        disk = InjectedDiskFull.install(h.store)
        disk.full = True
        waits: list[bool] = []
        appended = 0

        async def source():
            nonlocal appended
            for n in range(1000):
                await h.outbox.append("t", "L", "pusher", {"n": n, "pad": "x" * 100}, on_wait=waits.append)
                appended += 1
                await asyncio.sleep(0)  # as a socket read would: the writer gets its turn

        with capture_logs() as logs:
            task = asyncio.create_task(source())
            try:
                await wait_for(lambda: waits == [True], what="the source paused")
                held = appended
                await asyncio.sleep(0.3)
                assert appended == held and 19_000 < h.outbox._queued_bytes <= 20_000  # bounded in bytes
                assert h.outbox.health.failing and h.outbox.health.problem == FULL
                assert h.metrics.store_errors.labels("commit")._value.get() >= 2
                assert h.metrics.backpressure._value.get() == 1
            finally:
                disk.full = False
            await asyncio.wait_for(task, 10)
            await h.outbox.flush()
        assert waits[:2] == [True, False] and waits[-1] is False  # (the small bound may hold it again after)
        assert [e["event"]["n"] for e in await h.events()] == list(range(1000))  # nothing lost, in order
        assert len(store_failing_lines(logs)) == 1 and not any("exc_info" in e for e in logs)
        assert [e["event"] for e in logs if e["event"] == "store recovered"] == ["store recovered"]
        assert not h.outbox.health.failing


async def test_shutdown_while_full_reports_what_memory_held_and_keeps_depth_true(tmp_path):
    async with Harness(tmp_path) as h:
        disk = InjectedDiskFull.install(h.store)
        await append(h, range(5))
        await h.outbox.flush()
        disk.full = True
        await append(h, range(5, 12))
        await wait_for(lambda: h.outbox.commit_failures >= 1, what="a failed commit")
        with capture_logs() as logs:
            await h.outbox.close(timeout=0.3)
        assert h.outbox.never_written == 7
        assert h.outbox.depth == 5  # what the store holds, not what memory held
        line, = [e for e in logs if e["event"].startswith("the store could not commit before shutdown")]
        assert line["events"] == 7 and line["error"] == FULL
        disk.full = False
        assert [e["event"]["n"] for e in await h.events()] == list(range(5))


# -- statuses


async def test_every_listener_says_the_store_fails_and_a_busy_one_pauses(tmp_path, scripted_source, monkeypatch):
    monkeypatch.setattr(outbox_module, "UNCOMMITTED_MAX_BYTES", 5_000)

    async def run(ctx):
        ctx.started(f"Subscribed to channel: {ctx.listener.options.channel}")
        n = 0
        while True:
            if ctx.listener_id == "busy":
                await ctx.emit({"n": n})
                n += 1
            await asyncio.sleep(0.002)

    scripted_source("pusher", run)
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")}})

    def spec(lid):
        return listener(id=lid, type="pusher", options={"channel": lid})

    async with Harness(tmp_path, config) as h:
        disk = InjectedDiskFull.install(h.store)
        sup = h.supervisor()
        wanted = {("t", "busy"): desired(spec("busy"), CREDS), ("t", "idle"): desired(spec("idle"), CREDS)}
        await sup.start(wanted)
        busy, idle = sup.status(("t", "busy")), sup.status(("t", "idle"))
        await wait_for(lambda: idle.status == "started" and busy.received > 0, what="both started")
        disk.full = True
        try:
            await wait_for(lambda: f"(paused: store failing: {FULL};" in busy.message, what="busy paused")
            assert busy.status == "started" and busy.last_error == f"store failing: {FULL}"
            assert idle.status == "started" and idle.message == (
                f"Subscribed to channel: idle (store failing: {FULL}; new events wait in memory until it writes again)")
            received = busy.received
            await asyncio.sleep(0.2)
            assert busy.received == received and h.outbox._queued_bytes <= 5_000  # nothing counts as received
            await sup.reconcile({**wanted, ("t", "late"): desired(spec("late"), CREDS)})  # added during the episode
            late = sup.status(("t", "late"))
            await wait_for(lambda: late.status == "started", what="late started")
            assert f"(store failing: {FULL};" in late.message
        finally:
            disk.full = False
        await wait_for(lambda: (busy.message, idle.message, late.message) == (
            "Subscribed to channel: busy", "Subscribed to channel: idle", "Subscribed to channel: late"),
            what="the notes gone")
        await wait_for(lambda: busy.received > received, what="commits again")
        assert not h.outbox.health.failing


# -- acks and leases


async def test_a_failed_ack_backs_off_and_nothing_is_sent_again_while_the_store_is_full(tmp_path):
    async with Harness(tmp_path) as h:
        disk = InjectedDiskFull.install(h.store)
        engine = FakeEngine()
        fw = forwarder(h, engine, **{"batch-max": 10})
        await append(h, range(30))
        await h.outbox.flush()
        disk.full = True
        failed_acks = h.metrics.store_errors.labels("ack")
        with capture_logs() as logs:
            await fw.start()
            try:
                await wait_for(lambda: failed_acks._value.get() >= 4, what="the ack retried")
                # the engine has the first batch and the one sent while its ack ran: nothing goes again
                assert len(engine.batches) == 2 and len(set(engine.ids())) == 20
                before = failed_acks._value.get()
                await asyncio.sleep(0.6)
                assert len(engine.batches) == 2
                # retry-initial 0.05 doubling to retry-max 0.2, jitter 20%: past the 4th retry, >= 0.16 s apart
                assert failed_acks._value.get() - before <= 4
                assert h.outbox.depth == 30 and fw.last_error.startswith("store:")
            finally:
                disk.full = False
            await wait_for(lambda: h.outbox.depth == 0, what="all acked")
            await fw.stop(1.0)
        assert len(engine.ids()) == len(set(engine.ids())) == 30  # each event once: no duplicate at all
        assert h.metrics.delivered._value.get() == 30
        assert not any("exc_info" in e for e in logs)
        assert len(store_failing_lines(logs)) == 1
        assert len([e for e in logs if e["event"].startswith("the store cannot record the engine's ack")]) == 1


async def test_a_failing_lease_backs_off_and_delivery_goes_on_after(tmp_path, monkeypatch):
    broken = True
    lease = segments.lease

    def failing_lease(conn, limit, after, damaged=None, verified=None):
        if broken:
            raise sqlite3.OperationalError("disk I/O error")
        return lease(conn, limit, after, damaged, verified)

    monkeypatch.setattr(segments, "lease", failing_lease)
    async with Harness(tmp_path) as h:
        engine = FakeEngine()
        fw = forwarder(h, engine)
        await append(h, range(3))
        await h.outbox.flush()
        with capture_logs() as logs:
            await fw.start()
            await wait_for(lambda: h.metrics.store_errors.labels("lease")._value.get() >= 3, what="leases retried")
            assert fw._task is not None and not fw._task.done()  # the forwarder lives on
            assert h.outbox.health.problem == "disk I/O error"
            broken = False
            await wait_for(lambda: h.outbox.depth == 0, what="delivered once the store reads again")
            await fw.stop(1.0)
        assert len(engine.ids()) == 3 and not any("exc_info" in e for e in logs)
        assert not h.outbox.health.failing


# -- clocks


def wall(stamp):
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_ages_ignore_a_wall_clock_step_and_envelopes_keep_the_wall_clock(tmp_path, monkeypatch):
    real = time.time
    async with Harness(tmp_path) as h:
        await append(h, [0])
        await h.outbox.flush()
        await asyncio.sleep(0.2)
        assert 0.2 <= h.outbox.oldest_age() < 5
        monkeypatch.setattr(time, "time", lambda: real() + 3600)  # stepped forward an hour
        assert h.outbox.oldest_age() < 5
        await append(h, [1])
        await h.outbox.flush()
        monkeypatch.setattr(time, "time", lambda: real() - 3600)  # and back, past the start
        assert 0.2 <= h.outbox.oldest_age() < 5
        first, second = await h.events()
        assert 3590 < wall(second["received-at"]) - wall(first["received-at"]) < 3610  # receipt times: wall clock
        rows = await h.outbox.lease(10)
        assert 0 <= rows[1].received - rows[0].received < 5  # the stamps ages are made of did not jump


async def test_a_batch_never_lingers_past_linger_ms_whatever_the_clock_did(tmp_path, monkeypatch):
    real = time.time
    async with Harness(tmp_path) as h:
        engine = FakeEngine()
        fw = forwarder(h, engine, **{"linger-ms": 200, "batch-max": 1000})
        await append(h, range(3))
        await h.outbox.flush()
        # a backlog stamped an hour ahead: written before the wall clock stepped back an hour and a restart
        await h.store.run(lambda c: c.execute("UPDATE outbox_segments SET received_at = received_at + 3600"))
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        started = time.monotonic()
        await fw.start()
        try:
            await wait_for(lambda: len(engine.ids()) == 3, timeout=5, what="the backlog sent")
            assert time.monotonic() - started < 1.0  # once linger-ms passed, not an hour later
            await append(h, range(3, 6))  # fresh events with the clock stepped back
            started = time.monotonic()
            await wait_for(lambda: len(engine.ids()) == 6, timeout=5, what="fresh events sent")
            assert 0.1 < time.monotonic() - started < 1.0  # they lingered for company, not longer
        finally:
            await fw.stop(1.0)
