"""What a person's view needs beside the listener routes: the tenants a token may use, the delivery side.

`GET /1.0/tenants` lets the console (and `listenerd status`) find every listener a token may see
without being told the tenant ids. `GET /1.0/engine` is daemon-wide (one outbox and one forwarder
serve every tenant): any valid token may read it, since it carries counts and the engine's last
error, never a tenant's events or settings.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from listenerd.api.context import DAEMON, TOKEN

routes = web.RouteTableDef()


@routes.get("/1.0/tenants")
async def list_tenants(request: web.Request) -> web.Response:
    """The configured tenants this token may use, in config order."""
    token = request[TOKEN]
    return web.json_response([{"id": tenant.id, "name": tenant.name}
                              for tenant in request.app[DAEMON].config.tenants if token.allows(tenant.id)])


@routes.get("/1.0/engine")
async def engine_state(request: web.Request) -> web.Response:
    return web.json_response(delivery_json(request.app[DAEMON]))


def delivery_json(daemon: Any) -> dict[str, Any]:
    """The forwarder's state, the outbox's depth and bounds, and whether the store writes."""
    forwarder, outbox = daemon.forwarder, daemon.outbox
    if forwarder is None or not daemon.ready:
        state = "stopped"
    elif forwarder.in_flight and forwarder.attempt:
        state = "retrying"
    elif forwarder.in_flight:
        state = "delivering"
    else:
        state = "idle"
    return {
        "engine": {"state": state, "in-flight": forwarder.in_flight if forwarder else 0,
                   "attempt": forwarder.attempt if forwarder else 0,
                   "last-error": forwarder.last_error if forwarder else None},
        "outbox": {"events": outbox.depth, "bytes": outbox.size_bytes, "max-events": outbox.max_events,
                   "max-bytes": outbox.max_bytes, "oldest-age": round(outbox.oldest_age(), 3)},
        "store": {"writing": not outbox.health.failing, "problem": outbox.health.problem},
    }
