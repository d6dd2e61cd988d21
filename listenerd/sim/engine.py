"""A local event engine: accepts listenerd's envelope batches over real HTTP, with faults on demand.

It is what the forwarder's tests talk to and what `listenerd dev` prints with, so it checks what the
real engine would: the bearer token (when one is set), a JSON array body of envelopes with the
contract's fields. Faults are programmed, never random: a script of answers for the next requests
(`script`, `send_raw`), a per-request delay (a slow engine), holding every answer (`silence()`: a hung
engine), a body size bound (`max_body_bytes`: a larger body is answered 413), and refusing
connections (`refuse()`/`accept()`: the listening socket closes and reopens on the same port).
Like every simulator here: `async start() -> self`, `stop()`, `async with`, `url`,
`port`, `silence(on)`, `async send_raw(frame: str | bytes) -> int` (exactly those bytes as the next answer).

Standalone: `python -m listenerd.sim.engine --port 9000 [--token T]` prints each accepted envelope
as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ssl
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

ENVELOPE_FIELDS = ("id", "tenant-id", "listener-id", "source", "received-at", "event")


@dataclass
class Answer:
    """One scripted answer: status, headers, body (str or bytes as is, else JSON-encoded)."""

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None


@dataclass
class Request:
    """What the engine saw: arrival time (time.time()), status answered, envelopes in the body."""

    at: float
    status: int
    envelopes: list[dict[str, Any]]
    authorization: str | None


class EngineSim:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str | None = None, *,
                 path: str = "/1.0/events", on_events: Callable[[list[dict[str, Any]]], None] | None = None,
                 keep: bool = True, ssl_context: ssl.SSLContext | None = None, max_body_bytes: int | None = None):
        self.host = host
        self.port = port
        self.token = token
        self.path = path
        self.on_events = on_events
        self.ssl_context = ssl_context  # serve https with it (tests of the forwarder's TLS checks)
        self.keep = keep  # False: count and call on_events, but keep no envelopes (long runs, benchmarks)
        self.accepted = 0                          # envelopes accepted, kept or not
        self.received: list[dict[str, Any]] = []   # accepted envelopes, arrival order
        self.arrivals: list[float] = []            # time.time() of each accepted envelope's request
        self.requests: list[Request] = []          # every POST, answered or not
        self.delay = 0.0                           # seconds before answering each request
        self.max_body_bytes = max_body_bytes       # a larger request body is answered 413, as real engines do
        self._script: list[Answer] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self.changed = asyncio.Event()             # set on every request (tests await it)
        self._speaking = asyncio.Event()           # cleared while silenced: answers wait for it
        self._speaking.set()

    # -- lifecycle

    def make_app(self) -> web.Application:
        """The aiohttp app; a subclass may add routes (the benchmark adds a statistics route)."""
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_post(self.path, self._handle)
        return app

    async def start(self) -> EngineSim:
        app = self.make_app()
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        await self.accept()
        return self

    async def stop(self) -> None:
        self._speaking.set()  # let held answers go, so their connections close
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> EngineSim:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def refuse(self) -> None:
        """Close the listening socket: new connections are refused until `accept()`."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner else None
        for handler in server.connections if server else []:
            handler.force_close()  # kept-alive connections too: the client must see a network error

    async def accept(self) -> None:
        """(Re)open the listening socket, on the same port once one was chosen."""
        assert self._runner is not None
        if self._site is not None:
            return
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True,
                                 ssl_context=self.ssl_context)
        await self._site.start()
        if self.port == 0:
            server = self._site._server
            assert server is not None and server.sockets
            self.port = server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.host}:{self.port}{self.path}"

    # -- faults

    def script(self, answers: Iterable[Answer | tuple | int]) -> None:
        """Answer the next requests with these, in order (after any already scripted).

        Each is an `Answer`, a status code, or a tuple (status, headers[, body]).
        """
        for answer in answers:
            if isinstance(answer, int):
                answer = Answer(answer)
            elif isinstance(answer, tuple):
                answer = Answer(*answer)
            self._script.append(answer)

    def silence(self, on: bool = True) -> None:
        """Hold every answer (requests are read, nothing comes back) until `silence(False)`: a hung engine."""
        if on:
            self._speaking.clear()
        else:
            self._speaking.set()

    async def send_raw(self, frame: str | bytes) -> int:
        """Answer the next request (after any answers already scripted) with status 200 and exactly `frame`.

        Returns 1, the one answer that will carry it (other statuses: `script`).
        """
        self.script([Answer(200, {}, frame)])
        return 1

    def fail_next(self, count: int, status: int = 503, headers: dict[str, str] | None = None) -> None:
        self.script(Answer(status, dict(headers or {})) for _ in range(count))

    @property
    def scripted_left(self) -> int:
        return len(self._script)

    # -- reading back

    def ids(self) -> list[str]:
        return [e["id"] for e in self.received]

    def events(self, listener_id: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.received if listener_id is None or e["listener-id"] == listener_id]

    # -- the route

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        arrived = time.time()
        authorization = request.headers.get("Authorization")
        if self.delay:
            await asyncio.sleep(self.delay)
        await self._speaking.wait()
        envelopes, problem = _parse(raw, request.content_type)
        if self.token is not None and not hmac.compare_digest(
                (authorization or "").encode(), f"Bearer {self.token}".encode()):
            answer = Answer(401, {}, {"error": "missing or invalid bearer token"})
        elif self.max_body_bytes is not None and len(raw) > self.max_body_bytes:
            answer = Answer(413, {}, {"error": f"request body larger than {self.max_body_bytes} bytes"})
        elif self._script:
            answer = self._script.pop(0)
        elif problem:
            answer = Answer(400, {}, {"error": problem})
        else:
            answer = Answer(200, {}, {"accepted": len(envelopes)})
        self.requests.append(Request(arrived, answer.status, envelopes if self.keep else [], authorization))
        if 200 <= answer.status < 300 and not problem:
            self.accepted += len(envelopes)
            if self.keep:
                self.received.extend(envelopes)
                self.arrivals.extend([arrived] * len(envelopes))
            if self.on_events:
                self.on_events(envelopes)
        self.changed.set()
        body = answer.body
        if body is None:
            body = {"status": answer.status}
        raw = isinstance(body, str | bytes)
        payload = (body.encode() if isinstance(body, str) else body) if raw else orjson.dumps(body)
        content_type = "text/plain" if raw else "application/json"
        return web.Response(status=answer.status, body=payload, headers=answer.headers, content_type=content_type)


