"""Pusher fan-out benchmark: many listeners, one channel each, in one listenerd process.

    .venv/bin/python bench/pusher_fanout.py [--listeners 1000] [--tenants 1] [--idle 10]

The simulator runs in its own process (its sockets are not counted). In this process: the real
store, outbox and supervisor, with `--listeners` Pusher listeners spread over `--tenants` tenants,
each listener on its own channel; the listeners of one tenant share its one WebSocket (issue 13), so
the simulator sees `--tenants` sockets. Measured:
- time from `supervisor.start()` until every listener is `started` (subscribed);
- RSS per listener: (RSS with all started - RSS before any started) / listeners, after a GC, with
  websockets and the source module already imported in the baseline;
- idle CPU: this process's user+system CPU time over `--idle` seconds with all listeners connected
  and no events, as a percentage of one core.
Targets (issue 4): all started within 30 s, under 100 KiB per listener, idle CPU under 2 %; issue 13:
one socket per tenant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import listenerd.sources.pusher  # noqa: E402,F401  (in the baseline: code is not per-listener memory)
from bench.common import cpu_model, serve_counts  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.sim.pusher import PusherSim  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener  # noqa: E402

APP_ID, KEY, SECRET = "4242", "fanout-key", "fanout-secret"


def sim_main(conn: Any) -> None:
    async def serve() -> None:
        sim = PusherSim(APP_ID, KEY, SECRET, backlog=4096)
        await sim.start()
        conn.send(sim.port)
        await serve_counts(conn, sim, "count",
                           lambda: (len(sim.connections), sum(1 for s in sim.subscriptions if s.ok)))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


async def main(args: argparse.Namespace) -> None:
    configure_logging("json", "error", sys.stderr)
    sim, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=sim_main, args=(child,), daemon=True)
    proc.start()
    port = sim.recv()
    loop = asyncio.get_running_loop()
    n = args.listeners
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        config = Config.model_validate({"store": {"path": str(Path(tmp) / "f.db")}})
        store = Store(config.store.path)
        await store.open()
        metrics = Metrics()
        outbox = Outbox(store, max_events=1_000_000, max_bytes=1 << 30, metrics=metrics)
        await outbox.start()
        supervisor = Supervisor(config, outbox, metrics)
        creds = integration("pusher", key=KEY, secret=SECRET, host="127.0.0.1", port=port, tls=False)
        desired = {(f"bench{i % args.tenants}", f"L{i}"): Desired(
            listener(id=f"L{i}", type="pusher", options={"channel": f"ch-{i}"}, **{"managed-by": "config"}), creds)
            for i in range(n)}
        gc.collect()
        rss_before = rss_bytes()
        t0 = time.perf_counter()
        await supervisor.start(desired)
        while sum(1 for r in supervisor.records.values() if r.status == "started") < n:
            await asyncio.sleep(0.05)
            if time.perf_counter() - t0 > 300:
                raise SystemExit("not all listeners started within 300 s")
        startup = time.perf_counter() - t0
        gc.collect()
        await asyncio.sleep(1)  # let connection set-up garbage settle before measuring
        gc.collect()
        rss_after = rss_bytes()
        sim.send("count")
        connections, subscriptions = await loop.run_in_executor(None, sim.recv)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        await asyncio.sleep(args.idle)
        idle_cpu = (cpu_seconds() - cpu0) / (time.perf_counter() - wall0) * 100
        still = sum(1 for r in supervisor.records.values() if r.status == "started")
        await supervisor.stop()
        await outbox.close()
        await store.close()
    sim.send("stop")
    await loop.run_in_executor(None, sim.recv)
    proc.join(3)
    per_listener = (rss_after - rss_before) / n
    print(f"machine: {platform.node()}, nproc {os.cpu_count()}, {cpu_model()}, Python {platform.python_version()}")
    print(f"tenants: {args.tenants}")
    print("| listeners | sockets at the sim | subscriptions | all started in | RSS before / after | RSS per listener | "
          f"idle CPU ({args.idle:g} s) | still started after idle |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {n} | {connections} | {subscriptions} | {startup:.2f} s | {rss_before / 2**20:.1f} / "
          f"{rss_after / 2**20:.1f} MiB | {per_listener / 1024:.1f} KiB | {idle_cpu:.2f} % | {still} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=1, help="tenants the listeners are spread over")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    asyncio.run(main(parser.parse_args()))
