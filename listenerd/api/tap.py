"""The live tap: server-sent events carrying each normalized event of one listener as it passes.

A slow client never slows delivery: its queue is bounded, and when it misses events it is sent a
`missed` event with the count before the next delivered one.
"""

from __future__ import annotations

import asyncio

import orjson
from aiohttp import web

from listenerd.api.context import CONTROL, DAEMON
from listenerd.api.listeners import BASE, ids

routes = web.RouteTableDef()
KEEPALIVE_SECONDS = 15.0


@routes.get(BASE + "/{id}/tap")
async def tap(request: web.Request) -> web.StreamResponse:
    hub, (tenant_id, listener_id) = request.app[DAEMON].tap, ids(request)
    await request.app[CONTROL].get_listener(tenant_id, listener_id)
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
