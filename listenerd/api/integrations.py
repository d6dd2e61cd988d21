"""Integrations: one set of credentials per type per tenant; secrets never leave the daemon.

Every answer masks each secret field with a fixed mask. Setting one up replaces it whole and
restarts the listeners that use it (their definition fingerprint includes the integration).
"""

from __future__ import annotations

from aiohttp import web

from listenerd.api.context import CONTROL, json_body
from listenerd.api.errors import ApiError
from listenerd.control import Invalid, integration_type

routes = web.RouteTableDef()
BASE = "/1.0/tenants/{tid}/integrations"


def known_type(kind: str) -> str:
    """The path's type: an unknown one is a bad request, one too long to be a type name is not found."""
    try:
        return integration_type(kind)
    except Invalid as exc:
        if len(kind) < 64:
            raise
        raise ApiError(404, exc.message, fields=exc.fields) from None


@routes.get(BASE)
async def list_integrations(request: web.Request) -> web.Response:
    found = await request.app[CONTROL].integrations(request.match_info["tid"])
    return web.json_response([integration.redacted() for integration in found])


@routes.get(BASE + "/{type}")
async def get_integration(request: web.Request) -> web.Response:
    integration = await request.app[CONTROL].get_integration(request.match_info["tid"], request.match_info["type"])
    return web.json_response(integration.redacted())


@routes.post(BASE + "/{type}")
async def set_integration(request: web.Request) -> web.Response:
    kind = known_type(request.match_info["type"])
    integration = await request.app[CONTROL].set_integration(request.match_info["tid"], kind,
                                                             await json_body(request))
    return web.json_response(integration.redacted())
