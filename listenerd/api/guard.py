"""The API's door against slow and numerous clients: header and idle timeouts, a connection cap, and
accept errors logged at a bounded rate.

aiohttp waits for a request's headers as long as its keep-alive timeout (an hour by default) and
takes every connection it is offered, so 371 half-sent requests made the API unreachable, and
`accept()` failing with EMFILE wrote a log line per attempt (733 MB in 2 minutes). Here:

- a connection that has sent part of a request line or headers must complete them within
  `server.header-timeout`; one that sends nothing (or nothing more after an answer) is closed after
  `server.idle-timeout` (aiohttp's keep-alive timeout, which also runs from the first byte);
- a request body must arrive within `server.header-timeout` too (`api.context.json_body`);
- past `server.max-connections` open connections a new one gets a short 503 and is closed at once,
  so those already open (and the next ones, once some close) are served;
- accept errors (out of file descriptors) are logged once per `ACCEPT_LOG_EVERY` seconds with a count.

aiohttp has no hook for the first two, so the handler aiohttp builds for each connection is given
this module's subclass (same slots, a few hooks more) by the site's protocol factory.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

log = structlog.get_logger("listenerd.api")

BACKLOG = 1024  # connections the kernel holds for accept(): a burst past the cap is answered 503, not left waiting
ACCEPT_LOG_EVERY = 10.0  # seconds between two log lines about failing accept() calls
_REFUSAL_BODY = b'{"error": "too many connections; try again shortly"}'
_REFUSAL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
            b"Retry-After: 1\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSAL_BODY), _REFUSAL_BODY))
_ACCEPT_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class Guard:
    """Per-server limits and counts (one per daemon, so tests can run several in a process)."""

    def __init__(self, header_timeout: float, max_connections: int,
                 on_event: Callable[[str], None] | None = None, on_open: Callable[[int], None] | None = None):
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.on_event = on_event  # called with "refused" or "header-timeout" (the metric)
        self.on_open = on_open  # called with the count of open connections when it changes (the gauge)
        self._open = 0
        self.timers: dict[int, asyncio.TimerHandle] = {}  # id(handler) -> its header deadline

    @property
    def open(self) -> int:
        return self._open

    @open.setter
    def open(self, value: int) -> None:
        self._open = value
        if self.on_open is not None:
            self.on_open(value)

    def counted(self, kind: str) -> None:
        if self.on_event is not None:
            self.on_event(kind)


class GuardedHandler(RequestHandler):
    """aiohttp's handler with a connection cap at `connection_made` and a header deadline in `data_received`."""

    __slots__ = ()
    guard: Guard  # set on the subclass `GuardedSite.start` makes for its site

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self.guard
        if guard.open >= guard.max_connections:
            guard.counted("refused")
            self._manager = None  # never registered: its connection_lost has nothing to undo
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_REFUSAL)
            transport.close()
            return
        guard.open += 1
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._manager is not None:
            self.guard.open -= 1
        self._clear_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._messages or self._force_close or self._request_in_progress:
            # a whole request arrived, the bytes are a body being read (its bound: json_body), or it is closing
            self._clear_deadline()
        elif data and id(self) not in self.guard.timers:  # part of a request line or headers
            self.guard.timers[id(self)] = self._loop.call_later(self.guard.header_timeout, self._headers_late)

    def _clear_deadline(self) -> None:
        timer = self.guard.timers.pop(id(self), None)
        if timer is not None:
            timer.cancel()

    def _headers_late(self) -> None:
        self.guard.timers.pop(id(self), None)
        if not self._messages and not self._request_in_progress and not self._force_close:
            self.guard.counted("header-timeout")
            self.force_close()
            if self.transport is not None:
                self.transport.close()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are `GuardedHandler`s under `guard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: Guard):
        super().__init__(runner, host, port, reuse_address=True)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        server = self._runner.server
        assert server is not None
        classes: dict[type, type] = {}  # the runner's own handler class (e.g. JSON errors) under our hooks

        def make() -> RequestHandler:
            handler = server()
            base = type(handler)
            if (handler_class := classes.get(base)) is None:
                handler_class = classes[base] = type("GuardedHandler", (GuardedHandler, base),
                                                     {"__slots__": (), "guard": self.guard})
            handler.__class__ = handler_class  # same slots: aiohttp's own construction, our hooks
            return handler

        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(make, self._host, self._port, reuse_address=True, backlog=BACKLOG)
        sockets = self._server.sockets
        if sockets:
            self._bound_port = sockets[0].getsockname()[1]


class AcceptErrorLog:
    """A loop exception handler that logs failing `accept()` calls at a bounded rate; the rest as before."""

    def __init__(self, every: float = ACCEPT_LOG_EVERY, clock: Callable[[], float] = time.monotonic,
                 on_error: Callable[[], None] | None = None):
        self.every = every
        self.clock = clock
        self.on_error = on_error
        self.suppressed = 0
        self.lines = 0
        self._last: float | None = None

    @staticmethod
    def is_accept_error(context: dict[str, Any]) -> bool:
        exc = context.get("exception")
        return isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS and (
            "accept" in str(context.get("message", "")) or isinstance(context.get("socket"), socket.socket))

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not self.is_accept_error(context):
            loop.default_exception_handler(context)
            return
        if self.on_error is not None:
            self.on_error()
        now = self.clock()
        if self._last is not None and now - self._last < self.every:
            self.suppressed += 1
            return
        exc = context["exception"]
        log.error("the API cannot accept connections: out of resources (file descriptors?); new connections wait",
                  error=f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}",
                  similar_since_last_line=self.suppressed)
        self.lines += 1
        self.suppressed = 0
        self._last = now
