"""The supervisor with scripted sources: isolation, back-off, failed, reconcile, heartbeat bound, and what a
source is told (its launch, its own settings, typed shared resources)."""

import asyncio
import gc
import time
import weakref

import pytest

from listenerd.model import Config
from listenerd.outcome import Ended, Fail, Retry
from listenerd.sources.base import Launch
from listenerd.supervisor import IMMEDIATE_RETRIES, guard_bound, retry_delay
from tests.harness import Harness, desired, integration, listener, wait_for

CREDS = integration("pusher", key="k", secret="s3cr3t-value")


def spec(lid, **extra):
    return listener(id=lid, type="pusher", options={"channel": lid}, **extra)


def fast_config(tmp_path, **supervisor):
    return Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                  "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.4, **supervisor}})


async def test_crashing_source_retries_with_growing_delays_while_others_run(tmp_path, scripted_source):
    attempts: dict[str, list[float]] = {"bad": [], "good": []}

    async def run(ctx):
        attempts[ctx.listener_id].append(time.monotonic())
        if ctx.listener_id == "bad":
            raise RuntimeError("boom")
        ctx.started(f"Subscribed to channel: {ctx.listener.options.channel}")
        for i in range(1000):
            await ctx.emit({"n": i})
            await asyncio.sleep(0.01)

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "bad"): desired(spec("bad"), CREDS), ("t", "good"): desired(spec("good"), CREDS)})
        await wait_for(lambda: len(attempts["bad"]) >= 5, what="five attempts")
        bad = sup.status(("t", "bad"))
        good = sup.status(("t", "good"))
        assert bad.status in ("retrying", "starting")
        assert "RuntimeError: boom" in bad.last_error
        assert good.status == "started" and good.message == "Subscribed to channel: good"
        assert len(attempts["good"]) == 1
        gaps = [b - a for a, b in zip(attempts["bad"], attempts["bad"][1:], strict=False)]
        assert gaps[-1] > gaps[0]  # back-off grows (0.05 -> 0.4 cap, jitter 20%)
        await wait_for(lambda: good.received > 3, what="events received")
        await sup.stop()
        assert bad.status == "stopped" and good.status == "stopped"


async def test_failed_source_is_not_retried_until_its_definition_changes(tmp_path, scripted_source):
    calls = []

    async def run(ctx):
        calls.append(ctx.listener.options.channel)
        if ctx.listener.options.channel == "wrong":
            raise Ended(Fail("Pusher closed the connection: 4001 application does not exist"))
        ctx.started("Subscribed to channel: right")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        first = listener(id="L", type="pusher", options={"channel": "wrong"})
        await sup.start({("t", "L"): desired(first, CREDS)})
        record = sup.status(("t", "L"))
        await wait_for(lambda: record.status == "failed", what="failed")
        assert "4001" in record.message
        changes = await sup.reconcile({("t", "L"): desired(first, CREDS)})
        assert changes["unchanged"] == [("t", "L")]
        await asyncio.sleep(0.2)  # a retry would have happened by now at a 0.05 s back-off
        assert calls == ["wrong"]
        fixed = listener(id="L", type="pusher", options={"channel": "right"})
        changes = await sup.reconcile({("t", "L"): desired(fixed, CREDS)})
        assert changes["restarted"] == [("t", "L")]
        await wait_for(lambda: record.status == "started", what="started after fix")
        assert calls == ["wrong", "right"]