def _parse(raw: bytes, content_type: str) -> tuple[list[dict[str, Any]], str | None]:
    if content_type != "application/json":
        return [], "Content-Type must be application/json"
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], f"body is not JSON: {exc}"
    if not isinstance(body, list):
        return [], "body must be a JSON array of events"
    for index, envelope in enumerate(body):
        if not isinstance(envelope, dict):
            return [], f"[{index}]: must be an object"
        missing = [f for f in ENVELOPE_FIELDS if f not in envelope]
        if missing:
            return [], f"[{index}]: missing {', '.join(missing)}"
        if not isinstance(envelope["event"], dict):
            return [], f"[{index}].event: must be an object"
    return body, None


async def _serve(args: argparse.Namespace) -> None:
    def show(envelopes: list[dict[str, Any]]) -> None:
        out = sys.stdout.buffer
        for envelope in envelopes:
            out.write(orjson.dumps(envelope) + b"\n")
        out.flush()

    async with EngineSim(args.host, args.port, args.token, path=args.path, on_events=show) as sim:
        sys.stderr.write(f"engine simulator listening on {sim.url}\n")
        sys.stderr.flush()
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m listenerd.sim.engine",
                                     description="A local event engine that prints each envelope as a JSON line.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000, help="0 picks a free port (printed on stderr)")
    parser.add_argument("--token", default=None, help="require Authorization: Bearer TOKEN")
    parser.add_argument("--path", default="/1.0/events")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
