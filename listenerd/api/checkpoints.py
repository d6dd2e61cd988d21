"""Checkpoints: a Salesforce listener's stored resume point (replayId), read and set by operators."""

from __future__ import annotations

from aiohttp import web

from listenerd.api.app import DAEMON, json_body
from listenerd.api.errors import ApiError
from listenerd.api.listeners import BASE, find

routes = web.RouteTableDef()


@routes.get(BASE + "/{id}/checkpoint")
async def get_checkpoint(request: web.Request) -> web.Response:
    daemon, tenant_id, listener_id = request.app[DAEMON], request.match_info["tid"], request.match_info["id"]
    await find(daemon, tenant_id, listener_id)
    value = await daemon.store.get_checkpoint(tenant_id, listener_id)
    if value is None:
        raise ApiError(404, f"listener {listener_id!r} has no stored checkpoint")
    return web.json_response({"replay": int(value) if value.lstrip("-").isdigit() else value})


@routes.put(BASE + "/{id}/checkpoint")
async def set_checkpoint(request: web.Request) -> web.Response:
    daemon, tenant_id, listener_id = request.app[DAEMON], request.match_info["tid"], request.match_info["id"]
    spec = await find(daemon, tenant_id, listener_id)
    body = await json_body(request)
    replay = body.get("replay")
    if spec.type != "salesforce":
        raise ApiError(400, f"replay: only salesforce listeners have checkpoints ({listener_id!r} is {spec.type})",
                       fields=["replay"])
    if isinstance(replay, bool) or not isinstance(replay, int) or replay < -2:
        raise ApiError(400, "replay: must be a replayId (an integer >= 0), -1 (new events) or -2 (all retained)",
                       fields=["replay"])
    unknown = sorted(set(body) - {"replay"})
    if unknown:
        raise ApiError(400, f"{unknown[0]}: unknown field", fields=unknown)

    async def write() -> None:
        await daemon.store.set_checkpoint(tenant_id, listener_id, str(replay))

    # stop, then write, then start: the old run's last commit cannot overwrite the new checkpoint
    if not await daemon.supervisor.restart((tenant_id, listener_id), while_stopped=write, replay_from=str(replay)):
        await write()
    return web.json_response({"replay": replay})