async def test_reconcile_restarts_only_the_changed_listener(tmp_path, scripted_source):
    starts = []

    async def run(ctx):
        starts.append((ctx.listener_id, ctx.listener.mapping))
        ctx.started("ok")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        a, b = spec("A"), spec("B")
        await sup.start({("t", "A"): desired(a, CREDS), ("t", "B"): desired(b, CREDS)})
        await wait_for(lambda: len(starts) == 2)
        b2 = spec("B", mapping={"x": "y"})
        c = spec("C")
        changes = await sup.reconcile({("t", "A"): desired(a, CREDS), ("t", "B"): desired(b2, CREDS),
                                       ("t", "C"): desired(c, CREDS)})
        assert changes["unchanged"] == [("t", "A")]
        assert changes["restarted"] == [("t", "B")]
        assert changes["started"] == [("t", "C")]
        await wait_for(lambda: len(starts) == 4)
        assert sorted(s[0] for s in starts[2:]) == ["B", "C"]
        changes = await sup.reconcile({("t", "C"): desired(c, CREDS)})
        assert sorted(changes["removed"]) == [("t", "A"), ("t", "B")]
        assert sup.status(("t", "A")) is None


async def test_disabled_listener_is_stopped_and_transient_retry_honours_delay(tmp_path, scripted_source):
    runs = []

    async def run(ctx):
        runs.append(time.monotonic())
        raise Ended(Retry("reconnect-advice", "Pusher asked to reconnect now (4200)", delay=0))

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path, **{"backoff-initial": 5, "backoff-max": 5})) as h:
        sup = h.supervisor()
        await sup.start({("t", "on"): desired(spec("on"), CREDS),
                         ("t", "off"): desired(spec("off", status=False), CREDS)})
        await wait_for(lambda: len(runs) >= 3, what="immediate reconnects")
        assert sup.status(("t", "off")).status == "stopped"
        assert "status is false" in sup.status(("t", "off")).message


async def test_a_silent_source_without_a_core_is_restarted_by_the_guard_at_twice_its_bound(tmp_path,
                                                                                          scripted_source):
    runs = []

    async def run(ctx):
        runs.append(1)
        ctx.set_heartbeat_bound(0.3)
        ctx.started("Connected to stream: abc")
        await asyncio.Event().wait()  # goes silent, and nothing in it notices: the watchdog must

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "S"): desired(spec("S"), CREDS)})
        record = sup.status(("t", "S"))
        await wait_for(lambda: record.status == "started")
        started_at = record.since
        await wait_for(lambda: record.status == "retrying", what="heartbeat watchdog")
        assert record.since - started_at >= guard_bound(0.3) - 0.01  # a guard: well past the declared bound
        assert "No data or heartbeat" in record.message and "next attempt in" in record.message
        assert record.last_error.endswith("(the source's bound is 0.3s); restarting")  # reported by the Runner
        await wait_for(lambda: len(runs) >= 2, what="restart after silence")


async def test_a_core_that_ends_a_silent_connection_at_its_bound_is_the_only_judge(tmp_path, scripted_source):
    runs = []

    async def run(ctx):
        runs.append(1)
        ctx.set_heartbeat_bound(0.2)
        ctx.started("Subscribed to channel: quiet")
        await asyncio.sleep(0.2)  # the core's own silence timer, at exactly the bound it declared
        raise Ended(Retry("heartbeat", "No pong within 0.2s; reconnecting", delay=0))

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "Q"): desired(spec("Q"), CREDS)})
        record = sup.status(("t", "Q"))
        errors: set[str | None] = set()
        await wait_for(lambda: errors.add(record.last_error) or len(runs) >= 5, what="five silent runs")
        assert errors <= {None, "No pong within 0.2s; reconnecting"}  # never the watchdog's words


async def test_restart_brings_a_failed_listener_back(tmp_path, scripted_source):
    runs = []

    async def run(ctx):
        runs.append(1)
        if len(runs) == 1:
            raise Ended(Fail("bad credentials"))
        ctx.started("ok")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "R"): desired(spec("R"), CREDS)})
        record = sup.status(("t", "R"))
        await wait_for(lambda: record.status == "failed")
        assert await sup.restart(("t", "R"))
        await wait_for(lambda: record.status == "started")
        assert not await sup.restart(("t", "nope"))


