"""Dead letters: batches the engine refused (a 4xx other than 408/429), kept for an operator.

Listing shows the engine's status code and answer with the events exactly as they were sent. Status
code 0 marks a stored segment listenerd set aside itself because it failed its checksum (a damaged
store): its answer says so, and an envelope that no longer parses is kept as a JSON string.
Retry puts the events back into the outbox with their ids unchanged, so an engine that saw an
earlier attempt can still de-duplicate; discard deletes them for good. Tenant auth is done by the
app's middleware; ids are per daemon, and another tenant's id answers 404 like an unknown one.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from listenerd.api import paging
from listenerd.api.context import CONTROL, DAEMON
from listenerd.api.errors import ApiError
from listenerd.delivery.dead_letters import DeadLetter
from listenerd.model import LISTENER_TYPES
from listenerd.status import rfc3339

routes = web.RouteTableDef()
BASE = "/1.0/tenants/{tid}/dead-letters"


def _id(request: web.Request) -> int:
    raw = request.match_info["id"]
    if not raw.isdigit() or len(raw) > 18:
        raise ApiError(404, f"no dead letter {raw[:64]!r} in tenant {request.match_info['tid']!r}")
    return int(raw)


def _missing(request: web.Request) -> ApiError:
    return ApiError(404, f"no dead letter {request.match_info['id']!r} in tenant {request.match_info['tid']!r}")


def dead_letter_json(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as the API shows it: its events are the envelopes exactly as they were sent."""
    return {"id": str(letter.id), "listener-id": letter.listener_id, "status-code": letter.status_code,
            "response": letter.response, "failed-at": rfc3339(letter.failed_at), "events": orjson.loads(letter.events)}


@routes.get(BASE)
async def list_dead_letters(request: web.Request) -> web.Response:
    """A page, oldest first; `?listener-id=LI1` narrows to one listener, `?status-code=422` to one answer,
    `?type=pusher` to the tenant's listeners of that type (those it has now: a deleted listener has no type)."""
    daemon = request.app[DAEMON]
    query = request.query
    tenant_id = request.match_info["tid"]
    listener_id = query.get("listener-id") or None
    raw_code = query.get("status-code") or None
    if raw_code is not None and not (raw_code.isascii() and raw_code.isdigit() and len(raw_code) <= 3):
        raise ApiError(400, "status-code: must be an HTTP status code (0-999)", fields=["status-code"])
    kind = query.get("type") or None
    listener_ids = None
    if kind is not None:
        if kind not in LISTENER_TYPES:
            raise ApiError(400, f"type: unknown listener type {kind[:64]!r} (known: {', '.join(LISTENER_TYPES)})",
                           fields=["type"])
        listener_ids = [spec.id for spec in request.app[CONTROL].fleet.index.of_tenant(tenant_id)
                        if spec.type == kind]
    limit = paging.limit(query)
    after = paging.cursor(query, int)
    if listener_ids == []:
        return paging.answer(request, [], None)
    letters = await daemon.dead_letters.of_tenant(tenant_id, listener_id, after=after, limit=limit + 1,
                                                  status_code=int(raw_code) if raw_code is not None else None,
                                                  listener_ids=listener_ids)
    more = len(letters) > limit
    letters = letters[:limit]
    return paging.answer(request, [dead_letter_json(letter) for letter in letters], letters[-1].id if more else None)


@routes.get(BASE + "/{id}")
async def get_dead_letter(request: web.Request) -> web.Response:
    letter = await request.app[DAEMON].dead_letters.get(request.match_info["tid"], _id(request))
    if letter is None:
        raise _missing(request)
    return web.json_response(dead_letter_json(letter))


@routes.post(BASE + "/{id}/retry")
async def retry_dead_letter(request: web.Request) -> web.Response:
    queued = await request.app[DAEMON].dead_letters.requeue(request.match_info["tid"], _id(request))
    if queued is None:
        raise _missing(request)
    return web.json_response({"id": request.match_info["id"], "queued": queued}, status=202)


@routes.delete(BASE + "/{id}")
async def delete_dead_letter(request: web.Request) -> web.Response:
    if not await request.app[DAEMON].dead_letters.discard(request.match_info["tid"], _id(request)):
        raise _missing(request)
    return web.Response(status=204)
