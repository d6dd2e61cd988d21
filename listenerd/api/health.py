"""Liveness and readiness: the routes without auth (metrics: `api.metrics`)."""

from __future__ import annotations

from aiohttp import web

from listenerd.api.context import DAEMON

routes = web.RouteTableDef()


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@routes.get("/readyz")
async def readyz(request: web.Request) -> web.Response:
    """200 once the store is open and the supervisor runs; 503 before, while stopping, and while the store
    fails (disk full: events are not being committed), with the reason."""
    daemon = request.app[DAEMON]
    components = daemon.components()
    ready = daemon.ready and all(components.values())
    body: dict[str, object] = {"status": "ready" if ready else "not ready", **components}
    reason = daemon.outbox.health.describe()
    if reason is not None:
        body["reason"] = reason
    return web.json_response(body, status=200 if ready else 503)

