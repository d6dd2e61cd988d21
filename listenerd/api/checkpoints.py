"""Checkpoints: a Salesforce listener's stored resume point (replayId), read and set by operators."""

from __future__ import annotations

from aiohttp import web

from listenerd.api.context import CONTROL, json_body
from listenerd.api.listeners import BASE, ids

routes = web.RouteTableDef()


@routes.get(BASE + "/{id}/checkpoint")
async def get_checkpoint(request: web.Request) -> web.Response:
    value = await request.app[CONTROL].checkpoint(*ids(request))
    return web.json_response({"replay": int(value) if value.lstrip("-").isdigit() else value})


@routes.put(BASE + "/{id}/checkpoint")
async def set_checkpoint(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    await control.get_listener(*ids(request))  # an unknown listener is a 404 whatever the body
    replay = await control.set_checkpoint(*ids(request), await json_body(request))
    return web.json_response({"replay": replay})
