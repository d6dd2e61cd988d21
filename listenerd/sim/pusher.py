"""A Pusher Channels server on loopback, faithful enough that real Pusher clients accept it.

(One module past 400 lines on purpose: the WebSocket side, the signed HTTP API and the faults share
one app's state, its connections and channels, and read best together.)

Why: listenerd's Pusher source, `listenerd dev` and the tests need a Pusher that can be told to
misbehave. The simulator speaks the WebSocket protocol (7, and 5-6 so Pysher works) at
`/app/{key}` and the HTTP events API (`POST /apps/{app_id}/events` and `/batch_events`, signed as
the official `pusher` library signs them) on ONE port, both served by aiohttp. Peer tests check it
against Pysher, pusher-js and the official `pusher` HTTP library.

Faithful behaviour: `pusher:connection_established` with `socket_id` and `activity_timeout`; the
server pings a silent client after `activity_timeout` and closes 4201 when no pong follows within
`pong_timeout`; `pusher:ping` is answered with `pusher:pong`; private and presence subscriptions
are checked against `key:HMAC-SHA256(secret, socket_id:channel[:channel_data])` and refused with
`pusher:subscription_error` (status 401) as soketi does; an unknown app key gets `pusher:error`
4001 and a 4001 close; event `data` is a JSON string (double encoding), as Pusher sends it.

Each connection has its own outgoing queue and writer task, as a real server has per-socket
buffers: a slow client never slows the others, and frames published before a scripted close are
sent before it.

Limits, as Pusher enforces them: `max_connections` concurrent connections per app (None: no limit);
past it a new socket gets `pusher:error` 4004 "Over connection quota" and a 4004 close, as Pusher
closes a connection over the plan's quota. `open_connections` and `peak_connections` count them for
tests. Encrypted channels need nothing of the server: the publisher encrypts (the official `pusher`
library with `encryption_master_key_base64`), the server relays the `{"nonce","ciphertext"}` string.

Fault injection (for tests): `close_all(code)`, `drop_all()` (no close frame), `silence()`,
`send_raw(frame)` (malformed frames), `send_oversized(n)`, `refuse_connections(status)` (HTTP status
at the handshake), `stop_listening()`/`resume_listening()` (TCP connection refused),
`close_on_connect(code)`, `reject_subscriptions(channel)`, `hold_subscriptions(channel)` (subscribed,
but `subscription_succeeded` withheld until `release_subscriptions()`: events published meanwhile
arrive before the confirmation, as they can on a busy Pusher cluster). Like every simulator here: `async start()
-> self`, `stop()`, `async with`, `url`, `port`, `silence(on)`, `async send_raw(frame: str | bytes) -> int`
(exactly those bytes to every socket; how many it reached).

Use in-process (same event loop, e.g. `listenerd dev`):

    async with PusherSim("12345", "app-key", "app-secret") as sim:  # the pusher library wants a numeric app id
        await sim.publish("orders", "created", {"id": 1})          # sim.port: the bound port (0 picks one)

Standalone: `python -m listenerd.sim.pusher --port 6001 [--channel demo --every 2]` serves until
interrupted and, with `--channel`, publishes a demo event every `--every` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import itertools
import json
import random
import ssl
import struct
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from listenerd.sim.record import ConnectionRecord

SUPPORTED_PROTOCOLS = (5, 6, 7)
TIMESTAMP_GRACE = 600  # seconds, as Pusher allows


def _dumps(value: Any) -> str:
    """Compact JSON; orjson because the simulator encodes every event twice (data, then frame)."""
    return orjson.dumps(value).decode()


def _frame(event: str, data: Any, channel: str | None = None, user_id: str | None = None) -> str:
    body: dict[str, Any] = {"event": event}
    if channel is not None:
        body["channel"] = channel
    body["data"] = data
    if user_id is not None:
        body["user_id"] = user_id  # who sent a client event on a presence channel, as Pusher adds it
    return _dumps(body)


def sign_channel(key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    subject = f"{socket_id}:{channel}" + (f":{channel_data}" if channel_data is not None else "")
    return f"{key}:" + hmac.new(secret.encode(), subject.encode(), hashlib.sha256).hexdigest()


@dataclass
class SubscribeRecord:
    """One `pusher:subscribe` the server saw, for tests that check signatures per connection."""

    socket_id: str
    channel: str
    auth: str | None
    ok: bool
    at: float = field(default_factory=time.monotonic)


_CLOSE = object()
_BATCH_BYTES = 64 * 1024
_WRITE_HIGH = 256 * 1024


def _text_frame(payload: bytes) -> bytes:
    """A final, unmasked server-to-client text frame (RFC 6455 section 5.2)."""
    n = len(payload)
    if n < 126:
        return bytes((0x81, n)) + payload
    if n < 65536:
        return struct.pack("!BBH", 0x81, 126, n) + payload
    return struct.pack("!BBQ", 0x81, 127, n) + payload


class SimConnection:
    """One client socket: its channels, its outgoing queue and its liveness bookkeeping."""

    def __init__(self, sim: PusherSim, ws: web.WebSocketResponse, request: web.Request, socket_id: str,
                 protocol: int):
        self.sim = sim
        self.ws = ws
        self.transport = request.transport
        self.socket_id = socket_id
        self.protocol = protocol
        self.query = dict(request.query)
        self.channels: set[str] = set()
        self.presence: dict[str, str] = {}  # channel -> user_id
        self.last_rx = time.monotonic()
        self.ping_sent_at: float | None = None
        self.silent = False  # a black hole: nothing is sent, nothing is answered
        self.pongs = 0  # pusher:pong frames received (answers to the server's pings)
        self.closing = False
        self._queue: deque[Any] = deque()
        self._wake = asyncio.Event()
        self.writer = asyncio.create_task(self._write_loop(), name=f"pusher-sim-writer:{socket_id}")
        self.closed = asyncio.Event()
        self.accepted = False  # counted against the app's connection quota
        self.record = ConnectionRecord(request.headers.get("User-Agent", ""), request.match_info.get("key", ""))

    def send(self, frame: Any) -> None:
        """Queue a frame (text, bytes, or a close/drop marker) behind everything queued before."""
        if self.silent:
            return  # a black-holed connection: nothing reaches the client
        self._queue.append(frame)
        self._wake.set()

    def close(self, code: int, reason: str = "") -> None:
        """Close after the frames already queued; nothing published later reaches this socket."""
        self.closing = True
        self.send((_CLOSE, code, reason))

    def drop(self) -> None:
        self.closing = True
        self._queue.clear()
        if self.transport is not None:
            self.transport.abort()

    def _write_batch(self) -> bool:
        """Write a run of queued text frames in one transport write, as a busy server coalesces them.

        The frames are plain unmasked text frames with RSV1 clear, valid whatever extension was
        negotiated (permessage-deflate allows uncompressed messages). False when there is no transport.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        chunks: list[bytes] = []
        size = 0
        queue = self._queue
        while queue and isinstance(queue[0], str) and size < _BATCH_BYTES:
            payload = queue.popleft().encode()
            chunks.append(_text_frame(payload))
            size += len(payload)
        transport.write(b"".join(chunks))
        return True

    async def _drain(self) -> None:
        """Let other tasks run, and wait while this client is slow (its write buffer is over the mark)."""
        await asyncio.sleep(0)
        transport = self.transport
        # A transport offers no public awaitable drain outside aiohttp's writer: poll, only when slow.
        while transport is not None and not transport.is_closing() and (  # noqa: ASYNC110
                transport.get_write_buffer_size() > _WRITE_HIGH):
            await asyncio.sleep(0.005)

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                while self._queue:
                    if len(self._queue) > 1 and isinstance(self._queue[0], str) and self._write_batch():
                        await self._drain()
                        continue
                    frame = self._queue.popleft()
                    if isinstance(frame, str):
                        await self.ws.send_str(frame)
                    elif isinstance(frame, bytes):
                        await self.ws.send_bytes(frame)
                    elif isinstance(frame, tuple) and frame[0] is _CLOSE:
                        self._queue.clear()
                        await self.ws.close(code=frame[1], message=frame[2].encode()[:120])
                        return
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            return


