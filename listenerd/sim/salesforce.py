"""A Salesforce org over loopback: OAuth token endpoint, the PushTopic REST calls, and CometD with replay.

(One module past 400 lines on purpose: OAuth, REST and CometD share one org's state: tokens, topics,
Bayeux clients and the replay buffer.)

Why a project-owned simulator: no open-source Bayeux server has Salesforce's token endpoint, its
error strings, `ext.sfdc.failureReason`, cookies (`BAYEUX_BROWSER`) and a replay buffer with a
retention window: faye (`src/protocol/server.js`) and cometd-nodejs-server answer unknown clients their
own way and keep no replay. What Salesforce answers is in its Streaming API guide:
https://developer.salesforce.com/docs/platform/api-streaming/guide/streaming-error-codes.html and
https://developer.salesforce.com/docs/atlas.en-us.260.0.api_streaming.meta/api_streaming/using_streaming_api_durability.htm
It is checked against aiosfstream-ng, a real Salesforce client written by others, in tests/peers.

    async with SalesforceSim(users={"alice@example.com": "pw" + "TOKEN"}, clients={"key": "secret"}) as sim:
        sim.url                                                     # http://localhost:<port>
        sim.create_topic("Invoices", "SELECT Id, Name FROM Invoice__c")
        sim.publish("Invoices", {"Id": "a00...", "Name": "INV-1"})  # -> replayId
        sim.expire_sessions(); sim.forget_clients(); sim.advise("handshake"); sim.drop_long_polls()
        sim.silence(); sim.corrupt_next_connect(); await sim.send_raw(b"5"); await sim.restart(); sim.purge(upto=...)

Like every simulator here: `async start() -> self`, `stop()`, `async with`, `url`, `port`, `silence(on)`,
`async send_raw(frame: str | bytes) -> int` (exactly those bytes as the next connect's answer); Bayeux
messages of the wrong shape inside a well-formed answer: `send_messages(...)`.

Faults are answered the way Salesforce answers them: an expired session is `401::Authentication
invalid` on connect (advice none) or `403::Handshake denied` with `ext.sfdc.failureReason` on a
handshake; a forgotten client is `403::Unknown client` with advice handshake; a replayId outside the
retention window is `400::The replayId {N} you provided was invalid...`.

Limits, as an org enforces them (Streaming API guide, "Streaming API Allocations": 20 concurrent
clients below Enterprise edition; help article 000381578: 3,600 logins per user per hour):
`max_clients` live CometD clients (a handshake past it is `403::Handshake denied` with
`ext.sfdc.failureReason` `403::Organization concurrent user limit exceeded`, advice none, as reported
in SalesforceFoundation/salesforce-streaming-client#15); a client leaves on `/meta/disconnect` or when
it has not polled for 2 x the long poll + 40 s. `max_logins_per_hour` per username: past it the token
endpoint answers HTTP 400 `{"error":"invalid_grant","error_description":"LOGIN_RATE_EXCEEDED: ..."}`
(Salesforce documents the code, not the OAuth body: this shape is our reading). `logins` and
`live_clients` count them for tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

ORG_ID = "00D5g000000SimAAA"
USER_ID = "0055g000000SimAAA"
MIN_VERSION = 37.0
_QUERY_TOPIC = re.compile(r"FROM\s+PushTopic\s+WHERE\s+Name\s*=\s*'((?:[^'\\]|\\.)*)'", re.IGNORECASE)


@dataclass
class _Event:
    replay_id: int
    topic: str
    published: float
    message: dict[str, Any]


@dataclass
class _Client:
    client_id: str
    cookie: str
    token: str
    subscriptions: set[str] = field(default_factory=set)
    queue: list[dict[str, Any]] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    connects: int = 0
    held: int = 0  # sequence number of the connect currently held
    advice_once: dict[str, Any] | None = None
    last_seen: float = field(default_factory=time.monotonic)


class SalesforceSim:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, public_host: str | None = None,
                 users: dict[str, str] | None = None, clients: dict[str, str] | None = None,
                 long_poll: float = 110.0, retention: float = 86400.0, batch: int = 1000,
                 org_id: str = ORG_ID, http_401: bool = False, ssl_context: ssl.SSLContext | None = None,
                 max_clients: int = 20, max_logins_per_hour: int = 3600):
        """`users`: username -> password + security token; `clients`: consumer key -> consumer secret.

        `long_poll` is how long a connect is held (Salesforce: 110 s); `retention` how long events stay
        replayable (24 h); `http_401` answers an expired session on /cometd with HTTP 401 instead of
        a Bayeux `401::` error. With `ssl_context` it serves https (for TLS verification tests).
        `max_clients`: concurrent CometD clients of the org; `max_logins_per_hour`: logins per user.
        """
        self.host = host
        self.port = port
        self.public_host = public_host or ("localhost" if host in ("127.0.0.1", "localhost") else host)
        self.users = dict(users or {"user@example.com": "passwordTOKEN"})
        self.clients = dict(clients or {"consumer-key": "consumer-secret"})
        self.long_poll = long_poll
        self.retention = retention
        self.batch = batch
        self.org_id = org_id
        self.http_401 = http_401
        self.ssl_context = ssl_context
        self.max_clients = max_clients
        self.max_logins_per_hour = max_logins_per_hour
        self._login_times: dict[str, deque[float]] = {}
        self.handshakes = 0  # successful handshakes (clients made)
        self.login_attempts = 0  # token requests, answered or refused
        self.denied: dict[str, str] = {}  # channel -> the error its subscribes get (see `deny_subscribe`)
        self._failing_connects: list[int] = []  # HTTP statuses for the next connects (see `fail_connects`)
        self.topics: dict[str, dict[str, Any]] = {}
        self.tokens: set[str] = set()
        self.bayeux: dict[str, _Client] = {}
        self.events: deque[_Event] = deque()  # in replayId order, oldest first
        self.purged_upto = 0
        self.requests: list[dict[str, Any]] = []  # every Bayeux message received, for tests
        self.logins = 0
        self._replay_ids = itertools.count(1)
        self._last_replay = 0
        self._topic_ids = itertools.count(1)
        self._stalled = False
        self._corrupt = 0
        self.raw_pending: list[bytes | list[dict[str, Any]]] = []  # answers queued by send_raw/send_messages, in order
        self._runner: web.AppRunner | None = None
        self._closing = False

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://{self.public_host}:{self.port}"

    @property
    def token_url(self) -> str:
        return f"{self.url}/services/oauth2/token"

    async def start(self) -> SalesforceSim:
        app = web.Application(client_max_size=32 * 1024)
        app.router.add_post("/services/oauth2/token", self._token)
        app.router.add_get("/services/data/v{version}/query/", self._query)
        app.router.add_get("/services/data/v{version}/query", self._query)
        app.router.add_post("/services/data/v{version}/sobjects/PushTopic/", self._create_topic)
        app.router.add_post("/services/data/v{version}/sobjects/PushTopic", self._create_topic)
        app.router.add_post("/cometd/{version}", self._cometd)
        self._closing = False
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        self._closing = True
        for client in self.bayeux.values():
            client.wake.set()
        if self._runner:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> SalesforceSim:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def restart(self) -> None:
        """The streaming servers restart: every Bayeux client is forgotten; tokens and events stay."""
        await self.stop()
        self.bayeux.clear()
        await self.start()

    # ------------------------------------------------------------ the org

    def create_topic(self, name: str, query: str, api_version: float = 58.0) -> str:
        topic_id = f"0IF5g{next(self._topic_ids):010d}"
        self.topics[name] = {"Id": topic_id, "Name": name, "Query": query, "ApiVersion": api_version,
                             "IsActive": True, "NotifyForFields": "Referenced"}
        return topic_id

    def publish(self, topic: str, sobject: dict[str, Any], type: str = "created") -> int:  # noqa: A002
        """A record change matching PushTopic `topic`: buffered for replay and sent to subscribers."""
        if topic not in self.topics:
            raise KeyError(f"no PushTopic named {topic}")
        self._expire()
        replay_id = next(self._replay_ids)
        self._last_replay = replay_id
        channel = f"/topic/{topic}"
        created = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        message = {"channel": channel, "data": {"event": {"createdDate": created, "replayId": replay_id,
                                                          "type": type}, "sobject": sobject}}
        self.events.append(_Event(replay_id, channel, time.time(), message))
        for client in self.bayeux.values():
            if channel in client.subscriptions:
                client.queue.append({**message, "clientId": client.client_id})
                client.wake.set()
        return replay_id

    def purge(self, upto: int | None = None) -> None:
        """Drop retained events up to replayId `upto` (all when None), as the retention window does."""
        upto = self._last_replay if upto is None else upto
        while self.events and self.events[0].replay_id <= upto:
            self.events.popleft()
        self.purged_upto = max(self.purged_upto, upto)

    def _expire(self) -> None:
        horizon = time.time() - self.retention
        while self.events and self.events[0].published < horizon:
            self.purged_upto = max(self.purged_upto, self.events.popleft().replay_id)

    @property
    def live_clients(self) -> int:
        """CometD clients the org counts now (after dropping those that stopped polling)."""
        self._drop_stale_clients()
        return len(self.bayeux)

    def _drop_stale_clients(self) -> None:
        now = time.monotonic()
        for stale in [c for c in self.bayeux.values() if now - c.last_seen > 2 * self.long_poll + 40]:
            self.bayeux.pop(stale.client_id, None)

    # ------------------------------------------------------------ faults

    def expire_sessions(self) -> None:
        """Revoke every access token: REST answers 401, CometD `401::Authentication invalid`."""
        self.tokens.clear()
        for client in self.bayeux.values():
            client.wake.set()

    def forget_clients(self) -> None:
        """Drop every Bayeux client: the next request answers `403::Unknown client`."""
        clients, self.bayeux = self.bayeux, {}
        for client in clients.values():
            client.wake.set()

    def advise(self, reconnect: str, error: str | None = None) -> None:
        """Answer each client's next (or currently held) connect with this advice, failed when `error`."""
        for client in self.bayeux.values():
            client.advice_once = {"reconnect": reconnect, "interval": 0, "error": error}
            client.wake.set()

    def drop_long_polls(self) -> None:
        """Close the sockets of every held connect without an answer (a proxy or load balancer drop)."""
        for client in self.bayeux.values():
            client.held = -1
            client.wake.set()

    def fail_connects(self, count: int, status: int = 503) -> None:
        """Answer the next `count` connects with HTTP `status` (a load balancer in trouble); the client stays."""
        self._failing_connects.extend([status] * count)
        for client in self.bayeux.values():
            client.wake.set()

    def deny_subscribe(self, channel: str, error: str | None = None) -> None:
        """Refuse subscribes to `channel` (a PushTopic deactivated or deleted after the listener looked it up);
        the error defaults to Salesforce's text for a channel that does not exist."""
        self.denied[channel] = error or f"400::The channel you requested to subscribe to doesn't exist {{{channel}}}"

    def silence(self, on: bool = True) -> None:
        """Hold connects forever and send nothing (a silent, half-dead connection)."""
        self._stalled = on
        if not on:
            for client in self.bayeux.values():
                client.wake.set()

    async def send_raw(self, frame: str | bytes) -> int:
        """Answer the next /meta/connect of a subscribed client with exactly `frame` (not JSON, not Bayeux ...).

        Queued events stay queued; `raw_pending` empties as the answers are taken. Returns 1, the one
        answer that will carry it.
        """
        return self._answer_next_connect(frame.encode() if isinstance(frame, str) else frame)

    async def send_messages(self, messages: list[dict[str, Any]]) -> int:
        """Answer the next /meta/connect of a subscribed client with these Bayeux messages, then the real
        /meta/connect reply (messages of the wrong shape inside a well-formed answer). Returns 1, as `send_raw`."""
        return self._answer_next_connect(messages)

    def _answer_next_connect(self, answer: bytes | list[dict[str, Any]]) -> int:
        self.raw_pending.append(answer)
        for client in self.bayeux.values():
            client.wake.set()
        return 1

    def corrupt_next_connect(self, count: int = 1) -> None:
        """The next connect answers carry a body that is not JSON (events in it are lost to the client)."""
        self._corrupt += count
        for client in self.bayeux.values():
            client.wake.set()

    # ------------------------------------------------------------ OAuth and REST

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        self.login_attempts += 1
        if form.get("grant_type") != "password":
            return _oauth_error("unsupported_grant_type", "grant type not supported")
        consumer_key = str(form.get("client_id", ""))
        if consumer_key not in self.clients:
            return _oauth_error("invalid_client_id", "client identifier invalid")
        if self.clients[consumer_key] != form.get("client_secret"):
            return _oauth_error("invalid_client", "invalid client credentials")
        username = str(form.get("username", ""))
        recent = self._login_times.setdefault(username, deque())
        now = time.monotonic()
        while recent and now - recent[0] > 3600:
            recent.popleft()
        if len(recent) >= self.max_logins_per_hour:
            return _oauth_error("invalid_grant", "LOGIN_RATE_EXCEEDED: Login Rate Exceeded")
        recent.append(now)  # every attempt counts, as in the org's Login History
        if self.users.get(username) != form.get("password"):
            return _oauth_error("invalid_grant", "authentication failure")
        token = f"{self.org_id}!{secrets.token_urlsafe(24)}"
        self.tokens.add(token)
        self.logins += 1
        issued = str(int(time.time() * 1000))
        return web.json_response({"access_token": token, "instance_url": self.url,
                                  "id": f"{self.url}/id/{self.org_id}/{USER_ID}", "token_type": "Bearer",
                                  "issued_at": issued, "signature": secrets.token_urlsafe(32)})

    def valid_token(self, token: str) -> bool:
        """An access token this org issued and has not revoked: the one check for REST, CometD and Pub/Sub."""
        return token in self.tokens

    def _bearer(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token if scheme in ("Bearer", "OAuth") and self.valid_token(token) else None

    async def _query(self, request: web.Request) -> web.Response:
        if self._bearer(request) is None:
            return _rest_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        soql = request.query.get("q", "")
        match = _QUERY_TOPIC.search(soql)
        if not match:
            return _rest_error(400, "MALFORMED_QUERY", "the simulator answers PushTopic queries by Name only")
        name = match.group(1).replace("\\'", "'").replace("\\\\", "\\")
        records = [{"attributes": {"type": "PushTopic"}, **self.topics[name]}] if name in self.topics else []
        return web.json_response({"totalSize": len(records), "done": True, "records": records})

    async def _create_topic(self, request: web.Request) -> web.Response:
        if self._bearer(request) is None:
            return _rest_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _rest_error(400, "JSON_PARSER_ERROR", "The request body is not valid JSON")
        name, query = body.get("Name"), body.get("Query")
        if not isinstance(name, str) or not 0 < len(name) <= 25:
            return _rest_error(400, "STRING_TOO_LONG" if name else "REQUIRED_FIELD_MISSING",
                               "Name: data value too large or missing (max length=25)")
        if not isinstance(query, str) or not re.match(r"\s*SELECT\s+(.*\b)?Id\b", query, re.IGNORECASE):
            return _rest_error(400, "INVALID_FIELD", "The query must select the Id field")
        if name in self.topics:
            return _rest_error(400, "DUPLICATE_VALUE", f"duplicate value found: Name duplicates value on record "
                                                       f"with id: {self.topics[name]['Id']}")
        topic_id = self.create_topic(name, query, float(body.get("ApiVersion") or 58.0))
        return web.json_response({"id": topic_id, "success": True, "errors": []}, status=201)

    # ------------------------------------------------------------ CometD

    async def _cometd(self, request: web.Request) -> web.StreamResponse:
        try:
            version = float(request.match_info["version"])
        except ValueError:
            version = 0.0
        if version < MIN_VERSION:
            return web.json_response([{"error": "400::Unsupported API version", "successful": False}], status=400)
        token = self._bearer(request)
        if token is None and self.http_401:
            return web.json_response([{"error": "401::Authentication invalid", "successful": False}], status=401)
        try:
            messages = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return web.json_response([{"error": "400::Bad request: the body is not JSON", "successful": False}],
                                     status=400)
        if isinstance(messages, dict):
            messages = [messages]
        if self._failing_connects and any(isinstance(m, dict) and m.get("channel") == "/meta/connect"
                                          for m in messages):
            self.requests.extend(messages)
            return web.Response(status=self._failing_connects.pop(0), text="Service Unavailable")
        replies: list[dict[str, Any]] = []
        response: web.Response | None = None
        for message in messages:
            self.requests.append(message)
            channel = message.get("channel")
            if channel == "/meta/handshake":
                reply, cookie = self._handshake(message, token)
                if cookie:
                    response = web.Response()
                    response.set_cookie("BAYEUX_BROWSER", cookie, httponly=True, path="/")
                replies.append(reply)
                continue
            client = self.bayeux.get(str(message.get("clientId")))
            if token is None:
                if client is not None:  # advice none: the server is done with this client, its slot is free
                    self.bayeux.pop(client.client_id, None)
                replies.append(_reply(message, False, error="401::Authentication invalid",
                                      advice={"reconnect": "none", "interval": 0}))
            elif client is None:
                replies.append(_reply(message, False, error="403::Unknown client",
                                      advice={"reconnect": "handshake", "interval": 0}))
            elif request.cookies.get("BAYEUX_BROWSER") != client.cookie:
                replies.append(_reply(message, False, error=f"400::Client {client.client_id} has established a "
                                      "session, but no BAYEUX_BROWSER cookie present",
                                      advice={"reconnect": "handshake", "interval": 0}))
            elif channel == "/meta/subscribe":
                replies.append(self._subscribe(client, message))
            elif channel == "/meta/unsubscribe":
                client.subscriptions.discard(str(message.get("subscription")))
                replies.append(_reply(message, True, subscription=message.get("subscription")))
            elif channel == "/meta/disconnect":
                self.bayeux.pop(client.client_id, None)
                client.wake.set()
                replies.append(_reply(message, True))
            elif channel == "/meta/connect":
                held = await self._connect(request, client, message)
                if held is None:
                    return web.Response()  # the socket was closed under it
                if isinstance(held, bytes):
                    return web.Response(body=held, content_type="application/json")
                replies.extend(held)
            else:
                replies.append(_reply(message, False, error=f"403::Publishing to {channel} is not allowed"))
        out = response or web.Response()
        out.body = orjson.dumps(replies)
        out.content_type = "application/json"
        return out

    def _handshake(self, message: dict[str, Any], token: str | None) -> tuple[dict[str, Any], str | None]:
        if token is None:
            return (_reply(message, False, error="403::Handshake denied", advice={"reconnect": "none"},
                           ext={"sfdc": {"failureReason": "401::Authentication invalid"}}), None)
        types = message.get("supportedConnectionTypes") or []
        if "long-polling" not in types:
            return _reply(message, False, error="400::Invalid connection type"), None
        self._drop_stale_clients()
        if len(self.bayeux) >= self.max_clients:
            return (_reply(message, False, error="403::Handshake denied", advice={"reconnect": "none"},
                           ext={"sfdc": {"failureReason": "403::Organization concurrent user limit exceeded"}}),
                    None)
        self.handshakes += 1
        client = _Client(secrets.token_hex(13), secrets.token_hex(16), token)
        self.bayeux[client.client_id] = client
        return (_reply(message, True, clientId=client.client_id, version="1.0", minimumVersion="1.0",
                       supportedConnectionTypes=["long-polling"], ext={"replay": True, "payload.format": True}),
                client.cookie)

    def _subscribe(self, client: _Client, message: dict[str, Any]) -> dict[str, Any]:
        channel = str(message.get("subscription"))
        name = channel.removeprefix("/topic/")
        if channel in self.denied:
            return _reply(message, False, subscription=channel, error=self.denied[channel])
        if not channel.startswith("/topic/") or name not in self.topics:
            return _reply(message, False, subscription=channel,
                          error=f"400::The channel you requested to subscribe to doesn't exist {{{channel}}}")
        ext = message.get("ext") or {}
        replay_map = ext.get("replay") if isinstance(ext, dict) else None
        replay_id = -1
        if isinstance(replay_map, dict):
            if channel not in replay_map:
                return _reply(message, False, subscription=channel,
                              error=f"400::The replayId for channel {{{channel}}} wasn't found using the "
                                    "provided replay ID map")
            replay_id = replay_map[channel]
        self._expire()
        if replay_id == -2:
            backlog = [e for e in self.events if e.topic == channel]
        elif replay_id == -1:
            backlog = []
        elif isinstance(replay_id, int) and self.purged_upto <= replay_id <= self._last_replay:
            backlog = [e for e in self.events if e.topic == channel and e.replay_id > replay_id]
        else:
            return _reply(message, False, subscription=channel,
                          error=f"400::The replayId {{{replay_id}}} you provided was invalid. Please provide a "
                                "valid ID, -2 to replay all events, or -1 to replay only new events.")
        client.subscriptions.add(channel)
        client.queue.extend({**e.message, "clientId": client.client_id} for e in backlog)
        if backlog:
            client.wake.set()
        return _reply(message, True, subscription=channel)

    async def _connect(self, request: web.Request, client: _Client,
                       message: dict[str, Any]) -> list[dict[str, Any]] | bytes | None:
        client.connects += 1
        client.last_seen = time.monotonic()
        seq = client.held = client.connects
        advice = {"reconnect": "retry", "interval": 0, "timeout": int(self.long_poll * 1000)}
        if self.raw_pending and client.subscriptions:
            body = self.raw_pending.pop(0)
            return body if isinstance(body, bytes) else [*body, _reply(message, True, advice=advice)]
        if client.connects > 1 and client.advice_once is None and not self._corrupt:
            deadline = time.monotonic() + self.long_poll
            while not self._closing:
                if client.queue and not self._stalled:
                    break
                if client.advice_once or self._corrupt or client.held != seq:
                    break
                if client.client_id not in self.bayeux or client.token not in self.tokens:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0 and not self._stalled:
                    break
                client.wake.clear()
                try:
                    await asyncio.wait_for(client.wake.wait(), remaining if not self._stalled else 3600)
                except TimeoutError:
                    pass
        client.last_seen = time.monotonic()
        if client.held == -1 or (request.transport is None or request.transport.is_closing()):
            if request.transport is not None:
                request.transport.close()
            return None
        if client.held != seq:
            return [_reply(message, True, advice=advice)]  # superseded by a newer connect
        if client.client_id not in self.bayeux:
            return [_reply(message, False, error="403::Unknown client",
                           advice={"reconnect": "handshake", "interval": 0})]
        if client.token not in self.tokens:
            self.bayeux.pop(client.client_id, None)  # advice none: the slot is free
            return [_reply(message, False, error="401::Authentication invalid",
                           advice={"reconnect": "none", "interval": 0})]
        if self._corrupt:
            self._corrupt -= 1
            sent, client.queue = client.queue[: self.batch], client.queue[self.batch:]
            return b'[{"channel": "/meta/connect", "successful": tru'  # events in `sent` are lost
        if client.advice_once is not None:
            once, client.advice_once = client.advice_once, None
            error = once.pop("error")
            if once["reconnect"] == "handshake":
                self.bayeux.pop(client.client_id, None)
            if error:
                return [_reply(message, False, error=error, advice=once)]
            return [_reply(message, True, advice=once)]
        sent, client.queue = client.queue[: self.batch], client.queue[self.batch:]
        return [*sent, _reply(message, True, advice=advice)]


def _reply(message: dict[str, Any], successful: bool, **fields: Any) -> dict[str, Any]:
    reply: dict[str, Any] = {"channel": message.get("channel"), "successful": successful}
    if "id" in message:
        reply["id"] = message["id"]
    if "clientId" in message:
        reply["clientId"] = message["clientId"]
    reply.update(fields)
    return reply


def _oauth_error(error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)


def _rest_error(status: int, code: str, message: str) -> web.Response:
    return web.json_response([{"message": message, "errorCode": code}], status=status)


# ---------------------------------------------------------------- standalone


async def _serve(args: Any) -> None:
    sim = SalesforceSim(args.host, args.port, users={args.username: args.password},
                        clients={args.consumer_key: args.consumer_secret}, long_poll=args.long_poll)
    sim.create_topic(args.topic, args.query)
    async with sim:
        print(f"Salesforce simulator at {sim.url} (login-url), PushTopic /topic/{args.topic}", flush=True)
        for n in itertools.count(1):
            await asyncio.sleep(1 / args.rate if args.rate > 0 else 3600)
            if args.rate > 0:
                sim.publish(args.topic, {"Id": f"a00D0000008o{n:06d}", "Name": f"INV-{n:04d}"})


def main(argv: list[str] | None = None) -> None:
    """`python -m listenerd.sim.salesforce --port 8443 --rate 1`: an org publishing demo record changes."""
    import argparse

    parser = argparse.ArgumentParser(description="Salesforce simulator (OAuth, PushTopic REST, CometD + replay)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--username", default="user@example.com")
    parser.add_argument("--password", default="passwordTOKEN", help="password + security token")
    parser.add_argument("--consumer-key", default="consumer-key")
    parser.add_argument("--consumer-secret", default="consumer-secret")
    parser.add_argument("--topic", default="Invoices")
    parser.add_argument("--query", default="SELECT Id, Name FROM Invoice_Statement__c")
    parser.add_argument("--long-poll", type=float, default=110.0)
    parser.add_argument("--rate", type=float, default=1.0, help="demo events per second (0: none)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