async def test_backoff_resets_after_a_healthy_period(tmp_path, scripted_source):
    script = iter(["fail", "fail", "fail", "healthy", "fail"])
    healthy_done = asyncio.Event()

    async def run(ctx):
        step = next(script, "park")
        if step == "fail":
            raise Ended(Retry("network", "connection refused"))
        if step == "healthy":
            ctx.started("ok")
            await asyncio.sleep(0.3)  # longer than healthy-after: the next failure starts back-off anew
            healthy_done.set()
            raise Ended(Retry("network", "connection lost"))
        ctx.started("ok")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path, **{"healthy-after": 0.2})) as h:
        sup = h.supervisor()
        await sup.start({("t", "H"): desired(spec("H"), CREDS)})
        record = sup.status(("t", "H"))
        await wait_for(lambda: record.attempts == 3, what="three failed attempts")
        await healthy_done.wait()
        await wait_for(lambda: record.status == "retrying" and record.last_error == "connection lost")
        assert record.attempts == 1  # reset by the healthy run, then this one failure
        assert "next attempt in" in record.message and "(at 20" in record.message


async def test_a_listener_paused_by_back_pressure_is_not_taken_for_silent(tmp_path, scripted_source):
    runs = []

    async def run(ctx):
        runs.append(1)
        ctx.set_heartbeat_bound(0.3)
        ctx.started("Subscribed to channel: busy")
        for n in range(100):
            await ctx.emit({"n": n})  # the outbox holds 3: the fourth waits, nobody drains it

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path), max_events=3) as h:
        sup = h.supervisor()
        await sup.start({("t", "P"): desired(spec("P"), CREDS)})
        record = sup.status(("t", "P"))
        await wait_for(lambda: "paused: outbox full" in record.message, what="paused")
        await asyncio.sleep(1.5)  # over twice the watchdog's guard (2 x 0.3 s) of silence while paused
        assert record.status == "started" and len(runs) == 1


@pytest.mark.parametrize(("delay", "attempt", "immediate"), [
    (0, 1, True), (0, IMMEDIATE_RETRIES, True), (0, IMMEDIATE_RETRIES + 1, False), (None, 1, False),
])
def test_an_immediate_retry_is_honoured_a_few_times_in_a_row_then_the_back_off(delay, attempt, immediate):
    settings = Config.model_validate({"supervisor": {"backoff-initial": 5, "backoff-max": 5}}).supervisor
    got = retry_delay(Retry("reconnect-advice", "asked", delay), attempt, settings)
    assert (got == 0) if immediate else (4 <= got <= 5)
    assert retry_delay(Retry("refused", "wait", 2.5), 99, settings) == 2.5  # a delay the server asked for


async def test_a_source_sees_its_launch_its_settings_and_typed_shared_resources(tmp_path, scripted_source):
    seen = []

    class Pool:
        """A resource the listeners of one source type share."""

    async def run(ctx):
        seen.append((ctx.launch, ctx.shared.get(Pool), ctx.settings))
        assert not hasattr(ctx, "config") and not hasattr(ctx, "status")  # no other tenant's secrets, no policy
        if len(seen) in (1, 3):
            raise Ended(Retry("network", "dropped"))
        ctx.started("ok")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    config = fast_config(tmp_path)
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        await sup.start({("t", "L"): desired(spec("L"), CREDS)})
        record = sup.status(("t", "L"))
        await wait_for(lambda: len(seen) == 2 and record.status == "started")
        assert await sup.restart(("t", "L"), replay_from="42")
        await wait_for(lambda: len(seen) == 4 and record.status == "started")
    assert [launch for launch, _, _ in seen] == [Launch(0), Launch(1), Launch(0, "42"), Launch(1)]
    assert len({id(pool) for _, pool, _ in seen}) == 1
    assert all(settings == config.sources for _, _, settings in seen)