class PusherSim:
    """A Pusher app server: one app (`app_id`, `key`, `secret`), WebSocket and HTTP API on one port."""

    def __init__(self, app_id: str = "12345", key: str = "app-key", secret: str = "app-secret", *,
                 host: str = "127.0.0.1", port: int = 0, activity_timeout: float = 120.0,
                 pong_timeout: float = 30.0, max_payload: int = 10_240, client_events: bool = True,
                 backlog: int = 4096, ssl_context: ssl.SSLContext | None = None,
                 max_connections: int | None = None):
        self.app_id = app_id
        self.key = key
        self.secret = secret
        self.host = host
        self.port = port
        self.activity_timeout = activity_timeout
        self.pong_timeout = pong_timeout
        self.max_payload = max_payload
        self.client_events = client_events
        self.backlog = backlog
        self.ssl_context = ssl_context  # serve wss:// and https:// (tests of TLS verification)
        self.connections: list[SimConnection] = []
        self.connection_log: list[ConnectionRecord] = []  # every connection ever made, closed ones too
        self.subscriptions: list[SubscribeRecord] = []
        self.unsubscriptions: list[tuple[str, str]] = []  # (socket_id, channel) of each pusher:unsubscribe
        self.published = 0  # channel events accepted (HTTP API and publish())
        self.http_rejected: list[tuple[int, str]] = []  # (status, error) of refused HTTP API calls
        self.connects = 0  # WebSocket handshakes accepted
        self.max_connections = max_connections  # concurrent connections per app (None: no limit)
        self.peak_connections = 0  # most accepted connections open at once
        self.quota_refusals = 0  # connections closed 4004 over the quota
        self._held: dict[str, list[tuple[SimConnection, str]]] = {}  # channel -> withheld confirmations
        self._refuse_status: int | None = None
        self._close_on_connect: tuple[int, str] | None = None
        self._reject: dict[str, tuple[int, str]] = {}
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        """Base URL of the HTTP API and the WebSocket endpoint (`ws://host:port/app/{key}`)."""
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    def ws_url(self, protocol: int = 7) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        return f"{scheme}://{self.host}:{self.port}/app/{self.key}?protocol={protocol}&client=sim&version=0"

    async def start(self) -> PusherSim:
        app = web.Application(client_max_size=max(self.max_payload * 200, 1 << 20), middlewares=[_api_errors])
        app.router.add_get("/app/{key}", self._ws_handler)
        app.router.add_post("/apps/{app_id}/events", self._events_handler)
        app.router.add_post("/apps/{app_id}/batch_events", self._batch_handler)
        app.router.add_get("/apps/{app_id}/channels", self._channels_handler)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        await self.resume_listening()
        self._sweeper = asyncio.create_task(self._sweep(), name="pusher-sim-sweeper")
        return self

    async def stop(self) -> None:
        """Close every socket with 4200 (as a Pusher server going down does) and stop listening."""
        if self._sweeper:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.silent = False
            conn.close(4200, "Server is shutting down")
        if self.connections:
            await asyncio.wait([asyncio.ensure_future(c.closed.wait()) for c in self.connections], timeout=2)
        for conn in list(self.connections):
            conn.drop()
        if self._runner:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def __aenter__(self) -> PusherSim:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ------------------------------------------------------------ publishing

    async def publish(self, channel: str, event: str, data: Any, socket_id: str | None = None) -> int:
        """Send a channel event to every subscriber (except `socket_id`); returns how many got it.

        `data` that is not a string is JSON-encoded first, exactly as the `pusher` library does,
        so clients see the double encoding real Pusher produces.
        """
        return self._deliver(channel, event, data if isinstance(data, str) else _dumps(data), socket_id)

    def _deliver(self, channel: str, event: str, data: str, exclude: str | None = None,
                 user_id: str | None = None) -> int:
        self.published += 1
        frame = _frame(event, data, channel, user_id)
        sent = 0
        for conn in self.connections:
            if channel in conn.channels and conn.socket_id != exclude and not conn.closing:
                conn.send(frame)
                sent += 1
        return sent

    def subscribers(self, channel: str) -> list[SimConnection]:
        return [c for c in self.connections if channel in c.channels and not c.closing]

    async def wait_subscribed(self, channel: str, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until at least `count` successful subscriptions to `channel` were ever made."""
        deadline = time.monotonic() + timeout
        while sum(1 for s in self.subscriptions if s.channel == channel and s.ok) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no {count} subscriptions to {channel} within {timeout}s")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    # ------------------------------------------------------------ fault injection

    def close_all(self, code: int, reason: str = "") -> None:
        """Close every socket with `code` after the frames already queued for it."""
        for conn in list(self.connections):
            conn.close(code, reason)

    def drop_all(self) -> None:
        """Cut every socket without a close frame (the client sees 1006)."""
        for conn in list(self.connections):
            conn.drop()

    def silence(self, on: bool = True) -> None:
        """Make the current sockets black holes: nothing sent (events, pongs, pings), nothing answered,
        never closed. New connections behave normally, as after a dead network path."""
        for conn in self.connections:
            conn.silent = on

    async def send_raw(self, frame: str | bytes) -> int:
        """Send `frame` exactly as given to every socket (str: a text frame, bytes: a binary one); returns how many."""
        for conn in self.connections:
            conn.send(frame)
        return len(self.connections)

    async def send_oversized(self, size: int, channel: str | None = None) -> int:
        """Send a channel event frame of at least `size` bytes to every socket; returns how many."""
        filler = "x" * size
        for conn in self.connections:
            target = channel or next(iter(conn.channels), "none")
            conn.send(_frame("oversized", _dumps({"filler": filler}), target))
        return len(self.connections)

    async def stop_listening(self) -> None:
        """Close the listening socket: new connections are refused (TCP) until `resume_listening()`.
        Open sockets stay up; add `drop_all()` for a server that went away entirely."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def resume_listening(self) -> None:
        """(Re)open the listening socket, on the same port once one was chosen."""
        assert self._runner is not None, "start() first"
        if self._site is not None:
            return
        self._site = web.TCPSite(self._runner, self.host, self.port, backlog=self.backlog,
                                 ssl_context=self.ssl_context, reuse_address=True)
        await self._site.start()
        if self.port == 0:
            server = self._site._server
            assert server is not None and getattr(server, "sockets", None)
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def refuse_connections(self, status: int | None = 503) -> None:
        """Answer new WebSocket handshakes with this HTTP status (None: accept again)."""
        self._refuse_status = status

    def close_on_connect(self, code: int | None, reason: str = "") -> None:
        """Accept new sockets, then send `pusher:error` and close with `code` (None: behave again)."""
        self._close_on_connect = None if code is None else (code, reason)

    @property
    def open_connections(self) -> int:
        """Accepted connections open now (what Pusher counts against the quota)."""
        return sum(1 for c in self.connections if c.accepted and not c.closing)

    def hold_subscriptions(self, channel: str) -> None:
        """Subscribe to `channel` but withhold `pusher_internal:subscription_succeeded` until released."""
        self._held.setdefault(channel, [])

    def release_subscriptions(self, channel: str) -> None:
        """Send the withheld confirmations for `channel`, and confirm at once from now on."""
        for conn, frame in self._held.pop(channel, []):
            conn.send(frame)

    def reject_subscriptions(self, channel: str | None, status: int = 401,
                             error: str = "The connection is unauthorized.") -> None:
        """Refuse subscriptions to `channel` with a `pusher:subscription_error`; None clears all."""
        if channel is None:
            self._reject.clear()
        else:
            self._reject[channel] = (status, error)

    # ------------------------------------------------------------ WebSocket

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if self._refuse_status is not None:
            return web.json_response({"error": "connection refused by the simulator"}, status=self._refuse_status)
        ws = web.WebSocketResponse(autoping=True, heartbeat=None, max_msg_size=1 << 20, timeout=2.0)
        try:
            await ws.prepare(request)
        except ConnectionResetError:  # the client went while the upgrade was answered: nothing to serve
            return ws
        socket_id = f"{random.randint(10**8, 10**9 - 1)}.{next(self._ids)}"
        raw_protocol = request.query.get("protocol")
        protocol = int(raw_protocol) if raw_protocol and raw_protocol.isdigit() else 0
        conn = SimConnection(self, ws, request, socket_id, protocol)
        self.connections.append(conn)
        self.connection_log.append(conn.record)
        try:
            refusal = self._handshake_refusal(request.match_info["key"], raw_protocol, protocol)
            if refusal is None and self.max_connections is not None and self.open_connections >= self.max_connections:
                refusal = 4004, "Over connection quota"
                self.quota_refusals += 1
            if refusal:
                code, message = refusal
                conn.send(_frame("pusher:error", {"code": code, "message": message}))
                conn.close(code, message)
            else:
                self.connects += 1
                conn.accepted = True
                self.peak_connections = max(self.peak_connections, self.open_connections)
                timeout = self.activity_timeout
                shown = int(timeout) if timeout == int(timeout) else timeout
                conn.send(_frame("pusher:connection_established",
                                 _dumps({"socket_id": socket_id, "activity_timeout": shown})))
            self._changed.set()
            async for msg in ws:
                conn.last_rx = time.monotonic()
                conn.ping_sent_at = None
                if refusal or conn.silent:
                    continue
                if msg.type == WSMsgType.TEXT:
                    self._on_text(conn, msg.data)
                elif msg.type == WSMsgType.BINARY:
                    conn.send(_frame("pusher:error", {"code": None, "message": "Binary frames are not supported"}))
        finally:
            self.connections.remove(conn)
            conn.record.close()
            self._forget(conn)
            conn.writer.cancel()
            conn.closed.set()
            self._changed.set()
        return ws

    def _handshake_refusal(self, key: str, raw_protocol: str | None, protocol: int) -> tuple[int, str] | None:
        if key != self.key:
            return 4001, f"App key {key} not in this cluster. Did you forget to specify the cluster?"
        if raw_protocol is None:
            return 4008, "No protocol version supplied"
        if protocol not in SUPPORTED_PROTOCOLS:
            return 4007, f"Unsupported protocol version {raw_protocol}"
        if self._close_on_connect:
            return self._close_on_connect
        return None

    def _on_text(self, conn: SimConnection, text: str) -> None:
        try:
            msg = json.loads(text)
            event = msg["event"]
        except (ValueError, TypeError, KeyError):
            conn.send(_frame("pusher:error", {"code": None, "message": "Invalid JSON or missing event"}))
            return
        data = msg.get("data")
        if isinstance(data, str) and event.startswith("pusher:") and data.startswith("{"):
            try:
                data = json.loads(data)
            except ValueError:
                pass
        if event == "pusher:ping":
            conn.send(_frame("pusher:pong", {}))
        elif event == "pusher:pong":
            conn.pongs += 1
        elif event == "pusher:subscribe":
            self._subscribe(conn, data if isinstance(data, dict) else {})
        elif event == "pusher:unsubscribe":
            channel = data.get("channel") if isinstance(data, dict) else None
            self.unsubscriptions.append((conn.socket_id, str(channel)))
            self._changed.set()
            if channel in conn.channels:
                conn.channels.discard(channel)
                conn.record.unsubscribe(channel)
                self._left_presence(conn, channel)
        elif event.startswith("client-"):
            self._client_event(conn, event, msg.get("channel"), data)
        else:
            conn.send(_frame("pusher:error", {"code": None, "message": f"Unsupported event {event}"}))

    def _subscribe(self, conn: SimConnection, data: dict[str, Any]) -> None:
        channel = data.get("channel")
        if not isinstance(channel, str) or not channel:
            conn.send(_frame("pusher:error", {"code": None, "message": "Subscription requires a channel"}))
            return
        auth = data.get("auth")
        channel_data = data.get("channel_data")
        error = self._check_subscription(conn, channel, auth, channel_data)
        self.subscriptions.append(SubscribeRecord(conn.socket_id, channel, auth, error is None))
        self._changed.set()
        if error is not None:
            status, message = error
            conn.send(_frame("pusher:subscription_error",
                             {"type": "AuthError", "error": message, "status": status}, channel))
            return
        conn.channels.add(channel)
        conn.record.subscribe(channel)
        if channel.startswith("presence-"):
            user = json.loads(channel_data)
            user_id = str(user["user_id"])
            conn.presence[channel] = user_id
            members = {c.presence[channel]: {} for c in self.subscribers(channel) if channel in c.presence}
            members[user_id] = user.get("user_info") or {}
            self._confirm(conn, channel, _frame("pusher_internal:subscription_succeeded", _dumps(
                {"presence": {"ids": list(members), "hash": members, "count": len(members)}}), channel))
            added = _frame("pusher_internal:member_added", _dumps(
                {"user_id": user_id, "user_info": user.get("user_info") or {}}), channel)
            for other in self.subscribers(channel):
                if other is not conn:
                    other.send(added)
        else:
            self._confirm(conn, channel, _frame("pusher_internal:subscription_succeeded", "{}", channel))

    def _confirm(self, conn: SimConnection, channel: str, frame: str) -> None:
        held = self._held.get(channel)
        if held is not None:
            held.append((conn, frame))
        else:
            conn.send(frame)

    def _check_subscription(self, conn: SimConnection, channel: str, auth: Any,
                            channel_data: Any) -> tuple[int, str] | None:
        if channel in self._reject:
            return self._reject[channel]
        if channel.startswith("presence-"):
            if not isinstance(channel_data, str):
                return 401, "Presence subscriptions require channel_data"
            try:
                user = json.loads(channel_data)
                assert isinstance(user, dict) and "user_id" in user
            except (ValueError, AssertionError):
                return 401, "channel_data must be JSON with a user_id"
            expected = sign_channel(self.key, self.secret, conn.socket_id, channel, channel_data)
        elif channel.startswith("private-"):
            expected = sign_channel(self.key, self.secret, conn.socket_id, channel)
        else:
            return None
        if not isinstance(auth, str) or not hmac.compare_digest(auth, expected):
            subject = f"{conn.socket_id}:{channel}" + (":<channel_data>" if channel.startswith("presence-") else "")
            return 401, f"Invalid signature: Expected HMAC SHA256 hex digest of {subject}, but got {auth}"
        return None

    def _client_event(self, conn: SimConnection, event: str, channel: Any, data: Any) -> None:
        if not (self.client_events and isinstance(channel, str) and channel in conn.channels
                and channel.startswith(("private-", "presence-"))):
            conn.send(_frame("pusher:error", {"code": 4301, "message": "Client event rejected"}))
            return
        self._deliver(channel, event, data if isinstance(data, str) else _dumps(data), exclude=conn.socket_id,
                      user_id=conn.presence.get(channel))

    def _forget(self, conn: SimConnection) -> None:
        for channel in list(conn.presence):
            self._left_presence(conn, channel)

    def _left_presence(self, conn: SimConnection, channel: str) -> None:
        user_id = conn.presence.pop(channel, None)
        if user_id is None:
            return
        removed = _frame("pusher_internal:member_removed", _dumps({"user_id": user_id}), channel)
        for other in self.subscribers(channel):
            if other is not conn:
                other.send(removed)

    async def _sweep(self) -> None:
        """Ping clients silent for `activity_timeout`; close 4201 when no pong follows in time."""
        interval = max(0.02, min(self.activity_timeout, self.pong_timeout, 1.0) / 4)
        ping = _frame("pusher:ping", {})
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for conn in self.connections:
                if conn.silent:
                    continue
                if conn.ping_sent_at is not None:
                    if now - conn.ping_sent_at >= self.pong_timeout:
                        conn.ping_sent_at = float("inf")  # close once
                        conn.close(4201, "Pong reply not received")
                elif now - conn.last_rx >= self.activity_timeout:
                    conn.ping_sent_at = now
                    conn.send(ping)

    # ------------------------------------------------------------ HTTP API

    def _verify(self, request: web.Request, body: bytes) -> str | None:
        """The reason a signed API request is refused, or None (pusher HTTP API auth, version 1.0)."""
        if request.match_info["app_id"] != self.app_id:
            return "Unknown app_id"
        params = dict(request.query)
        signature = params.pop("auth_signature", None)
        if params.get("auth_key") != self.key:
            return "Unknown auth_key"
        if params.get("auth_version") != "1.0":
            return "auth_version must be 1.0"
        try:
            timestamp = int(params.get("auth_timestamp", ""))
        except ValueError:
            return "auth_timestamp missing"
        if abs(time.time() - timestamp) > TIMESTAMP_GRACE:
            return "Timestamp expired: given timestamp is more than 600s from the server time"
        if body and params.get("body_md5") != hashlib.md5(body).hexdigest():
            return "body_md5 does not match the body"
        string_to_sign = "\n".join([request.method, request.path,
                                    "&".join(f"{k}={v}" for k, v in sorted(params.items()))])
        expected = hmac.new(self.secret.encode(), string_to_sign.encode(), hashlib.sha256).hexdigest()
        if not isinstance(signature, str) or not hmac.compare_digest(signature, expected):
            return f"Invalid signature: you should have sent HmacSHA256Hex({string_to_sign!r}, your_secret_key)"
        return None

    async def _authorized_json(self, request: web.Request) -> Any:
        body = await request.read()
        problem = self._verify(request, body)
        if problem:
            status = 404 if problem == "Unknown app_id" else 401
            self.http_rejected.append((status, problem))
            raise _ApiError(status, problem)
        if request.method == "GET":
            return None
        try:
            return json.loads(body)
        except ValueError:
            raise _http_error(400, "Body is not JSON") from None

    def _validate_event(self, item: Any, channel_key: str) -> tuple[list[str], str, str, str | None]:
        if not isinstance(item, dict):
            raise _http_error(400, "Event must be an object")
        name, data = item.get("name"), item.get("data")
        channels = item.get(channel_key)
        if channel_key == "channels" and channels is None and isinstance(item.get("channel"), str):
            channels = [item["channel"]]
        if isinstance(channels, str):
            channels = [channels]
        if not isinstance(name, str) or not name or len(name) > 200:
            raise _http_error(400, "name must be a string of 1-200 characters")
        if not isinstance(data, str):
            raise _http_error(400, "data must be a string")
        if len(data.encode()) > self.max_payload:
            raise _http_error(413, f"Payload too large: data is over {self.max_payload} bytes")
        if not isinstance(channels, list) or not channels or len(channels) > 100 or not all(
                isinstance(c, str) and c for c in channels):
            raise _http_error(400, "channels must be a list of 1-100 channel names")
        socket_id = item.get("socket_id")
        return channels, name, data, socket_id if isinstance(socket_id, str) else None

    async def _events_handler(self, request: web.Request) -> web.Response:
        body = await self._authorized_json(request)
        channels, name, data, socket_id = self._validate_event(body, "channels")
        for channel in channels:
            self._deliver(channel, name, data, socket_id)
        return web.json_response({})

    async def _batch_handler(self, request: web.Request) -> web.Response:
        body = await self._authorized_json(request)
        batch = body.get("batch") if isinstance(body, dict) else None
        if not isinstance(batch, list) or len(batch) > 10:
            raise _http_error(400, "batch must be a list of at most 10 events")
        events = [self._validate_event(item, "channel") for item in batch]
        for channels, name, data, socket_id in events:
            for channel in channels:
                self._deliver(channel, name, data, socket_id)
        return web.json_response({"batch": [{} for _ in events]})

    async def _channels_handler(self, request: web.Request) -> web.Response:
        await self._authorized_json(request)
        prefix = request.query.get("filter_by_prefix", "")
        occupied = {ch for c in self.connections for ch in c.channels if ch.startswith(prefix)}
        return web.json_response({"channels": {ch: {} for ch in sorted(occupied)}})


class _ApiError(Exception):
    """An HTTP API refusal; Pusher answers them with a plain-text body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def _http_error(status: int, message: str) -> _ApiError:
    return _ApiError(status, message)


@web.middleware
async def _api_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)
    except _ApiError as exc:
        return web.Response(status=exc.status, text=exc.message)


# ---------------------------------------------------------------- standalone


async def _serve(args: argparse.Namespace) -> None:
    sim = PusherSim(args.app_id, args.key, args.secret, host=args.host, port=args.port,
                    activity_timeout=args.activity_timeout, max_connections=args.max_connections)
    async with sim:
        print(f"Pusher simulator: WebSocket {sim.ws_url()}  HTTP API {sim.url}/apps/{sim.app_id}/events",
              flush=True)
        for n in itertools.count(1):
            await asyncio.sleep(args.every if args.channel else 3600)
            if args.channel:
                await sim.publish(args.channel, args.event, {"n": n, "at": time.time()})


def main(argv: list[str] | None = None) -> None:
    """`python -m listenerd.sim.pusher [--port 6001] [--channel demo --every 2]`."""
    parser = argparse.ArgumentParser(prog="python -m listenerd.sim.pusher", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6001)
    parser.add_argument("--app-id", default="12345")
    parser.add_argument("--key", default="app-key")
    parser.add_argument("--secret", default="app-secret")
    parser.add_argument("--activity-timeout", type=float, default=120.0)
    parser.add_argument("--max-connections", type=int, default=None,
                        help="concurrent connections per app; past it 4004 Over connection quota")
    parser.add_argument("--channel", help="publish a demo event on this channel every --every seconds")
    parser.add_argument("--event", default="demo")
    parser.add_argument("--every", type=float, default=2.0)
    try:
        asyncio.run(_serve(parser.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
