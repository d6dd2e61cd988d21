"""The live tap: server-sent events carrying each normalized event of one listener as it passes.

A slow client never slows delivery: its queue is bounded, and when it misses events it is sent a
`missed` event with the count before the next delivered one.

In a cluster the events pass through the node that runs the listener's group: any other node
relays the owner's tap (a proxy to its `[cluster] advertise` address, with the caller's token), so
the tap works from every node; it ends when the group moves, and a client that reconnects follows it.
"""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
from aiohttp import web

from listenerd.api.context import CONTROL, DAEMON
from listenerd.api.errors import ApiError
from listenerd.api.listeners import BASE, ids

routes = web.RouteTableDef()
KEEPALIVE_SECONDS = 15.0


@routes.get(BASE + "/{id}/tap")
async def tap(request: web.Request) -> web.StreamResponse:
    hub, (tenant_id, listener_id) = request.app[DAEMON].tap, ids(request)
    await request.app[CONTROL].get_listener(tenant_id, listener_id)
    cluster = getattr(request.app[DAEMON], "cluster", None)
    if cluster is not None and not cluster.keeps(tenant_id, listener_id):
        return await _relay(request, cluster.owner_of(tenant_id, listener_id))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    sub = hub.subscribe(tenant_id, listener_id)
    try:
        await response.write(f": tapping {tenant_id}/{listener_id}\n\n".encode())
        while True:
            try:
                envelope = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_SECONDS)
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if envelope is None:  # listenerd is stopping
                await response.write(b"event: end\ndata: {\"reason\": \"listenerd is stopping\"}\n\n")
                break
            if sub.missed > sub.reported_missed:
                missed = sub.missed - sub.reported_missed
                sub.reported_missed = sub.missed
                await response.write(b"event: missed\ndata: " + orjson.dumps({"missed": missed}) + b"\n\n")
            await response.write(b"event: event\nid: " + envelope["id"].encode() + b"\ndata: "
                                 + orjson.dumps(envelope) + b"\n\n")
    except (ConnectionResetError, asyncio.CancelledError):
        pass
    finally:
        hub.unsubscribe(tenant_id, listener_id, sub)
    return response


async def _relay(request: web.Request, owner: tuple[str, str] | None) -> web.StreamResponse:
    """The owner node's tap of this listener, streamed through (a cluster node that does not run it)."""
    if owner is None:
        raise ApiError(503, "no node runs this listener right now; try again in a few seconds")
    node, advertise = owner
    if not advertise:
        raise ApiError(503, f"the listener runs on node {node}, which has no [cluster] advertise address; tap it there")
    headers = {"Authorization": request.headers.get("Authorization", "")}
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, \
            session.get(advertise.rstrip("/") + request.path_qs, headers=headers) as upstream:
        if upstream.status != 200:
            raise ApiError(upstream.status if upstream.status in (401, 403, 404) else 502,
                           f"node {node} answered the tap with {upstream.status}")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no", "X-Listenerd-Node": node})
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
        except (ConnectionResetError, aiohttp.ClientError, asyncio.CancelledError):
            pass
        return response
