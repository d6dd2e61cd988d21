"""Pusher throughput benchmark: one channel, listenerd against Pysher on the same stream.

    .venv/bin/python bench/pusher_throughput.py [--events 30000] [--rate 1000] [--seconds 5]

Four processes, so no side borrows another's event loop:
- the simulator (`PusherSim`), which publishes through its in-process `publish()` as fast as it can
  (each event carries its publish time `t`, from `time.time()`);
- listenerd: the real Pusher source under the real supervisor, the durable outbox (SQLite) and the
  forwarder, posting to
- an engine (`EngineSim`) that records arrival - `t` for every envelope: publish -> engine latency;
- a Pysher client subscribed to the same channel, recording receipt - `t`.

Two runs:
- burst: N events published back to back. events/s = N / (last arrival - first publish), for
  listenerd at the engine and for Pysher at its callback. The ratio listenerd/Pysher is reported.
- paced: `--rate` events/s for `--seconds`; p50/p99 publish -> engine (listenerd) and publish ->
  callback (Pysher). Pysher does less work (no durable write, no HTTP hop), so the latency
  comparison favours it.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import multiprocessing as mp
import os
import platform
import pstats
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from bench.common import cpu_model, engine_main, pct, publish_paced, serve_simulator  # noqa: E402
from listenerd.delivery.forwarder import Forwarder  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.sim.pusher import PusherSim  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener  # noqa: E402

APP_ID, KEY, SECRET, CHANNEL = "4242", "bench-key", "bench-secret", "bench"
PAD = "x" * 100  # a small realistic payload beside the counters


def cpu_seconds() -> float:
    """This process's CPU time, all threads (Pysher's two included)."""
    t = os.times()
    return t.user + t.system


# ---------------------------------------------------------------- simulator process


def sim_main(conn: Any) -> None:
    async def serve() -> None:
        sim = await PusherSim(APP_ID, KEY, SECRET).start()
        conn.send(sim.port)

        async def publish(count: int, rate: float | None) -> tuple[float, float]:
            return await publish_paced(lambda n: sim.publish(CHANNEL, "bench", {"n": n, "t": time.time(), "pad": PAD}),
                                       count, rate, yield_every=50)  # let the per-socket writers run

        await serve_simulator(conn, subscribers=lambda n: sim.wait_subscribed(CHANNEL, n, timeout=60),
                              publish=publish, stop=sim.stop)

    asyncio.run(serve())


# ---------------------------------------------------------------- Pysher process


def pysher_main(conn: Any, port: int) -> None:
    import pysher

    received: list[tuple[float, float]] = []
    expected = [0]
    done = threading.Event()
    subscribed = threading.Event()

    def on_event(data: str) -> None:
        received.append((time.time(), json.loads(data)["t"]))
        if len(received) >= expected[0]:
            done.set()

    client = pysher.Pusher(KEY, secure=False, custom_host="127.0.0.1", port=port)

    def on_connect(data: str) -> None:
        channel = client.subscribe(CHANNEL)
        channel.bind("pusher_internal:subscription_succeeded", lambda *a: subscribed.set())
        channel.bind("bench", on_event)

    client.connection.bind("pusher:connection_established", on_connect)
    client.connect()
    subscribed.wait(30)
    conn.send(True)
    while True:
        cmd, *args = conn.recv()
        if cmd == "expect":
            received.clear()
            done.clear()
            expected[0] = args[0]
            cpu0 = cpu_seconds()
            conn.send(True)
        elif cmd == "result":
            done.wait(args[0])
            cpu = cpu_seconds() - cpu0
            latencies = [r - t for r, t in received]
            conn.send({"count": len(received), "last": received[-1][0] if received else 0.0,
                       "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99), "cpu": cpu})
        elif cmd == "stop":
            client.disconnect(1)
            return


# ---------------------------------------------------------------- listenerd (this process)


async def engine_stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url.replace("/1.0/events", "/stats")) as response:
        return await response.json()


class CommitTap:
    """The supervisor's tap: called as each event commits to the outbox (the moment it is received)."""

    def __init__(self) -> None:
        self.count = 0
        self.last = 0.0
        self.latencies: list[float] = []

    def __call__(self, tenant_id: str, listener_id: str, envelope: dict[str, Any]) -> None:
        now = time.time()
        self.count += 1
        self.last = now
        self.latencies.append(now - envelope["event"]["t"])

    def reset(self) -> None:
        self.count, self.last, self.latencies = 0, 0.0, []


