"""`GET /metrics`: Prometheus text, behind an optional bearer token, rendered off the event loop.

At 10,000 listeners the page is megabytes and took the loop 0.3-0.4 s per scrape, and it listed every
tenant's listener ids to anyone. So: with `server.metrics-token` set, a scrape must present it
(401 otherwise); the page is rendered on a worker thread, and scrapes that arrive while one renders
share that render; and above `server.metrics-per-listener` listeners (or when it is false) the
per-listener series are summed per tenant (the `listener` label is dropped).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from listenerd.api.context import DAEMON
from listenerd.api.errors import ApiError

routes = web.RouteTableDef()
RENDERING: web.AppKey[dict[str, asyncio.Future[bytes]]] = web.AppKey("metrics-render")
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
    rendering = request.app[RENDERING]
    shared = rendering.get("page")
    if shared is None:  # one render at a time; scrapers arriving meanwhile get the same page
        loop = asyncio.get_running_loop()
        shared = rendering["page"] = loop.run_in_executor(None, render, daemon.metrics.registry, server)
        shared.add_done_callback(lambda _: rendering.pop("page", None))
    body = await asyncio.shield(shared)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def render(registry: CollectorRegistry, server: Any) -> bytes:
    """The page; per-listener series summed per tenant when `server` says so for this many listeners."""
    listeners = count_listeners(registry)
    if server.labels_per_listener(listeners):
        return generate_latest(registry)
    return generate_latest(_PerTenant(registry))  # type: ignore[arg-type]


def count_listeners(registry: CollectorRegistry) -> int:
    seen = set()
    for family in registry.collect():
        if family.name == "listenerd_listener_status":
            seen.update((s.labels.get("tenant"), s.labels.get(_PER_LISTENER)) for s in family.samples)
    return len(seen)


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
