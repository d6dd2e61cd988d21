"""A DataSift `/multi` WebSocket simulator: a real server on loopback for tests and `listenerd dev`.

DataSift's streaming service is gone and there is no peer client to test against, so this server
follows the documented message shapes exactly, from these public sources:

- endpoint `ws://HOST:PORT/multi?username=U&api_key=K` (dev.datasift.com/docs/streaming-api/
  multiple-streams; datasift-java `ConnectionManager.java`): credentials only in the query;
- client actions `{"action":"subscribe","hash":H}` and `{"action":"unsubscribe","hash":H}`
  (datasift-node `lib/stream.js`, `StreamConsumer.js`);
- ticks `{"tick":<unix time>,"status":"connected","message":"Waiting for data"}`
  (dev.datasift.com/docs/streaming-api);
- status messages `{"status":"success"|"warning"|"failure","message":...}`, with a `hash` field when
  one stream is concerned (datasift-java `MultiStreamInteraction.java`, `DataSiftMessage.java`); the
  credentials failure text is DataSift's own: "A username and API key are both required"
  (dev.datasift.com/blog/newcomers-guide-streaming-api);
- subscriptions confirmed with DataSift's success text, "Successfully subscribed to hash H", and an
  unknown hash answered "The hash H doesn't exist" (the texts a multi-stream client matches:
  LocalResponse's Node DataSift driver, `/successfully subscribed to hash (\\S+)/i` and
  `/The hash (\\S+) doesn't exist/i`); a failure may name several streams in a `hashes` list
  (datasift-java `DataSiftMessage.java`);
- `{"reconnect":true}` (datasift-node `lib/stream.js`, datasift-ruby `lib/datasift.rb`);
- interactions `{"hash":H,"data":{"interaction":{...},"twitter":{...},"salience":{...},...}}` with the
  field names of datasift-python `tests/mocks.py`; `salience.content.sentiment` is an integer
  (dev.datasift.com/blog/salience5);
- deletes `{"hash":H,"data":{"interaction":{"id":...},"deleted":true}}`.

Bad credentials are answered the way the WebSocket service did for browsers (which cannot read
HTTP errors): the upgrade succeeds, a `failure` status follows, then the server closes. With
`reject_http=True` they are refused with HTTP 401 at the upgrade instead.

Fault methods (`send_reconnect`, `fail_hash`, `fail_hashes`, `warn_missing`, `fail_credentials`,
`silence`, `send_malformed`, `send_oversized`, `drop`) script the failures a client must survive;
`confirm=False` leaves subscriptions unconfirmed, `missing="warning"` answers an unknown hash with a
warning, not a failure. Everything the server received
is recorded in `actions`, and `subscribed()` tells which hashes live sockets follow. Like every
simulator here: `async start() -> self`, `stop()`, `async with`, `url`, `port`, `silence(on)`,
`async send_raw(frame: str | bytes) -> int` (exactly those bytes to every socket; how many it reached).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from listenerd.sim.record import ConnectionRecord

# websockets logs request lines (credentials in the query) at DEBUG; keep them out even of dev logs.
_WS_LOG = logging.getLogger("listenerd.sim.datasift.websockets")
_WS_LOG.setLevel(logging.INFO)

CREDENTIALS_REQUIRED = "A username and API key are both required"
CREDENTIALS_INVALID = "Authentication failed: the username or API key is invalid"

_USERS = ["johndoe", "maria_g", "k_tanaka", "sam_codes", "ana_rivera", "li_wei", "tom_baker", "priya_s"]
_TEXTS = ["I like ice cream!", "Waiting on hold for 40 minutes, not impressed", "Great support from the team today",
          "My order still has not arrived", "Thanks for the quick fix!", "Anyone else seeing the outage?",
          "Loving the new app update", "Worst checkout experience ever"]


@dataclass(eq=False)
class SimConnection:
    """One client socket as the simulator sees it."""

    ws: ServerConnection
    username: str
    hashes: set[str] = field(default_factory=set)
    ticker: asyncio.Task[None] | None = None
    record: ConnectionRecord = field(default_factory=lambda: ConnectionRecord(""))


class DataSiftSim:
    """`DataSiftSim(users={"user": "key"}).start()`; point a datasift integration's stream-url at `.url`."""

    def __init__(self, users: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 0,
                 tick_interval: float = 10.0, hashes: set[str] | None = None, reject_http: bool = False,
                 seed: int | None = None, confirm: bool = True, missing: str = "failure"):
        self.users = dict(users) if users is not None else {"user": "key"}
        self.host = host
        self.port = port
        self.tick_interval = tick_interval
        self.hashes = hashes  # None: any hash exists; else unknown hashes get a failure naming them
        self.reject_http = reject_http
        self.confirm = confirm  # False: subscribes are applied but never confirmed
        self.missing = missing  # how an unknown hash is answered: "failure" or "warning"
        self.connections: list[SimConnection] = []
        self.connection_log: list[ConnectionRecord] = []  # every accepted socket, closed ones too
        self.actions: list[dict[str, Any]] = []  # every action received: {"username", "action", "hash"}
        self.connects = 0  # sockets accepted with valid credentials
        self.rejected = 0  # sockets refused for their credentials
        self.silent = False
        self._random = random.Random(seed)
        self._server: Server | None = None
        self._feeds: dict[str, asyncio.Task[None]] = {}

    # -- lifecycle

    async def start(self) -> DataSiftSim:
        self._server = await serve(self._handle, self.host, self.port, process_request=self._check_request,
                                   max_size=1 << 20, logger=_WS_LOG)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        for task in self._feeds.values():
            task.cancel()
        self._feeds.clear()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> DataSiftSim:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/multi"

    # -- what tests and `listenerd dev` look at

    def subscribed(self, username: str | None = None) -> set[str]:
        """Hashes followed by live sockets (of `username` when given)."""
        return {h for c in self.connections if username is None or c.username == username for h in c.hashes}

    def actions_for(self, stream_hash: str) -> list[str]:
        return [a["action"] for a in self.actions if a.get("hash") == stream_hash]

    # -- publishing

    async def publish(self, stream_hash: str, data: dict[str, Any]) -> int:
        """Send `{"hash", "data"}` to every socket subscribed to `stream_hash`; returns how many got it."""
        return await self._send_to(lambda c: stream_hash in c.hashes, {"hash": stream_hash, "data": data})

    async def interaction(self, stream_hash: str, **overrides: Any) -> dict[str, Any]:
        """Publish one realistic twitter interaction (see `make_interaction`); returns its data object."""
        data = self.make_interaction(**overrides)
        await self.publish(stream_hash, data)
        return data

    async def delete(self, stream_hash: str, interaction_id: str) -> int:
        """A Twitter delete for an interaction, as DataSift forwarded it."""
        return await self.publish(stream_hash, {"interaction": {"id": interaction_id}, "deleted": True})

    def make_interaction(self, *, username: str | None = None, content: str | None = None,
                         sentiment: int | None = None, interaction_id: str | None = None) -> dict[str, Any]:
        """A twitter-style interaction with the fields of datasift-python's mocks and salience."""
        rnd = self._random
        username = username or rnd.choice(_USERS)
        content = content if content is not None else rnd.choice(_TEXTS)
        sentiment = sentiment if sentiment is not None else rnd.randint(-10, 10)
        now = formatdate(time.time(), usegmt=False).replace("-0000", "+0000")
        user_id = rnd.randint(10_000, 2_000_000_000)
        tweet_id = str(rnd.randint(10**17, 10**18 - 1))
        name = username.replace("_", " ").title()
        return {
            "interaction": {
                "id": interaction_id or uuid.uuid4().hex,
                "type": "twitter",
                "created_at": now,
                "content": content,
                "source": "Twitter for Android",
                "link": f"https://twitter.com/{username}/status/{tweet_id}",
                "author": {"username": username, "name": name, "id": user_id,
                           "avatar": f"https://pbs.twimg.com/profile_images/{user_id}/avatar.png",
                           "link": f"https://twitter.com/{username}", "language": "en"},
            },
            "twitter": {
                "id": tweet_id, "text": content, "created_at": now, "lang": "en", "source": "Twitter for Android",
                "user": {"screen_name": username, "name": name, "id": user_id, "id_str": str(user_id),
                         "followers_count": rnd.randint(0, 50_000), "friends_count": rnd.randint(0, 2_000),
                         "statuses_count": rnd.randint(1, 100_000), "lang": "en", "time_zone": "London"},
            },
            "salience": {"content": {"sentiment": sentiment}},
            "language": {"tag": "en", "confidence": rnd.randint(60, 100)},
            "klout": {"score": rnd.randint(10, 90)},
        }

    def feed(self, stream_hash: str, interval: float = 1.0) -> None:
        """Publish an interaction on `stream_hash` every `interval` seconds until `stop_feed`/`stop` (for dev)."""
        self.stop_feed(stream_hash)

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                if not self.silent:
                    await self.interaction(stream_hash)

        self._feeds[stream_hash] = asyncio.create_task(loop(), name=f"datasift-sim-feed:{stream_hash}")

    def stop_feed(self, stream_hash: str) -> None:
        task = self._feeds.pop(stream_hash, None)
        if task:
            task.cancel()

    # -- faults

    async def send_reconnect(self) -> int:
        return await self._send_to(lambda c: True, {"reconnect": True})

    async def fail_hash(self, stream_hash: str, message: str | None = None) -> int:
        """A failure naming one stream (e.g. the hash was deleted); that hash is dropped from the socket."""
        text = message or f"The hash {stream_hash} does not exist"
        sent = await self._send_to(lambda c: stream_hash in c.hashes,
                                   {"status": "failure", "message": text, "hash": stream_hash})
        for conn in self.connections:
            conn.hashes.discard(stream_hash)
        return sent

    async def fail_hashes(self, hashes: list[str], message: str = "The streams were stopped") -> int:
        """One failure naming several streams in a `hashes` list; those hashes are dropped from every socket."""
        named = set(hashes)
        sent = await self._send_to(lambda c: bool(named & c.hashes),
                                   {"status": "failure", "message": message, "hashes": list(hashes)})
        for conn in self.connections:
            conn.hashes -= named
        return sent

    async def warn_missing(self, stream_hash: str) -> int:
        """A warning that the hash does not exist (named in the text only); it is dropped from every socket."""
        sent = await self._send_to(lambda c: stream_hash in c.hashes,
                                   {"status": "warning", "message": _missing(stream_hash)})
        for conn in self.connections:
            conn.hashes.discard(stream_hash)
        return sent

    async def fail_credentials(self, message: str = CREDENTIALS_INVALID) -> int:
        """As if the account's key was revoked: a failure on every socket, then the server closes them."""
        sent = await self._send_to(lambda c: True, {"status": "failure", "message": message})
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.ws.close(1008, "authentication failed")
        return sent

    async def warn(self, message: str, stream_hash: str | None = None) -> int:
        body: dict[str, Any] = {"status": "warning", "message": message}
        if stream_hash:
            body["hash"] = stream_hash
        return await self._send_to(lambda c: True, body)

    def silence(self, on: bool = True) -> None:
        """Stop (or resume) ticks and feeds while keeping the sockets open."""
        self.silent = on

    async def send_raw(self, frame: str | bytes) -> int:
        """Send `frame` exactly as given to every socket (str: a text frame, bytes: a binary one); returns how many."""
        count = 0
        for conn in list(self.connections):
            with contextlib.suppress(ConnectionClosed):
                await conn.ws.send(frame)
                count += 1
        return count

    async def send_malformed(self) -> int:
        total = await self.send_raw('{"hash": "truncated", "data": {"interaction": ')
        total += await self.send_raw("[1, 2, 3]")
        return total

    async def send_oversized(self, size: int, stream_hash: str | None = None) -> int:
        """A valid-looking interaction frame padded to about `size` bytes."""
        target = stream_hash or next(iter(self.subscribed()), "0" * 32)
        data = self.make_interaction(content="")
        base = len(orjson.dumps({"hash": target, "data": data}))
        text = "x" * max(0, (size - base) // 2 + 1)  # the content appears twice: interaction and twitter
        data["interaction"]["content"] = data["twitter"]["text"] = text
        return await self.send_raw(orjson.dumps({"hash": target, "data": data}).decode())

    async def drop(self) -> int:
        """Abort every socket without a close frame (a network failure, as the client sees it)."""
        count = 0
        for conn in list(self.connections):
            conn.ws.transport.abort()
            count += 1
        return count

    # -- server side

    def _credentials(self, path: str) -> tuple[str, str]:
        query = parse_qs(urlsplit(path).query)
        return (query.get("username") or [""])[0], (query.get("api_key") or [""])[0]

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path.rstrip("/") != "/multi":
            return _http(HTTPStatus.NOT_FOUND, "Not found")
        if self.reject_http:
            username, api_key = self._credentials(request.path)
            if not username or self.users.get(username) != api_key:
                self.rejected += 1
                return _http(HTTPStatus.UNAUTHORIZED, CREDENTIALS_INVALID)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        username, api_key = self._credentials(ws.request.path)
        if not username or not api_key or self.users.get(username) != api_key:
            self.rejected += 1
            message = CREDENTIALS_REQUIRED if not username or not api_key else CREDENTIALS_INVALID
            with contextlib.suppress(ConnectionClosed):
                await ws.send(orjson.dumps({"status": "failure", "message": message}).decode())
                await ws.close(1008, "authentication failed")
            return
        conn = SimConnection(ws, username, record=ConnectionRecord(ws.request.headers.get("User-Agent", ""), username))
        self.connections.append(conn)
        self.connection_log.append(conn.record)
        self.connects += 1
        conn.ticker = asyncio.create_task(self._tick(conn))
        try:
            async for raw in ws:
                await self._on_message(conn, raw)
        except ConnectionClosed:
            pass
        finally:
            conn.ticker.cancel()
            self.connections.remove(conn)
            conn.record.close()

    async def _on_message(self, conn: SimConnection, raw: str | bytes) -> None:
        try:
            message = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await conn.ws.send(orjson.dumps({"status": "warning", "message": "Invalid JSON received"}).decode())
            return
        action = message.get("action") if isinstance(message, dict) else None
        stream_hash = message.get("hash") if isinstance(message, dict) else None
        self.actions.append({"username": conn.username, "action": action, "hash": stream_hash})
        if action == "subscribe" and isinstance(stream_hash, str) and stream_hash:
            if self.hashes is not None and stream_hash not in self.hashes:
                answer = ({"status": "warning", "message": _missing(stream_hash)} if self.missing == "warning" else
                          {"status": "failure", "hash": stream_hash,
                           "message": f"The hash {stream_hash} does not exist"})
                await conn.ws.send(orjson.dumps(answer).decode())
                return
            conn.hashes.add(stream_hash)
            conn.record.subscribe(stream_hash)
            if self.confirm:
                await conn.ws.send(orjson.dumps({"status": "success", "hash": stream_hash,
                                                 "message": f"Successfully subscribed to hash {stream_hash}"}).decode())
        elif action == "unsubscribe" and isinstance(stream_hash, str):
            conn.hashes.discard(stream_hash)
            conn.record.unsubscribe(stream_hash)
            await conn.ws.send(orjson.dumps({"status": "success", "hash": stream_hash,
                                             "message": f"Successfully unsubscribed from hash {stream_hash}"}).decode())
        elif action == "stop":
            await conn.ws.send(orjson.dumps({"status": "failure", "message":
                                             "A stop message was received. You will now be disconnected"}).decode())
            await conn.ws.close()
        else:
            await conn.ws.send(orjson.dumps({"status": "warning", "message": f"Unknown action: {action}"}).decode())

    async def _tick(self, conn: SimConnection) -> None:
        """A tick at once, then every `tick_interval` while not silenced."""
        with contextlib.suppress(ConnectionClosed):
            while True:
                if not self.silent:
                    await conn.ws.send(orjson.dumps({"tick": int(time.time()), "status": "connected",
                                                     "message": "Waiting for data"}).decode())
                await asyncio.sleep(self.tick_interval)

    async def _send_to(self, which: Any, message: dict[str, Any]) -> int:
        frame = orjson.dumps(message).decode()
        count = 0
        for conn in list(self.connections):
            if which(conn):
                with contextlib.suppress(ConnectionClosed):
                    await conn.ws.send(frame)
                    count += 1
        return count


def _missing(stream_hash: str) -> str:
    return f"The hash {stream_hash} doesn't exist"


def _http(status: HTTPStatus, text: str) -> Response:
    body = orjson.dumps({"status": "failure", "message": text})
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return Response(status.value, status.phrase, headers, body)
