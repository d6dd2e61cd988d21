"""Integrations: one set of credentials per type per tenant; secrets never leave the daemon.

Every answer masks each secret field with a fixed mask. Setting one up replaces it whole and
restarts the listeners that use it (their definition fingerprint includes the integration).
"""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from listenerd.api.app import DAEMON, json_body
from listenerd.api.errors import ApiError
from listenerd.config import format_errors
from listenerd.daemon import Daemon, load_integration
from listenerd.model import INTEGRATION_TYPES, Integration
from listenerd.observability import redactor

routes = web.RouteTableDef()
BASE = "/1.0/tenants/{tid}/integrations"


async def tenant_integrations(daemon: Daemon, tenant_id: str) -> dict[str, Integration]:
    found = {}
    for t, kind, body, managed_by in await daemon.store.objects("integrations"):
        if t == tenant_id and kind in INTEGRATION_TYPES:
            found[kind] = load_integration(kind, body, managed_by)
    return found


def known_type(kind: str) -> str:
    if kind not in INTEGRATION_TYPES:
        raise ApiError(400 if len(kind) < 64 else 404,
                       f"type: unknown integration type {kind[:64]!r} (known: {', '.join(INTEGRATION_TYPES)})",
                       fields=["type"])
    return kind


@routes.get(BASE)
async def list_integrations(request: web.Request) -> web.Response:
    found = await tenant_integrations(request.app[DAEMON], request.match_info["tid"])
    return web.json_response([found[k].redacted() for k in INTEGRATION_TYPES if k in found])


@routes.get(BASE + "/{type}")
async def get_integration(request: web.Request) -> web.Response:
    tenant_id, kind = request.match_info["tid"], request.match_info["type"]
    found = await tenant_integrations(request.app[DAEMON], tenant_id)
    if kind not in found:
        raise ApiError(404, f"no {kind[:64]!r} integration in tenant {tenant_id!r}")
    return web.json_response(found[kind].redacted())


@routes.post(BASE + "/{type}")
async def set_integration(request: web.Request) -> web.Response:
    daemon, tenant_id = request.app[DAEMON], request.match_info["tid"]
    kind = known_type(request.match_info["type"])
    body = await json_body(request)
    for key in ("id", "type"):
        if key in body and body.pop(key) != kind:
            raise ApiError(400, f"{key}: must be {kind!r} (it is the path's type)", fields=[key])
    if "managed-by" in body:
        raise ApiError(400, "managed-by: set by listenerd, not by the API", fields=["managed-by"])
    current = (await tenant_integrations(daemon, tenant_id)).get(kind)
    if current is not None and current.managed_by == "config":
        raise ApiError(409, f"the {kind} integration of tenant {tenant_id!r} is declared in the config file")
    try:
        integration = load_integration(kind, body, "api")
    except ValidationError as exc:
        problems = format_errors(exc)
        raise ApiError(400, "; ".join(str(p) for p in problems), fields=[p.location for p in problems]) from None
    redactor.register(*integration.secret_values())
    await daemon.store.put_object("integrations", tenant_id, kind, integration.dump(), "api")
    await daemon.apply()
    return web.json_response(integration.redacted())
