"""`GET /metrics`: Prometheus text, behind an optional bearer token, rendered off the event loop.

At 10,000 listeners the page is megabytes and took the loop 0.3-0.4 s per scrape, and it listed every
tenant's listener ids to anyone. So: with `server.metrics-token` set, a scrape must present it
(401 otherwise); the page is rendered on a worker thread, scrapes that arrive while one renders
share that render, and a page is reused while younger than its render took (`Page`); and above
`server.metrics-per-listener` listeners (or when it is false) the per-listener series are summed per
tenant (the `listener` label is dropped).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from listenerd.api.context import DAEMON
from listenerd.api.errors import ApiError
from listenerd.model import Server
from listenerd.observability import Metrics

routes = web.RouteTableDef()
_PER_LISTENER = "listener"


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    server = daemon.config.server
    if server.metrics_token is not None:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                server.metrics_token.encode(), presented.strip().encode("utf-8", "replace")):
            raise ApiError(401, "missing or invalid bearer token (server.metrics-token)")
    page = request.app[RENDERING]
    body = await page.get(daemon.metrics, server)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


class Page:
    """The rendered page, shared: one render at a time on a worker thread, scrapers arriving meanwhile wait for
    it, and a page is reused while younger than its render took, so a scrape flood costs at most half a core
    (a render holds the GIL; back-to-back renders would slow the loop's every step)."""

    def __init__(self) -> None:
        self._render: asyncio.Future[bytes] | None = None
        self._body = b""
        self._fresh_until = 0.0

    async def get(self, metrics: Metrics, server: Server) -> bytes:
        loop = asyncio.get_running_loop()
        if self._render is None and loop.time() < self._fresh_until:
            return self._body
        if self._render is None:
            started = loop.time()
            self._render = loop.run_in_executor(None, render, metrics, server)
            self._render.add_done_callback(lambda done: self._rendered(done, started))
        return await asyncio.shield(self._render)

    def _rendered(self, done: asyncio.Future[bytes], started: float) -> None:
        self._render = None
        if not done.cancelled() and done.exception() is None:
            now = asyncio.get_running_loop().time()
            self._body, self._fresh_until = done.result(), now + (now - started)


RENDERING: web.AppKey[Page] = web.AppKey("metrics-page")


def render(metrics: Metrics, server: Server) -> bytes:
    """The page; per-listener series summed per tenant when `server` says so for this many listeners."""
    if server.labels_per_listener(count_listeners(metrics)):
        return generate_latest(metrics.registry)
    return generate_latest(_PerTenant(metrics.registry))  # type: ignore[arg-type]


def count_listeners(metrics: Metrics) -> int:
    """Listeners with a status series (every loaded one has one)."""
    return len({(s.labels["tenant"], s.labels[_PER_LISTENER]) for family in metrics.status.collect()
                for s in family.samples})


class _PerTenant:
    """A view of `registry` with the `listener` label dropped: its series summed per remaining labels."""

    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if not any(_PER_LISTENER in s.labels for s in family.samples):
                yield family
                continue
            summed: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for sample in family.samples:
                if sample.name.endswith("_created"):
                    continue  # a creation time cannot be summed
                labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != _PER_LISTENER))
                key = (sample.name, labels)
                summed[key] = summed.get(key, 0.0) + sample.value
            out = Metric(family.name, family.documentation + " (summed per tenant: server.metrics-per-listener)",
                         family.type, family.unit)
            for (name, labels), value in summed.items():
                out.add_sample(name, dict(labels), value)
            yield out
