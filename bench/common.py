"""Pieces every benchmark needs: percentiles, the machine's description, and a latency-recording engine.

The engine runs in its own process (`engine_main`, for multiprocessing's spawn), as the real engine
would, and records for each envelope the time from the payload's publish stamp (`event.t`) to arrival.
"""

from __future__ import annotations

import asyncio
import contextlib
import platform
import time
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
    """An EngineSim that keeps only publish-to-arrival latencies, served at GET /stats (POST /reset)."""

    def __init__(self) -> None:
        super().__init__(keep=False, on_events=self._record)
        self.latencies: list[float] = []
        self.last = 0.0

    def _record(self, envelopes: list[dict[str, Any]]) -> None:
        now = time.time()
        self.last = now
        self.latencies.extend(now - e["event"]["t"] for e in envelopes)

    def make_app(self) -> web.Application:
        app = super().make_app()
        app.router.add_get("/stats", self._stats)
        app.router.add_post("/reset", self._reset)
        return app

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"accepted": self.accepted, "last": self.last, "p50": pct(self.latencies, 0.5),
                                  "p99": pct(self.latencies, 0.99)})

    async def _reset(self, request: web.Request) -> web.Response:
        self.latencies.clear()
        self.accepted = 0
        return web.json_response({})


def engine_main(conn: Any) -> None:
    """Process entry: start a LatencyEngine, send its URL through `conn`, serve until killed."""

    async def serve() -> None:
        engine = LatencyEngine()
        await engine.start()
        conn.send(engine.url)
        await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())