async def test_a_resume_point_set_while_disabled_reaches_the_next_launch(tmp_path, scripted_source):
    launches = []

    async def run(ctx):
        launches.append(ctx.launch)
        ctx.started("ok")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "D"): desired(spec("D", status=False), CREDS)})
        assert await sup.restart(("t", "D"), replay_from="7")
        await asyncio.sleep(0.1)
        assert launches == []  # disabled: nothing runs, the resume point waits
        await sup.reconcile({("t", "D"): desired(spec("D"), CREDS)})
        await wait_for(lambda: launches == [Launch(0, "7")], what="launched from the resume point")


async def test_a_stopped_listener_is_freed_at_once_not_left_to_the_cyclic_gc(tmp_path, scripted_source):
    """A deleted or restarted listener's runner and context go when the last reference does: left in reference
    cycles, thousands of them made the full collections of a busy daemon (bench/RESULTS.md, "api scale") longer
    and more frequent, and those stop every request while they run."""
    async def run(ctx):
        ctx.started("Subscribed")
        await ctx.emit({"n": 1})  # the outbox's commit callback is held, too
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        want = {("t1", "A"): desired(spec("A"), CREDS), ("t1", "B"): desired(spec("B"), CREDS)}
        await sup.start(want)
        await wait_for(lambda: all(sup.status(k).status == "started" for k in want), what="both started")
        await h.outbox.flush()
        gone = [weakref.ref(obj) for key in want for obj in (sup.runners[key], sup.runners[key].ctx,
                                                             sup.runners[key].task)]
        gc.collect()
        gc.disable()  # only reference counting frees them from here
        try:
            # A deleted, B restarted with a new definition
            moved = listener(id="B", type="pusher", options={"channel": "B2"})
            await sup.reconcile({("t1", "B"): desired(moved, CREDS)})
            # B's new run's event committed: the outbox's writer has let go of the group of the old runs' events
            await wait_for(lambda: sup.status(("t1", "B")).received == 2, what="B's second event committed")
            assert [ref() for ref in gone] == [None] * len(gone)
        finally:
            gc.enable()


async def test_a_caller_cancelled_while_it_stops_listeners_is_cancelled_not_left_running(tmp_path, scripted_source):
    """Stopping a listener awaits its run's end, which is a CancelledError; the caller's own cancellation is one
    too and must reach it: a cluster round cancelled by a node's stop once went on, and the stop waited for good."""
    ending = asyncio.Event()

    async def slow_to_end(ctx):
        ctx.started("Subscribed to channel: slow")
        try:
            await asyncio.Event().wait()
        finally:
            ending.set()
            await asyncio.sleep(0.3)  # a source closing its socket

    scripted_source("pusher", slow_to_end)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "L"): desired(spec("L"), CREDS)})
        await wait_for(lambda: sup.status(("t", "L")).status == "started", what="started")
        releasing = asyncio.create_task(sup.reconcile_some({("t", "L"): None}))  # deleted: stopped in line
        await asyncio.wait_for(ending.wait(), 5)  # the release is waiting for the run to end
        releasing.cancel()
        await asyncio.wait([releasing], timeout=5)
        assert releasing.cancelled(), "the caller's cancellation was swallowed"
        assert sup.status(("t", "L")) is None or sup.status(("t", "L")).status == "stopped"


async def test_events_forwarded_for_a_deleted_listener_make_no_series_that_nothing_removes(tmp_path, scripted_source):
    async def run(ctx):
        ctx.started("Subscribed to channel: L")
        await asyncio.Event().wait()

    scripted_source("pusher", run)
    async with Harness(tmp_path, fast_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({("t", "L"): desired(spec("L"), CREDS)})
        await wait_for(lambda: sup.status(("t", "L")).status == "started", what="started")
        sup.forwarded("t", "L", 2)
        await sup.reconcile_some({("t", "L"): None})  # deleted; its waiting events still go out
        sup.forwarded("t", "L", 3)
        series = [s for family in h.metrics.forwarded.collect() for s in family.samples
                  if s.labels.get("listener") == "L"]
        assert series == [], series
