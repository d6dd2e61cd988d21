"""The aiohttp application factory: middleware for errors and auth, one module per resource.

Every route below `/1.0` needs `Authorization: Bearer <token>`; tokens are compared in constant
time, each against its configured value, and a token may use only its own tenants. The tenant in
the path is checked here once (401 no/bad token, 403 other tenant, 404 unknown tenant) so resource
handlers start from an authorized, existing tenant.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from listenerd.api import (
    checkpoints,
    console,
    dead_letters,
    health,
    integrations,
    listeners,
    metrics,
    openapi,
    overview,
    tap,
)
from listenerd.api.context import CONTROL, DAEMON, TOKEN, DaemonView
from listenerd.api.errors import ApiError, error_response, refused
from listenerd.control import Control, ControlError, TooMany
from listenerd.model import Token
from listenerd.net import sanitised
from listenerd.quotas import WriteQuota, retry_after
from listenerd.store_health import is_store_error

log = structlog.get_logger("listenerd.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RESOURCES = (health, metrics, listeners, integrations, checkpoints, dead_letters, tap, overview, openapi, console)
WRITES: web.AppKey[WriteQuota] = web.AppKey("writes")
_READS = ("GET", "HEAD", "OPTIONS")
_REASONS = {400: "bad request", 401: "missing or invalid bearer token", 403: "forbidden",
            404: "not found", 405: "method not allowed", 413: "request body too large",
            415: "unsupported media type"}


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every failure into a JSON error; a bug is a logged 500 without details."""
    try:
        return await handler(request)
    except ApiError as exc:
        response = exc.response()
    except ControlError as exc:
        response = refused(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else \
            _REASONS.get(exc.status, exc.reason)
        response = error_response(exc.status, message)
        if exc.status == 405:
            response.headers["Allow"] = exc.headers.get("Allow", "")
    except Exception as exc:
        if is_store_error(exc):  # a route that uses the store without the control (dead letters): 503, not 500
            op = "api-read" if request.method in ("GET", "HEAD") else "api-write"
            response = refused(request.app[CONTROL].unavailable(op, exc))
        else:
            log.exception("API handler failed", method=request.method, path=request.path)
            response = error_response(500, "internal error; see the daemon's log")
    request.app[DAEMON].metrics.api_errors.labels(str(response.status)).inc()
    return response


@web.middleware
async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith("/1.0/"):
        return await handler(request)
    daemon = request.app[DAEMON]
    token = authenticate(daemon.config.server.tokens, request.headers.get("Authorization", ""))
    if token is None:
        raise ApiError(401, "missing or invalid bearer token")
    request[TOKEN] = token
    tenant_id = request.match_info.get("tid")
    if tenant_id is not None:
        if not token.allows(tenant_id):
            raise ApiError(403, f"this token may not use tenant {tenant_id!r}")
        if daemon.config.tenant(tenant_id) is None:
            raise ApiError(404, f"no tenant {tenant_id!r}")
        if request.method not in _READS:
            limits = daemon.config.limits
            wait = request.app[WRITES].take(tenant_id, limits.tenant_write_rate, limits.tenant_write_burst)
            if wait:
                raise TooMany(f"tenant {tenant_id!r} is making writes faster than its limit "
                              f"(limits.tenant-write-rate {limits.tenant_write_rate:g}/s, burst "
                              f"{limits.tenant_write_burst}); retry after {retry_after(wait)}s", retry_after(wait))
    return await handler(request)


def authenticate(tokens: list[Token], header: str) -> Token | None:
    scheme, _, presented = header.partition(" ")
    if scheme.lower() != "bearer" or not presented:
        return None
    try:
        wanted = presented.strip().encode("utf-8")
    except UnicodeError:  # a header byte aiohttp decoded into a lone surrogate: no token has it
        return None
    found = None
    for token in tokens:  # compare against all: timing says nothing
        if hmac.compare_digest(token.token.encode(), wanted):
            found = token
    return found


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers a request it cannot parse (a bad header, a bad method) itself, in plain text, before any
    middleware: the same answer as JSON, with the parser's reason in short printable words."""

    __slots__ = ()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        plain = super().handle_error(request, status, exc, message)
        if status < 400 or status >= 500:
            return plain
        reason = sanitised((getattr(exc, "message", None) or message or "").split("\n", 1)[0], limit=120)
        response = error_response(status, f"malformed HTTP request: {reason or _REASONS.get(status, 'bad request')}")
        response.force_close()
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class ApiRunner(web.AppRunner):
    """The API's runner: its low-level HTTP errors are JSON like every other error."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        if type(server) is web.Server:
            server.__class__ = _JsonErrorServer
        return server


def create_app(daemon: DaemonView, control: Control) -> web.Application:
    app = web.Application(middlewares=[errors, auth], client_max_size=daemon.config.server.max_body_bytes)
    app[DAEMON] = daemon
    app[CONTROL] = control
    app[WRITES] = WriteQuota()
    app[metrics.RENDERING] = metrics.Page()
    for resource in RESOURCES:
        app.add_routes(resource.routes)
    return app
