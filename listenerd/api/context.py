"""What every resource module reads from its app: the daemon as the API sees it, the control, the body.

The API reaches the daemon only through these two: `DaemonView` (config, metrics, tap, dead
letters, readiness) and the `Control` that owns every change, so `api/` never imports `daemon.py`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from aiohttp import web

from listenerd.api.errors import ApiError
from listenerd.control import Control
from listenerd.delivery.dead_letters import DeadLetters
from listenerd.delivery.forwarder import Forwarder
from listenerd.delivery.outbox import Outbox
from listenerd.model import Config, Token
from listenerd.observability import Metrics
from listenerd.tap import TapHub


class DaemonView(Protocol):
    """The daemon, as much as the routes use; `config` is read per request, since a reload replaces it."""

    config: Config
    metrics: Metrics
    tap: TapHub
    dead_letters: DeadLetters
    outbox: Outbox
    forwarder: Forwarder | None
    ready: bool

    def components(self) -> dict[str, bool]:
        """Whether each part /readyz reports on is up."""
        ...


DAEMON: web.AppKey[DaemonView] = web.AppKey("daemon")
CONTROL: web.AppKey[Control] = web.AppKey("control")
TOKEN: web.RequestKey[Token] = web.RequestKey("token")  # the caller's token, set by the auth middleware


async def json_body(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong (the contract's code for a bad body)."""
    if request.content_type != "application/json":
        raise ApiError(400, "the body must be JSON, sent with Content-Type: application/json")
    server = request.app[DAEMON].config.server
    try:
        async with asyncio.timeout(server.header_timeout):  # a half-sent body must not hold the connection
            raw = await request.read()
    except TimeoutError:
        raise ApiError(408, f"the body did not arrive within {server.header_timeout:g}s "
                            f"(server.header-timeout)") from None
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(400, f"the body is too large: at most {request.app[DAEMON].config.server.max_body_bytes} "
                            f"bytes") from None
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "the body is not acceptable JSON: nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    if (where := _lone_surrogate(body, "")) is not None:
        raise ApiError(400, f"{where or 'body'}: not valid Unicode (a lone surrogate escape such as \\ud800)",
                       fields=[where] if where else None)
    return body


def _lone_surrogate(node: Any, where: str) -> str | None:
    """Where a string (or key) holding a lone UTF-16 surrogate is, which JSON allows and UTF-8 cannot store."""
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            return where
        return None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        path = f"{where}[{key}]" if isinstance(key, int) else (f"{where}.{key}" if where else str(key))
        if isinstance(key, str) and _lone_surrogate(key, path) is not None:
            return path
        if (found := _lone_surrogate(value, path)) is not None:
            return found
    return None
