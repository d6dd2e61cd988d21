"""DataSift source throughput: simulator -> WebSocket -> DataSift source -> durable outbox (committed).

    .venv/bin/python bench/datasift_throughput.py [--events 20000] [--listeners 10] [--rate 1000] [--seconds 5]

Two processes, so neither side borrows the other's event loop:
- the simulator (`DataSiftSim`) publishes twitter-style interactions as fast as it can (or paced),
  each carrying its publish time `bench.t` (time.time());
- listenerd: the real DataSift source under the real supervisor writing to the real SQLite outbox;
  the supervisor's tap fires when an event is committed, and records commit - `bench.t`.

The engine hop is left out on purpose (the delivery benchmark measures it): this measures what the
source adds, up to the point where an event counts as received.

Runs:
- burst, 1 listener: N interactions back to back; events/s = N / (last commit - first publish);
- burst, K listeners sharing one socket (K hashes, round-robin): the same, across all of them;
- paced: `--rate`/s for `--seconds` on 1 listener; p50/p99/max publish -> commit latency.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_model, pct  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.sim.datasift import DataSiftSim  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener  # noqa: E402

USER, KEY = "bench", "bench-key-0000"
MAPPING = {"t": "bench.t", "n": "bench.n", "who": "interaction.author.username",
           "sentiment": "salience.content.sentiment"}


def hashes(count: int) -> list[str]:
    return [f"{i:032x}" for i in range(1, count + 1)]


# ---------------------------------------------------------------- simulator process


def sim_process(ports: Any, commands: Any, done: Any) -> None:
    async def main() -> None:
        sim = DataSiftSim(users={USER: KEY}, tick_interval=5, seed=1)
        await sim.start()
        ports.put(sim.port)
        template = sim.make_interaction()
        while True:
            command = await asyncio.to_thread(commands.get)
            if command is None:
                break
            kind, count, targets, rate = command
            await asyncio.sleep(0)
            started = time.time()
            for n in range(count):
                target = targets[n % len(targets)]
                data = {**template, "interaction": {**template["interaction"], "id": f"{kind}-{n:08d}"},
                        "bench": {"t": time.time(), "n": n}}
                await sim.publish(target, data)
                if rate:
                    delay = started + (n + 1) / rate - time.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
            done.put((started, time.time()))
        await sim.stop()

    asyncio.run(main())


# ---------------------------------------------------------------- listenerd side


async def run_listenerd(port: int, commands: Any, done: Any, args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="ds-bench-")
    config = Config.model_validate({"store": {"path": os.path.join(tmp, "bench.db")}})
    store = Store(config.store.path, config.store.synchronous)
    await store.open()
    metrics = Metrics()
    outbox = Outbox(store, max_events=10_000_000, max_bytes=1 << 34, metrics=metrics)
    await outbox.start()
    commits: list[tuple[float, float]] = []  # (commit time, publish time)
    arrived = asyncio.Event()
    want = 0

    def tap(tenant_id: str, listener_id: str, envelope: dict[str, Any]) -> None:
        commits.append((time.time(), envelope["event"]["t"]))
        if len(commits) >= want:
            arrived.set()

    creds = integration("datasift", username=USER, **{"api-key": KEY, "stream-url": f"ws://127.0.0.1:{port}/multi"})
    all_hashes = hashes(args.listeners)
    specs = {("t", f"L{i}"): Desired(listener(id=f"L{i}", type="datasift", options={"hash": h},
                                              mapping=MAPPING), creds)
             for i, h in enumerate(all_hashes)}
    supervisor = Supervisor(config, outbox, metrics, tap=tap)
    await supervisor.start(specs)
    deadline = time.monotonic() + 20
    while not all(r.status == "started" for r in supervisor.records.values()):
        if time.monotonic() > deadline:
            raise SystemExit("listeners did not start")
        await asyncio.sleep(0.05)

    async def one(kind: str, count: int, targets: list[str], rate: float) -> tuple[float, list[tuple[float, float]]]:
        nonlocal want
        commits.clear()
        arrived.clear()
        want = count
        commands.put((kind, count, targets, rate))
        published_at, published_end = await asyncio.to_thread(done.get)
        await asyncio.wait_for(arrived.wait(), 300)
        results.setdefault("publish", {})[kind] = count / (published_end - published_at)
        return published_at, list(commits)

    await one("warmup", 2000, all_hashes[:1], 0)
    start, got = await one("burst1", args.events, all_hashes[:1], 0)
    results["burst_1"] = args.events / (max(c for c, _ in got) - start)
    start, got = await one("burstk", args.events, all_hashes, 0)
    results["burst_k"] = args.events / (max(c for c, _ in got) - start)
    count = int(args.rate * args.seconds)
    start, got = await one("paced", count, all_hashes[:1], args.rate)
    latencies = [(c - t) * 1000 for c, t in got]
    results["paced"] = {"count": count, "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99),
                        "max": max(latencies)}
    await supervisor.stop()
    await outbox.close()
    await store.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--listeners", type=int, default=10)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    configure_logging("json", "warning", stream=open(os.devnull, "w"))  # noqa: SIM115
    ctx = mp.get_context("spawn")
    ports, commands, done = ctx.Queue(), ctx.Queue(), ctx.Queue()
    sim = ctx.Process(target=sim_process, args=(ports, commands, done), daemon=True)
    sim.start()
    try:
        results = asyncio.run(run_listenerd(ports.get(timeout=30), commands, done, args))
    finally:
        commands.put(None)
        sim.join(10)
    paced = results["paced"]
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; python {platform.python_version()}")
    publish = results["publish"]
    print(f"burst, 1 listener, {args.events} interactions: {results['burst_1']:.0f} events/s committed "
          f"(simulator published at {publish['burst1']:.0f}/s)")
    print(f"burst, {args.listeners} listeners on one shared socket, {args.events} interactions: "
          f"{results['burst_k']:.0f} events/s committed (simulator published at {publish['burstk']:.0f}/s)")
    print(f"paced {args.rate:.0f}/s x {args.seconds:g}s ({paced['count']} events): publish -> commit "
          f"p50 {paced['p50']:.1f} ms, p99 {paced['p99']:.1f} ms, max {paced['max']:.1f} ms")


if __name__ == "__main__":
    main()
