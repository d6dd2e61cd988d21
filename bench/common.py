"""Pieces every benchmark needs: percentiles, the machine's description, a latency-recording engine, and
the command loop of a simulator in its own process.

The engine runs in its own process (`engine_main`, for multiprocessing's spawn), as the real engine
would, and records for each envelope the time from the payload's publish stamp (`event.t`) to arrival
(a subclass chooses another start: the delivery benchmark's is the envelope's `received-at`).
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from listenerd.sim.engine import EngineSim


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))] if values else float("nan")


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


class LatencyEngine(EngineSim):
    """An EngineSim that keeps only latencies (arrival - `sent_at`), served at GET /stats (POST /reset)."""

    def __init__(self) -> None:
        super().__init__(keep=False, on_events=self._record)
        self.latencies: list[float] = []
        self.last = 0.0

    def sent_at(self, envelope: dict[str, Any]) -> float:
        """Where an event's latency starts: its payload's publish stamp `t`."""
        return envelope["event"]["t"]

    def _record(self, envelopes: list[dict[str, Any]]) -> None:
        now = time.time()
        self.last = now
        sent_at = self.sent_at
        self.latencies.extend(now - sent_at(e) for e in envelopes)

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/reset", self._reset)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        latencies = sorted(self.latencies)
        body: dict[str, Any] = {"accepted": self.accepted, "requests": len(self.requests), "last": self.last,
                                "p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99)}
        if latencies:
            body.update(max=latencies[-1], mean=statistics.fmean(latencies))
        return web.json_response(body)

    async def _reset(self, request: web.Request) -> web.Response:
        self.latencies.clear()
        self.requests.clear()
        self.accepted = 0
        return web.json_response({})


def engine_main(conn: Any, engine: type[LatencyEngine] = LatencyEngine) -> None:
    """Process entry: start `engine`, send its URL through `conn`, serve until killed."""

    async def serve() -> None:
        sim = engine()
        await sim.start()
        conn.send(sim.url)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


async def publish_paced(publish: Callable[[int], Awaitable[Any]], count: int, rate: float | None,
                        yield_every: int) -> tuple[float, float]:
    """Publish events 0..count-1, `rate` a second (None: back to back), letting the loop run every
    `yield_every` events (the simulator's writers and held answers); returns the first and last publish time."""
    first = time.time()
    for n in range(count):
        if rate:
            ahead = first + n / rate - time.time()
            if ahead > 0.0005:
                await asyncio.sleep(ahead)
        await publish(n)
        if n % yield_every == 0:
            await asyncio.sleep(0)
    return first, time.time()


async def serve_counts(conn: Any, sim: Any, command: str, counts: Callable[[], Any]) -> None:
    """A simulator process's loop for the benchmarks that only count: (`command`) answers `counts()`,
    ("stop") stops the simulator and answers True."""
    loop = asyncio.get_running_loop()
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        if cmd == command:
            conn.send(counts())
        elif cmd == "stop":
            await sim.stop()
            conn.send(True)
            return


async def serve_simulator(conn: Any, *, subscribers: Callable[[int], Awaitable[Any]],
                          publish: Callable[[int, float | None], Awaitable[tuple[float, float]]],
                          stop: Callable[[], Awaitable[None]]) -> None:
    """A simulator process's command loop over the pipe `conn`, until ("stop",).

    ("subscribers", n): answers once n consumers are subscribed; ("publish", count, rate): answers the
    first and last publish time.
    """
    loop = asyncio.get_running_loop()
    while True:
        cmd, *args = await loop.run_in_executor(None, conn.recv)
        if cmd == "subscribers":
            await subscribers(args[0])
            conn.send(True)
        elif cmd == "publish":
            conn.send(await publish(*args))
        elif cmd == "stop":
            await stop()
            return
