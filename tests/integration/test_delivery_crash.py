"""kill -9 while events stream in and the engine is slow; restart; nothing acknowledged is lost.

The runner (crash_runner.py) is a real process with the daemon's delivery path; its sources record
every event whose commit they were told about in an ack file. After SIGKILL and a restart, every
acknowledged event must reach the engine, every copy of one event must carry the same `id` (so the
engine can de-duplicate), and each listener's first deliveries must be in order.
"""


from listenerd.sim.engine import EngineSim
from listenerd.testing import store_snapshot
from tests.integration.crash_runner import drain_after_restart, kill_under_load, read_acked, reap, spawn

TOTAL = 600
LISTENERS = ("A", "B")


async def start_runner(tmp_path, url, synchronous="NORMAL"):
    return await spawn(tmp_path / "crash.db", url, tmp_path / "acked.txt", TOTAL, LISTENERS, synchronous)


def acked(tmp_path):
    return read_acked(tmp_path / "acked.txt")


async def test_kill_9_mid_stream_loses_nothing_acknowledged(tmp_path):
    sim = EngineSim()
    await sim.start()
    sim.delay = 0.03  # a slow engine: the outbox holds a backlog when the kill comes
    runner = await start_runner(tmp_path, sim.url)
    try:
        await kill_under_load(runner, tmp_path / "acked.txt", sim)
        before_kill = {(e["listener-id"], e["event"]["n"]): e["id"] for e in sim.received}
        acked_before = acked(tmp_path)
        assert len(acked_before) < 2 * TOTAL, "the stream ended before the kill; nothing was tested"
        assert len(before_kill) < len(acked_before), "no backlog at the kill; nothing was tested"
        print(f"at the kill: {len(acked_before)} acknowledged, {len(before_kill)} delivered")
        with store_snapshot(tmp_path / "crash.db") as db:  # the restart recovers from the WAL as the kill left it
            checkpoints = dict(db.execute("SELECT listener_id, CAST(value AS INTEGER) FROM checkpoints"))
            waiting = db.execute("SELECT coalesce(sum(events), 0) FROM outbox_segments").fetchone()[0]
        for lid in LISTENERS:  # the resume point never lags what the source side was told is safe
            assert checkpoints[lid] >= max(n for who, n in acked_before if who == lid)
        assert waiting > 0

        sim.delay = 0.0
        runner = await start_runner(tmp_path, sim.url)
        want = {(lid, n) for lid in LISTENERS for n in range(TOTAL)}
        await drain_after_restart(runner, sim, want)
    finally:
        await reap(runner)
        await sim.stop()

    delivered = {(e["listener-id"], e["event"]["n"]) for e in sim.received}
    assert acked_before <= delivered, f"lost: {sorted(acked_before - delivered)[:10]}"
    # the restarted sources resumed after their checkpoints and ran to the end; events committed
    # but not yet acknowledged at the kill are not acknowledged again (they were already safe)
    assert acked(tmp_path) <= want and {(lid, TOTAL - 1) for lid in LISTENERS} <= acked(tmp_path)
    ids: dict[tuple[str, int], set[str]] = {}
    for envelope in sim.received:
        ids.setdefault((envelope["listener-id"], envelope["event"]["n"]), set()).add(envelope["id"])
    assert all(len(v) == 1 for v in ids.values()), "one event delivered under two ids"
    for key, event_id in before_kill.items():
        assert ids[key] == {event_id}
    for lid in LISTENERS:
        firsts: list[int] = []
        for envelope in sim.events(lid):
            if envelope["event"]["n"] not in firsts:
                firsts.append(envelope["event"]["n"])
        assert firsts == list(range(TOTAL)), f"{lid}: first deliveries out of order"
