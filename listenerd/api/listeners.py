"""Listeners: create, retrieve, update, delete, list, restart, and their status.

Bodies are validated by the same model as the config file, so a bad body answers 400 naming the
field (`options.hash: required`). Objects declared in the config answer 409 to PUT and DELETE.
What each change does, and in what order, is the control's; these handlers read the request and
shape the answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from listenerd.api import paging
from listenerd.api.context import CONTROL, json_body
from listenerd.model import ListenerBase

routes = web.RouteTableDef()
BASE = "/1.0/tenants/{tid}/listeners"


def ids(request: web.Request) -> tuple[str, str]:
    """(tenant id, listener id) of a route below BASE/{id}."""
    return request.match_info["tid"], request.match_info["id"]


def listener_json(spec: ListenerBase) -> dict[str, Any]:
    body = spec.dump()
    return {key: body[key] for key in ("id", "name", "description", "status", "type", "options", "mapping",
                                       "managed-by")}


@routes.get(BASE)
async def list_listeners(request: web.Request) -> web.Response:
    """A page in id order (`LI2` before `LI10`); `?status=failed` (runtime status) and `?type=pusher` filter."""
    query = request.query
    found, more = await request.app[CONTROL].listeners(
        request.match_info["tid"], after=paging.cursor(query, str), limit=paging.limit(query),
        status=query.get("status") or None, kind=query.get("type") or None)
    return paging.answer(request, [listener_json(spec) for spec in found], found[-1].id if more else None)


@routes.get(BASE + "/status")  # before BASE/{id}, which would take "status" for an id
async def listeners_summary(request: web.Request) -> web.Response:
    return web.json_response(request.app[CONTROL].listener_summary(request.match_info["tid"]))


@routes.post(BASE)
async def create_listener(request: web.Request) -> web.Response:
    body = await json_body(request)
    spec = await request.app[CONTROL].create_listener(request.match_info["tid"], body)
    return web.json_response(listener_json(spec), status=201)


@routes.get(BASE + "/{id}")
async def get_listener(request: web.Request) -> web.Response:
    return web.json_response(listener_json(await request.app[CONTROL].get_listener(*ids(request))))


@routes.put(BASE + "/{id}")
async def update_listener(request: web.Request) -> web.Response:
    control = request.app[CONTROL]
    await control.get_listener(*ids(request))  # an unknown listener is a 404 whatever the body
    spec = await control.update_listener(*ids(request), await json_body(request))
    return web.json_response(listener_json(spec))


@routes.delete(BASE + "/{id}")
async def delete_listener(request: web.Request) -> web.Response:
    await request.app[CONTROL].delete_listener(*ids(request))
    return web.Response(status=204)


@routes.get(BASE + "/{id}/status")
async def listener_status(request: web.Request) -> web.Response:
    record = await request.app[CONTROL].status(*ids(request))
    return web.json_response(record.as_json())


@routes.post(BASE + "/{id}/restart")
async def restart_listener(request: web.Request) -> web.Response:
    await request.app[CONTROL].restart_listener(*ids(request))
    return web.json_response({"status": "restarting"}, status=202)