async def one_run(sim: Any, pysher: Any, http: aiohttp.ClientSession, url: str, count: int,
                  rate: float | None, tap: CommitTap) -> dict[str, Any]:
    await http.post(url.replace("/1.0/events", "/reset"))
    tap.reset()
    pysher.send(("expect", count))
    pysher.recv()
    cpu0 = cpu_seconds()
    sim.send(("publish", count, rate))
    loop = asyncio.get_running_loop()
    first, last_publish = await loop.run_in_executor(None, sim.recv)
    for _ in range(6000):  # at most 5 minutes
        stats = await engine_stats(http, url)
        if stats["accepted"] >= count:
            break
        await asyncio.sleep(0.05)
    cpu = cpu_seconds() - cpu0
    pysher.send(("result", 300))
    peer = await loop.run_in_executor(None, pysher.recv)
    ours_s = stats["last"] - first
    theirs_s = peer["last"] - first
    return {
        "count": count, "rate": rate, "publish_s": last_publish - first,
        "commit": {"events": tap.count, "per_s": tap.count / (tap.last - first), "p50": pct(tap.latencies, 0.5),
                   "p99": pct(tap.latencies, 0.99)},
        "listenerd": {"events": stats["accepted"], "per_s": stats["accepted"] / ours_s, "p50": stats["p50"],
                      "p99": stats["p99"], "cpu_us": cpu / count * 1e6},
        "pysher": {"events": peer["count"], "per_s": peer["count"] / theirs_s if theirs_s > 0 else 0,
                   "p50": peer["p50"], "p99": peer["p99"], "cpu_us": peer["cpu"] / count * 1e6},
    }


async def main(args: argparse.Namespace) -> None:
    configure_logging("json", "error", sys.stderr)
    spawn = mp.get_context("spawn")
    sim, sim_child = mp.Pipe()
    engine, engine_child = mp.Pipe()
    peer, peer_child = mp.Pipe()
    procs = [spawn.Process(target=sim_main, args=(sim_child,), daemon=True),
             spawn.Process(target=engine_main, args=(engine_child,), daemon=True)]
    for p in procs:
        p.start()
    port, url = sim.recv(), engine.recv()
    pysher_proc = spawn.Process(target=pysher_main, args=(peer_child, port), daemon=True)
    pysher_proc.start()
    procs.append(pysher_proc)
    peer.recv()
    results = []
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        config = Config.model_validate({"store": {"path": str(Path(tmp) / "b.db")}, "engine": {"url": url}})
        store = Store(config.store.path)
        await store.open()
        metrics = Metrics()
        outbox = Outbox(store, max_events=1_000_000, max_bytes=1 << 30, metrics=metrics)
        await outbox.start()
        tap = CommitTap()
        supervisor = Supervisor(config, outbox, metrics, tap=tap)
        forwarder = Forwarder(config.engine, outbox, metrics, supervisor.forwarded)
        await forwarder.start()
        spec = listener(id="P1", type="pusher", options={"channel": CHANNEL}, **{"managed-by": "config"})
        creds = integration("pusher", key=KEY, secret=SECRET, host="127.0.0.1", port=port, tls=False)
        await supervisor.start({("bench", "P1"): Desired(spec, creds)})
        sim.send(("subscribers", 2))
        await asyncio.get_running_loop().run_in_executor(None, sim.recv)
        try:
            async with aiohttp.ClientSession() as http:
                await one_run(sim, peer, http, url, 1000, None, tap)  # warm-up
                profile = cProfile.Profile() if args.profile else None
                if profile:
                    profile.enable()
                results.append(await one_run(sim, peer, http, url, args.events, None, tap))
                if profile:
                    profile.disable()
                    pstats.Stats(profile).sort_stats("tottime").print_stats(25)
                results.append(await one_run(sim, peer, http, url, int(args.rate * args.seconds), args.rate, tap))
        finally:
            await supervisor.stop()
            await forwarder.stop(5)
            await outbox.close()
            await store.close()
            sim.send(("stop",))
            peer.send(("stop",))
            for p in procs:
                p.join(3)
                if p.is_alive():
                    p.terminate()
    report(results)


def report(results: list[dict[str, Any]]) -> None:
    print(f"machine: {platform.node()}, nproc {os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}")
    print("| run | events (listenerd/Pysher) | publish s | listenerd ev/s at commit | at engine | Pysher ev/s | "
          "ratio commit / engine | listenerd p50/p99 ms commit | at engine | Pysher p50/p99 ms | "
          "CPU us/event listenerd / Pysher |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        commit, ours, theirs = r["commit"], r["listenerd"], r["pysher"]
        per = theirs["per_s"] or float("nan")
        name = "burst" if r["rate"] is None else f"paced {r['rate']:.0f}/s"
        print(f"| {name} | {ours['events']}/{theirs['events']} of {r['count']} | {r['publish_s']:.2f} | "
              f"{commit['per_s']:,.0f} | {ours['per_s']:,.0f} | {theirs['per_s']:,.0f} | "
              f"{commit['per_s'] / per:.2f}x / {ours['per_s'] / per:.2f}x | "
              f"{commit['p50'] * 1000:.1f} / {commit['p99'] * 1000:.1f} | "
              f"{ours['p50'] * 1000:.1f} / {ours['p99'] * 1000:.1f} | "
              f"{theirs['p50'] * 1000:.1f} / {theirs['p99'] * 1000:.1f} | "
              f"{ours['cpu_us']:.0f} / {theirs['cpu_us']:.0f} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=30_000, help="events in the burst run")
    parser.add_argument("--rate", type=float, default=1000, help="events/s in the paced run")
    parser.add_argument("--seconds", type=float, default=5, help="length of the paced run")
    parser.add_argument("--profile", action="store_true", help="cProfile listenerd's process in the burst run")
    asyncio.run(main(parser.parse_args()))
