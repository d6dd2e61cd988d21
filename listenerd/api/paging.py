"""Pages of a list: `limit` and an opaque `cursor` in, the next page's URL in a `Link` header out.

Lists stay bare JSON arrays (the contract); where the next page is lives in `Link: <...>; rel="next"`,
absent on the last page. A cursor is the position after the last item of a page (an id), encoded so
that clients treat it as opaque: a page that starts there sees every later item once, whatever
was inserted or deleted meanwhile. A bad limit or cursor is a 400 naming it.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from listenerd.api.errors import ApiError
from listenerd.control import DEFAULT_LIMIT, MAX_LIMIT


def limit(query: Mapping[str, str]) -> int:
    raw = query.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 6 and 1 <= int(raw) <= MAX_LIMIT):
        raise ApiError(400, f"limit: must be a whole number from 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})",
                       fields=["limit"])
    return int(raw)


def cursor(query: Mapping[str, str], kind: type[str] | type[int]) -> Any:
    """The position (a `kind`) a `cursor` parameter names (None: from the start); 400 when it is not one we gave."""
    raw = query.get("cursor")
    if raw is None or raw == "":
        return None
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (binascii.Error, ValueError, orjson.JSONDecodeError):
        decoded = None
    after = decoded.get("after") if isinstance(decoded, dict) else None
    if type(after) is not kind or (isinstance(after, int) and not 0 <= after < 2**62) \
            or (isinstance(after, str) and len(after) > 200):
        raise ApiError(400, "cursor: not a cursor this API gave out; use the Link header's URL of the previous page",
                       fields=["cursor"])
    return decoded["after"]


def encode(after: str | int) -> str:
    return base64.urlsafe_b64encode(orjson.dumps({"after": after})).decode().rstrip("=")


def answer(request: web.Request, items: list[Any], next_after: str | int | None) -> web.Response:
    """The page as a bare JSON array; when `next_after` is given, a `Link` to the page after it."""
    response = web.json_response(items)
    if next_after is not None:
        url = request.rel_url.update_query(cursor=encode(next_after))
        response.headers["Link"] = f'<{url}>; rel="next"'
    return response
