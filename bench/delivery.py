"""Delivery benchmark: events appended durably and delivered to a local engine, and receipt-to-engine latency.

    .venv/bin/python bench/delivery.py [--quick] [--profile] [--synchronous NORMAL|FULL|both]
                                       [--backend sqlite|postgresql|both] [--throughput-only]

The daemon side (store, outbox, forwarder, and producer tasks standing in for sources) runs in this
process exactly as in listenerd; the engine is an `EngineSim` in a separate process (as the real
engine would be), recording for each envelope the time from its `received-at` to its arrival.

- throughput: producers append N events as fast as the outbox takes them; the clock stops when the
  engine has acknowledged the last one (the outbox is empty). events/s = N / that time.
- latency: producers append at a fixed rate (5,000 events/s); p50/p99 of arrival - received-at.

For each batch size (engine.batch-max 1, 100, 500 (the default), 1000) and `store.synchronous` setting. Store-thread
time is measured per operation (commit of appends, lease, ack) to show what bounds the run.

`--backend postgresql` runs the same cases on the PostgreSQL store (a fresh database on the local
server, else a throwaway cluster: `listenerd.testing_pg`), `both` side by side in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import cProfile
import io
import multiprocessing as mp
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from bench.common import LatencyEngine, engine_main  # noqa: E402
from listenerd.delivery.forwarder import Forwarder  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Engine  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.store import Store, in_transaction  # noqa: E402
from listenerd.store_pg import PostgresStore  # noqa: E402
from listenerd.testing_pg import Postgres  # noqa: E402

T = TypeVar("T")
EVENT = {"username": "alice_1234", "sentiment": 3, "id": "alice_tw", "lang": "en",
         "text": "Listening to the new album on repeat, the second track is the best one yet #music #launch"}


# ---------------------------------------------------------------- the engine, in its own process

_EPOCH_CACHE: dict[str, float] = {}


def parse_received_at(stamp: str) -> float:
    """Fast RFC 3339 (…T…Z with microseconds) -> epoch seconds; the whole-second prefix is cached.

    `listenerd.delivery.ids.received_epoch` reads the same stamps, but at strptime's cost per event,
    which would slow the engine process this benchmark must not be limited by.
    """
    head = stamp[:19]
    base = _EPOCH_CACHE.get(head)
    if base is None:
        base = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
        _EPOCH_CACHE[head] = base
    return base + float(stamp[19:-1] or 0)


class BenchEngine(LatencyEngine):
    """The benchmark's engine: latency from each envelope's `received-at` (the daemon's receipt) to arrival."""

    def sent_at(self, envelope: dict[str, Any]) -> float:
        return parse_received_at(envelope["received-at"])


# ---------------------------------------------------------------- the daemon side


class Timed:
    """The real store, with store-thread busy time summed per operation."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.busy: dict[str, float] = defaultdict(float)

    def _timed(self, tag: str, fn: Callable[[], T]) -> Callable[[], T]:
        def timed() -> T:
            started = time.perf_counter()
            try:
                return fn()
            finally:
                self.busy[tag] += time.perf_counter() - started
        return timed

    async def run(self, fn: Callable[[Any], T]) -> T:
        tag = "read:" + fn.__qualname__.split(".<locals>")[0].rsplit(".", 1)[-1]
        return await self._call(self._timed(tag, lambda: fn(self._require())))

    async def transaction(self, fn: Callable[[Any], T]) -> T:
        tag = "txn:" + fn.__qualname__.split(".<locals>")[0].rsplit(".", 1)[-1]
        return await self._call(self._timed(tag, lambda: in_transaction(self._require(), fn)))


class TimedStore(Timed, Store):
    pass


class TimedPgStore(Timed, PostgresStore):
    pass


POSTGRES: Postgres | None = None


async def run_case(url: str, *, batch: int, events: int, rate: float | None, synchronous: str,
                   producers: int = 4, profile: cProfile.Profile | None = None,
                   backend: str = "sqlite") -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        database = POSTGRES.database() if backend == "postgresql" and POSTGRES else None
        store = (TimedPgStore(database, synchronous) if database else
                 TimedStore(str(Path(tmp) / "bench.db"), synchronous))
        await store.open()
        metrics = Metrics()
        outbox = Outbox(store, max_events=1_000_000, max_bytes=1 << 30, metrics=metrics)
        await outbox.start()
        engine = Engine.model_validate({"url": url, "batch-max": batch})
        per = events // producers
        delivered = asyncio.Event()
        acked = 0

        def on_forwarded(tenant: str, listener: str, count: int) -> None:
            nonlocal acked
            acked += count
            if acked >= per * producers:
                delivered.set()

        forwarder = Forwarder(engine, outbox, metrics, on_forwarded)
        await forwarder.start()
        async with aiohttp.ClientSession() as http:
            await http.post(url.replace("/1.0/events", "/reset"))

            async def produce(lid: str) -> None:
                interval = producers / rate if rate else 0.0
                started = time.perf_counter()
                for n in range(per):
                    await outbox.append("bench", lid, "pusher", {**EVENT, "n": n})
                    if interval:
                        ahead = started + (n + 1) * interval - time.perf_counter()
                        if ahead > 0.001:
                            await asyncio.sleep(ahead)
                    elif n % 64 == 0:
                        await asyncio.sleep(0)  # let the writer and forwarder run, as socket reads would

            if profile:
                profile.enable()
            t0 = time.perf_counter()
            cpu0 = time.process_time()
            await asyncio.gather(*(produce(f"L{i}") for i in range(producers)))
            await outbox.flush()
            t_committed = time.perf_counter()
            await delivered.wait()
            t_delivered = time.perf_counter()
            cpu = time.process_time() - cpu0
            if profile:
                profile.disable()
            async with http.get(url.replace("/1.0/events", "/stats")) as response:
                stats = await response.json()
        post_sum = metrics.engine_latency._sum.get()  # seconds spent in engine POSTs
        await forwarder.stop(5)
        await outbox.close()
        await store.close()
        if database and POSTGRES:
            POSTGRES.drop(database)
    total = per * producers
    assert stats["accepted"] == total, stats
    elapsed = t_delivered - t0
    return {
        "backend": backend, "batch": batch, "synchronous": synchronous, "events": total, "rate": rate,
        "appended_per_s": total / (t_committed - t0), "delivered_per_s": total / elapsed,
        "requests": stats["requests"], "p50_ms": stats.get("p50", 0) * 1000, "p99_ms": stats.get("p99", 0) * 1000,
        "max_ms": stats.get("max", 0) * 1000, "elapsed": elapsed,
        "post_ms": 1000 * post_sum / max(1, stats["requests"]),
        "cpu_us": cpu / total * 1e6,
        "store_busy": {k: round(v / elapsed, 3) for k, v in sorted(store.busy.items(), key=lambda kv: -kv[1])},
    }


def fmt(r: dict[str, Any]) -> str:
    busy = ", ".join(f"{k} {v:.0%}" for k, v in list(r["store_busy"].items())[:4])
    return (f"| {r['backend']} | {r['batch']} | {r['synchronous']} | {r['rate'] or 'max'} | {r['events']} | "
            f"{r['appended_per_s']:,.0f} | {r['delivered_per_s']:,.0f} | {r['requests']} | "
            f"{r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['post_ms']:.1f} | {r['cpu_us']:.1f} | {busy} |")


HEADER = ("| store | batch-max | synchronous | offered (ev/s) | events | appended ev/s | delivered ev/s | "
          "engine requests | p50 ms | p99 ms | mean POST ms | daemon CPU µs/event | "
          "store thread busy (share of wall time) |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


async def main(args: argparse.Namespace) -> None:
    configure_logging("json", "error", sys.stderr)
    parent, child = mp.Pipe()
    engine = mp.get_context("spawn").Process(target=engine_main, args=(child, BenchEngine), daemon=True)
    engine.start()
    url = parent.recv()
    syncs = ["NORMAL", "FULL"] if args.synchronous == "both" else [args.synchronous]
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    global POSTGRES
    if "postgresql" in backends:
        POSTGRES = Postgres().start()
    scale = 0.2 if args.quick else 1.0
    sizes = {1: int(4000 * scale), 100: int(100_000 * scale), 500: int(200_000 * scale), 1000: int(200_000 * scale)}
    if args.throughput_only:
        sizes = {500: sizes[500]}
    print(HEADER, flush=True)
    try:
        for synchronous in syncs:
            for backend in backends:
                for batch, n in sizes.items():
                    print(fmt(await run_case(url, batch=batch, events=n, rate=None, synchronous=synchronous,
                                             backend=backend)), flush=True)
            if args.throughput_only:
                continue
            for backend in backends:
                for batch in sizes:
                    n = int(5000 * 4 * scale)
                    print(fmt(await run_case(url, batch=batch, events=n, rate=5000, synchronous=synchronous,
                                             backend=backend)), flush=True)
        if args.profile:
            profile = cProfile.Profile()
            result = await run_case(url, batch=1000, events=int(100_000 * scale), rate=None,
                                    synchronous=syncs[0], profile=profile)
            print(f"\nprofiled run (event-loop thread only; store thread above): {fmt(result)}\n")
            out = io.StringIO()
            pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(18)
            print(out.getvalue())
    finally:
        engine.terminate()
        if POSTGRES:
            POSTGRES.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a fifth of the events (a smoke run)")
    parser.add_argument("--profile", action="store_true", help="cProfile one batch-1000 throughput run")
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL", "both"], default="both")
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--throughput-only", action="store_true", help="only the batch-500 throughput case")
    asyncio.run(main(parser.parse_args()))
