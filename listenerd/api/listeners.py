"""Listeners: create, retrieve, update, delete, list, restart, and their status.

Bodies are validated by the same model as the config file, so a bad body answers 400 naming the
field (`options.hash: required`). Objects declared in the config answer 409 to PUT and DELETE.
Every change is written to the store first, then the supervisor reconciles, so what the API made
survives a restart.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import ValidationError

from listenerd.api.app import DAEMON, json_body
from listenerd.api.errors import ApiError
from listenerd.config import format_errors
from listenerd.daemon import Daemon, load_listener, stored_listener
from listenerd.model import SAFE_ID, ListenerBase

routes = web.RouteTableDef()
BASE = "/1.0/tenants/{tid}/listeners"
_EDITABLE = ("name", "description", "status", "type", "options", "mapping")


def listener_json(spec: ListenerBase) -> dict[str, Any]:
    body = spec.dump()
    return {key: body[key] for key in ("id", "name", "description", "status", "type", "options", "mapping",
                                       "managed-by")}


async def find(daemon: Daemon, tenant_id: str, listener_id: str) -> ListenerBase:
    if not SAFE_ID.match(listener_id):
        raise ApiError(404, f"no listener {listener_id[:64]!r} in tenant {tenant_id!r}")
    for t, lid, body, managed_by in await daemon.store.objects("listeners"):
        if t == tenant_id and lid == listener_id:
            return load_listener(body, managed_by)
    raise ApiError(404, f"no listener {listener_id!r} in tenant {tenant_id!r}")


def validate(body: dict[str, Any]) -> ListenerBase:
    try:
        return load_listener(body, "api")
    except ValidationError as exc:
        problems = format_errors(exc)
        raise ApiError(400, "; ".join(str(p) for p in problems),
                       fields=[p.location for p in problems]) from None


@routes.get(BASE)
async def list_listeners(request: web.Request) -> web.Response:
    daemon, tenant_id = request.app[DAEMON], request.match_info["tid"]
    return web.json_response([listener_json(load_listener(body, m))
                              for t, _, body, m in await daemon.store.objects("listeners") if t == tenant_id])


@routes.post(BASE)
async def create_listener(request: web.Request) -> web.Response:
    daemon, tenant_id = request.app[DAEMON], request.match_info["tid"]
    body = await json_body(request)
    if "managed-by" in body:
        raise ApiError(400, "managed-by: set by listenerd, not by the API", fields=["managed-by"])
    given = body.get("id")
    if given is not None and not isinstance(given, str):
        raise ApiError(400, "id: must be a string", fields=["id"])
    spec = validate({**body, "id": given or "LI0"})  # a stand-in id until the store assigns one
    # assigned and inserted in one transaction: concurrent creates never share an id, a taken id is a 409
    # (never an overwrite), and an assigned LI<n> is above every id this tenant ever had
    listener_id = await daemon.store.insert_listener(
        tenant_id, given, lambda lid: stored_listener(spec.model_copy(update={"id": lid})))
    if listener_id is None:
        raise ApiError(409, f"id: listener {given!r} already exists in tenant {tenant_id!r}", fields=["id"])
    await daemon.apply()
    return web.json_response(listener_json(spec.model_copy(update={"id": listener_id})), status=201)


@routes.get(BASE + "/{id}")
async def get_listener(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    return web.json_response(listener_json(await find(daemon, request.match_info["tid"], request.match_info["id"])))


@routes.put(BASE + "/{id}")
async def update_listener(request: web.Request) -> web.Response:
    daemon, tenant_id, listener_id = request.app[DAEMON], request.match_info["tid"], request.match_info["id"]
    current = await find(daemon, tenant_id, listener_id)
    body = await json_body(request)
    if current.managed_by == "config":
        raise ApiError(409, f"listener {listener_id!r} is declared in the config file; change it there")
    if body.get("id", listener_id) != listener_id:
        raise ApiError(400, "id: cannot be changed", fields=["id"])
    unknown = sorted(set(body) - set(_EDITABLE) - {"id"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown or read-only field", fields=unknown)
    merged = {**stored_listener(current), **{k: v for k, v in body.items() if k in _EDITABLE}}
    spec = validate(merged)
    await daemon.store.put_object("listeners", tenant_id, listener_id, stored_listener(spec), "api")
    await daemon.apply()
    return web.json_response(listener_json(spec))


@routes.delete(BASE + "/{id}")
async def delete_listener(request: web.Request) -> web.Response:
    daemon, tenant_id, listener_id = request.app[DAEMON], request.match_info["tid"], request.match_info["id"]
    current = await find(daemon, tenant_id, listener_id)
    if current.managed_by == "config":
        raise ApiError(409, f"listener {listener_id!r} is declared in the config file; remove it there")
    await daemon.store.delete_object("listeners", tenant_id, listener_id)
    await daemon.store.set_checkpoint(tenant_id, listener_id, None)
    await daemon.apply()  # stops it at once; its undelivered events stay in the outbox and go on
    return web.Response(status=204)


@routes.get(BASE + "/{id}/status")
async def listener_status(request: web.Request) -> web.Response:
    daemon, tenant_id, listener_id = request.app[DAEMON], request.match_info["tid"], request.match_info["id"]
    record = daemon.supervisor.status((tenant_id, listener_id)) if daemon.supervisor else None
    if record is None:
        await find(daemon, tenant_id, listener_id)  # 404 when it does not exist
        raise ApiError(503, "the listener is not loaded yet; try again")
    return web.json_response(record.as_json())


@routes.post(BASE + "/{id}/restart")
async def restart_listener(request: web.Request) -> web.Response:
    daemon, tenant_id, listener_id = request.app[DAEMON], request.match_info["tid"], request.match_info["id"]
    await find(daemon, tenant_id, listener_id)
    await daemon.supervisor.restart((tenant_id, listener_id))
    return web.json_response({"status": "restarting"}, status=202)
