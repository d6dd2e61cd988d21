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
        sim.publish("Invoices", {"Id": "a00...", "Name": "INV-1"})  # -> replayId (also to /topic/Invoices?Name=INV-1)
        sim.define_platform_event("Order__e"); sim.publish_event("Order__e", {"Amount__c": 5})
        sim.enable_change_events("Account"); sim.publish_change("Account", "UPDATE", ["001..."], {"Name": "Acme"})
        sim.create_streaming_channel("/u/Notes"); sim.publish_generic("/u/Notes", "hello")
        sim.expire_sessions(); sim.forget_clients(); sim.advise("handshake"); sim.drop_long_polls()
        sim.hold_handshakes(); sim.hold_handshakes(False); sim.slow_disconnects(0.5); sim.live_clients; sim.expired
        sim.silence(); sim.corrupt_next_connect(); await sim.send_raw(b"5"); await sim.restart(); sim.purge(upto=...)

Logins: the username-password flow (`users`, `clients`), the JWT bearer flow (the assertion's RS256
signature verified with the connected app's certificate in `certificates`, then `aud` = this URL, `exp`,
`iss` a known consumer key, `sub` an approved user) and the client-credentials flow (`run_as`).
A PushTopic can be updated (`PATCH sobjects/PushTopic/<Id>`; `topic_updates` records the bodies).

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
in SalesforceFoundation/salesforce-streaming-client#15); a client leaves on `/meta/disconnect`, or
expires when it has held no connect for `max_interval` seconds (40 s: "reconnect within 40 s", the
guide's keepalive), as a CometD server sweeps sessions (cometd/cometd `ServerSessionImpl.java`: a held
`/meta/connect` cancels the expiry, its answer schedules it `interval + maxInterval` ahead, `sweep`
removes the session past it). A client that vanished mid-poll is thus freed `long_poll + max_interval`
after its last connect began. `max_logins_per_hour` per username: past it the token
endpoint answers HTTP 400 `{"error":"invalid_grant","error_description":"LOGIN_RATE_EXCEEDED: ..."}`
(Salesforce documents the code, not the OAuth body: this shape is our reading). `logins` and
`live_clients` count them for tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import re
import secrets
import ssl
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
import orjson
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from listenerd.sim.record import ConnectionRecord

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ORG_ID = "00D5g000000SimAAA"
USER_ID = "0055g000000SimAAA"
MIN_VERSION = 37.0
_QUERY_TOPIC = re.compile(r"FROM\s+PushTopic\s+WHERE\s+Name\s*=\s*'((?:[^'\\]|\\.)*)'", re.IGNORECASE)


@dataclass
class _Event:
    replay_id: int
    topic: str  # the channel without a filter: /topic/X, /event/X__e, /data/..., /u/X
    published: float
    message: dict[str, Any]
    fields: dict[str, Any] | None = None  # a PushTopic event's record, for filtered subscriptions


def replay_key(channel: str) -> str:
    """A filtered subscription's channel without its query: how replay maps and event buffers are keyed."""
    return channel.split("?", 1)[0]


def filter_of(channel: str) -> dict[str, str]:
    """`/topic/X?Status__c=Open&Type=A` -> {"Status__c": "Open", "Type": "A"} (Salesforce: equality only)."""
    _, _, query = channel.partition("?")
    return dict(part.split("=", 1) for part in query.split("&") if "=" in part)


def _matches(conditions: dict[str, str], fields: dict[str, Any] | None) -> bool:
    if not conditions:
        return True
    record = fields or {}
    return all(k in record and _text(record[k]) == v for k, v in conditions.items())


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


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
    polls: int = 0  # connects being held now: while one is, the client never expires
    expires: float | None = None  # monotonic time it expires at, when no connect is held
    record: ConnectionRecord = field(default_factory=lambda: ConnectionRecord(""))  # `idle_since`: no connect held


class SalesforceSim:
    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, public_host: str | None = None,
                 users: dict[str, str] | None = None, clients: dict[str, str] | None = None,
                 long_poll: float = 110.0, retention: float = 86400.0, batch: int = 1000,
                 org_id: str = ORG_ID, http_401: bool = False, ssl_context: ssl.SSLContext | None = None,
                 max_clients: int = 20, max_logins_per_hour: int = 3600, max_interval: float = 40.0,
                 certificates: dict[str, str | bytes] | None = None, run_as: dict[str, str] | None = None,
                 approved: dict[str, set[str]] | None = None):
        """`users`: username -> password + security token; `clients`: consumer key -> consumer secret.

        Connected apps for the other flows: `certificates`: consumer key -> the PEM certificate (or public
        key) uploaded for the JWT bearer flow; `run_as`: consumer key -> the user the client-credentials
        flow runs as; `approved`: consumer key -> the users pre-authorized for it (absent: every user).

        `long_poll` is how long a connect is held (Salesforce: 110 s); `retention` how long events stay
        replayable (24 h); `http_401` answers an expired session on /cometd with HTTP 401 instead of
        a Bayeux `401::` error. With `ssl_context` it serves https (for TLS verification tests).
        `max_clients`: concurrent CometD clients of the org; `max_logins_per_hour`: logins per user;
        `max_interval`: seconds a client may go without a connect held before it expires (Salesforce: 40).
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
        self.max_interval = max_interval
        self.max_logins_per_hour = max_logins_per_hour
        self._login_times: dict[str, deque[float]] = {}
        self.certificates = {k: _public_key(v) for k, v in (certificates or {}).items()}
        self.run_as = dict(run_as or {})
        self.approved = {k: set(v) for k, v in (approved or {}).items()}
        self.flows: list[str] = []  # the grant type of every successful login, for tests
        self.platform_events: set[str] = set()  # Platform Event API names (`Order__e`)
        self.cdc_entities: set[str] = set()  # objects selected for Change Data Capture (`Account`)
        self.streaming_channels: set[str] = set()  # generic streaming channels (`/u/Notes`)
        self.topic_updates: list[dict[str, Any]] = []  # PATCH bodies received for PushTopics
        self._commit_numbers = itertools.count(1)
        self.handshakes = 0  # successful handshakes (clients made)
        self._expired = 0  # clients dropped for not polling (see `expired`)
        self.login_attempts = 0  # token requests, answered or refused
        self.denied: dict[str, str] = {}  # channel -> the error its subscribes get (see `deny_subscribe`)
        self._failing_connects: list[int] = []  # HTTP statuses for the next connects (see `fail_connects`)
        self.topics: dict[str, dict[str, Any]] = {}
        self.tokens: set[str] = set()
        self.connection_log: list[ConnectionRecord] = []  # every Bayeux client, handshake to disconnect or expiry
        self.bayeux: dict[str, _Client] = {}
        self.events: deque[_Event] = deque()  # in replayId order, oldest first
        self.purged_upto = 0
        self.requests: list[dict[str, Any]] = []  # every Bayeux message received, for tests
        self.logins = 0
        self._replay_ids = itertools.count(1)
        self._last_replay = 0
        self._topic_ids = itertools.count(1)
        self._stalled = False
        self._handshakes_open = asyncio.Event()  # cleared by `hold_handshakes`
        self._handshakes_open.set()
        self.disconnect_delay = 0.0  # see `slow_disconnects`
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
        app.router.add_patch("/services/data/v{version}/sobjects/PushTopic/{id}", self._update_topic)
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
        self._handshakes_open.set()
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
        for client in self.bayeux.values():
            client.record.close()
        self.bayeux.clear()
        await self.start()

    # ------------------------------------------------------------ the org

    def create_topic(self, name: str, query: str, api_version: float = 58.0, **notify: Any) -> str:
        """A PushTopic; `notify` overrides the NotifyFor* fields (all operations, `Referenced` by default)."""
        topic_id = f"0IF5g{next(self._topic_ids):010d}"
        self.topics[name] = {"Id": topic_id, "Name": name, "Query": query, "ApiVersion": api_version,
                             "IsActive": True, "NotifyForOperationCreate": True, "NotifyForOperationUpdate": True,
                             "NotifyForOperationDelete": True, "NotifyForOperationUndelete": True,
                             "NotifyForFields": "Referenced", **notify}
        return topic_id

    def define_platform_event(self, name: str) -> None:
        """A Platform Event type (`Order__e`): its channel `/event/Order__e` can be subscribed."""
        self.platform_events.add(name)

    def enable_change_events(self, entity: str) -> None:
        """Select `entity` for Change Data Capture: `/data/<entity>ChangeEvent` and `/data/ChangeEvents`."""
        self.cdc_entities.add(entity)

    def create_streaming_channel(self, channel: str) -> None:
        """A generic streaming channel (a StreamingChannel record named `/u/Name`)."""
        self.streaming_channels.add(channel)

    def publish(self, topic: str, sobject: dict[str, Any], type: str = "created") -> int:  # noqa: A002
        """A record change matching PushTopic `topic`: buffered for replay and sent to subscribers
        (filtered subscriptions only when the record matches their filter)."""
        if topic not in self.topics:
            raise KeyError(f"no PushTopic named {topic}")
        replay_id = self._next_replay()
        data = {"event": {"createdDate": _now(), "replayId": replay_id, "type": type}, "sobject": sobject}
        self._deliver(f"/topic/{topic}", replay_id, data, sobject)
        return replay_id

    def publish_event(self, name: str, fields: dict[str, Any]) -> int:
        """A Platform Event `name` (`Order__e`) published, in the shape CometD delivers it: `schema`,
        `payload` (the fields with `CreatedDate` and `CreatedById`), `event` (`replayId`, `EventUuid`)."""
        if name not in self.platform_events:
            raise KeyError(f"no Platform Event named {name}")
        replay_id = self._next_replay()
        payload = {"CreatedDate": _now(), "CreatedById": USER_ID, **fields}
        data = {"schema": _schema_id(name), "payload": payload,
                "event": {"EventUuid": str(uuid.uuid4()), "replayId": replay_id}}
        self._deliver(f"/event/{name}", replay_id, data)
        return replay_id

    def publish_change(self, entity: str, change_type: str, record_ids: list[str], fields: dict[str, Any],
                       changed_fields: list[str] | None = None) -> int:
        """A Change Data Capture event for `entity` (`CREATE`, `UPDATE`, `DELETE`, `UNDELETE`): the
        `ChangeEventHeader` inside `payload` beside the changed fields, on `/data/<entity>ChangeEvent` and
        `/data/ChangeEvents` with one replayId."""
        if entity not in self.cdc_entities:
            raise KeyError(f"{entity} is not selected for Change Data Capture")
        replay_id = self._next_replay()
        commit = next(self._commit_numbers)
        header = {"entityName": entity, "recordIds": list(record_ids), "changeType": change_type,
                  "changeOrigin": "com/salesforce/api/rest/58.0", "transactionKey": secrets.token_hex(16),
                  "sequenceNumber": 1, "commitTimestamp": int(time.time() * 1000), "commitNumber": commit,
                  "commitUser": USER_ID, "nulledFields": [], "diffFields": [],
                  "changedFields": list(changed_fields if changed_fields is not None else fields)}
        data = {"schema": _schema_id(f"{entity}ChangeEvent"), "payload": {"ChangeEventHeader": header, **fields},
                "event": {"replayId": replay_id}}
        self._deliver(f"/data/{entity}ChangeEvent", replay_id, data)
        self._deliver("/data/ChangeEvents", replay_id, data)
        return replay_id

    def publish_generic(self, channel: str, payload: str) -> int:
        """A generic streaming event (`/u/Name`): the payload is a string, as the REST push resource takes it."""
        if channel not in self.streaming_channels:
            raise KeyError(f"no streaming channel {channel}")
        replay_id = self._next_replay()
        self._deliver(channel, replay_id, {"event": {"createdDate": _now(), "replayId": replay_id},
                                           "payload": payload})
        return replay_id

    def _next_replay(self) -> int:
        self._expire()
        replay_id = next(self._replay_ids)
        self._last_replay = replay_id
        return replay_id

    def _deliver(self, channel: str, replay_id: int, data: dict[str, Any],
                 fields: dict[str, Any] | None = None) -> None:
        """Buffer the event for replay, and queue it for every client subscribed to `channel`, on the channel
        each subscribed (a filtered one with its query, when the record matches the filter)."""
        self.events.append(_Event(replay_id, channel, time.time(), {"channel": channel, "data": data}, fields))
        for client in self.bayeux.values():
            for subscribed in client.subscriptions:
                if replay_key(subscribed) == channel and _matches(filter_of(subscribed), fields):
                    client.queue.append({"channel": subscribed, "data": data, "clientId": client.client_id})
                    client.wake.set()

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
        """CometD clients the org counts now (after expiring those that stopped polling)."""
        self._drop_stale_clients()
        return len(self.bayeux)

    @property
    def expired(self) -> int:
        """Clients the org expired because they stopped polling (not disconnected): leaks, for tests."""
        self._drop_stale_clients()
        return self._expired

    def _end(self, client_id: str, expired: bool = False) -> None:
        """The client is gone from the org: disconnected, refused, or `expired` (its record then ends when it
        last polled: from then on nothing was delivered to it, though the org kept its slot)."""
        client = self.bayeux.pop(client_id, None)
        if client is not None:
            client.record.close(client.record.idle_since if expired else None)

    def _drop_stale_clients(self) -> None:
        now = time.monotonic()
        for stale in [c for c in self.bayeux.values() if c.expires is not None and now > c.expires]:
            self._end(stale.client_id, expired=True)
            self._expired += 1

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
            client.record.close()
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

    def hold_handshakes(self, on: bool = True) -> None:
        """Leave handshakes unanswered until called with False (a busy server); each is then answered, and
        its client made, whether or not the one that asked is still waiting (as a server does)."""
        if on:
            self._handshakes_open.clear()
        else:
            self._handshakes_open.set()

    def slow_disconnects(self, seconds: float) -> None:
        """Take `seconds` over each `/meta/disconnect` (a server slow to let go): the client keeps its slot
        in the org's count until the answer."""
        self.disconnect_delay = seconds

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
        """The OAuth token endpoint: the username-password, JWT bearer and client-credentials flows, refusing
        with Salesforce's error codes and words (OAuth 2.0 endpoints: `invalid_client_id` "client identifier
        invalid", `invalid_client` "invalid client credentials", `invalid_grant` "authentication failure",
        "user hasn't approved this consumer", "audience is invalid", "invalid assertion", "no client
        credentials user enabled")."""
        form = await request.post()
        self.login_attempts += 1
        grant = form.get("grant_type")
        if grant == "password":
            username, refused = self._password_flow(form)
        elif grant == JWT_BEARER:
            username, refused = self._jwt_flow(str(form.get("assertion", "")))
        elif grant == "client_credentials":
            username, refused = self._client_credentials_flow(form)
        else:
            return _oauth_error("unsupported_grant_type", "grant type not supported")
        if refused is not None:
            return refused
        assert username is not None
        recent = self._login_times.setdefault(username, deque())
        now = time.monotonic()
        while recent and now - recent[0] > 3600:
            recent.popleft()
        if len(recent) >= self.max_logins_per_hour:
            return _oauth_error("invalid_grant", "LOGIN_RATE_EXCEEDED: Login Rate Exceeded")
        recent.append(now)  # every attempt counts, as in the org's Login History
        if grant == "password" and self.users.get(username) != form.get("password"):
            return _oauth_error("invalid_grant", "authentication failure")
        token = f"{self.org_id}!{secrets.token_urlsafe(24)}"
        self.tokens.add(token)
        self.logins += 1
        self.flows.append(str(grant))
        issued = str(int(time.time() * 1000))
        return web.json_response({"access_token": token, "instance_url": self.url,
                                  "id": f"{self.url}/id/{self.org_id}/{USER_ID}", "token_type": "Bearer",
                                  "issued_at": issued, "signature": secrets.token_urlsafe(32),
                                  "scope": "api"})

    def _password_flow(self, form: Any) -> tuple[str | None, web.Response | None]:
        consumer_key = str(form.get("client_id", ""))
        if consumer_key not in self.clients:
            return None, _oauth_error("invalid_client_id", "client identifier invalid")
        if self.clients[consumer_key] != form.get("client_secret"):
            return None, _oauth_error("invalid_client", "invalid client credentials")
        return str(form.get("username", "")), None

    def _client_credentials_flow(self, form: Any) -> tuple[str | None, web.Response | None]:
        consumer_key = str(form.get("client_id", ""))
        if consumer_key not in self.clients:
            return None, _oauth_error("invalid_client_id", "client identifier invalid")
        if self.clients[consumer_key] != form.get("client_secret"):
            return None, _oauth_error("invalid_client", "invalid client credentials")
        if consumer_key not in self.run_as:
            return None, _oauth_error("invalid_grant", "no client credentials user enabled")
        return self.run_as[consumer_key], None

    def _jwt_flow(self, assertion: str) -> tuple[str | None, web.Response | None]:
        """Verify the assertion as Salesforce does: the issuer is a connected app, the signature verifies
        with its certificate (RS256), the audience is this login URL, it has not expired, the subject is a
        user the app is approved for."""
        try:
            claims = jwt.decode(assertion, options={"verify_signature": False})
            header = jwt.get_unverified_header(assertion)
        except jwt.InvalidTokenError:
            return None, _oauth_error("invalid_grant", "invalid assertion")
        consumer_key = str(claims.get("iss", ""))
        if consumer_key not in self.certificates:
            return None, _oauth_error("invalid_client_id", "client identifier invalid")
        if header.get("alg") != "RS256":
            return None, _oauth_error("invalid_grant", "invalid assertion")
        try:
            jwt.decode(assertion, self.certificates[consumer_key], algorithms=["RS256"],
                       options={"verify_aud": False, "require": ["exp", "iss", "sub", "aud"]})
        except jwt.ExpiredSignatureError:
            return None, _oauth_error("invalid_grant", "expired assertion")
        except jwt.InvalidTokenError:
            return None, _oauth_error("invalid_grant", "invalid assertion")
        if str(claims.get("aud", "")).rstrip("/") != self.url:
            return None, _oauth_error("invalid_grant", "audience is invalid")
        username = str(claims.get("sub", ""))
        allowed = self.approved.get(consumer_key)
        if username not in self.users or (allowed is not None and username not in allowed):
            return None, _oauth_error("invalid_grant", "user hasn't approved this consumer")
        return username, None

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

    async def _update_topic(self, request: web.Request) -> web.Response:
        """`PATCH sobjects/PushTopic/<Id>`: 204 with no body, as Salesforce answers an update."""
        if self._bearer(request) is None:
            return _rest_error(401, "INVALID_SESSION_ID", "Session expired or invalid")
        record = next((t for t in self.topics.values() if t["Id"] == request.match_info["id"]), None)
        if record is None:
            return _rest_error(404, "NOT_FOUND", "The requested resource does not exist")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _rest_error(400, "JSON_PARSER_ERROR", "The request body is not valid JSON")
        if not isinstance(body, dict) or "Name" in body or "Id" in body:
            return _rest_error(400, "INVALID_FIELD_FOR_INSERT_UPDATE", "Unable to create/update fields: Name, Id")
        query = body.get("Query", record["Query"])
        if not isinstance(query, str) or not re.match(r"\s*SELECT\s+(.*\b)?Id\b", query, re.IGNORECASE):
            return _rest_error(400, "INVALID_FIELD", "The query must select the Id field")
        unknown = [k for k in body if k not in record]
        if unknown:
            return _rest_error(400, "INVALID_FIELD", f"No such column '{unknown[0]}' on sobject of type PushTopic")
        record.update(body)
        self.topic_updates.append(body)
        return web.Response(status=204)

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
                await self._handshakes_open.wait()
                reply, cookie = self._handshake(message, token, request.headers.get("User-Agent", ""))
                if cookie:
                    response = web.Response()
                    response.set_cookie("BAYEUX_BROWSER", cookie, httponly=True, path="/")
                replies.append(reply)
                continue
            client = self.bayeux.get(str(message.get("clientId")))
            if client is not None and client.expires is not None and time.monotonic() > client.expires:
                self._end(client.client_id, expired=True)  # swept: it stopped polling
                self._expired += 1
                client = None
            if token is None:
                if client is not None:  # advice none: the server is done with this client, its slot is free
                    self._end(client.client_id)
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
                client.record.unsubscribe(str(message.get("subscription")))
                replies.append(_reply(message, True, subscription=message.get("subscription")))
            elif channel == "/meta/disconnect":
                if self.disconnect_delay:
                    await asyncio.sleep(self.disconnect_delay)
                self._end(client.client_id)
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

    def _handshake(self, message: dict[str, Any], token: str | None,
                   user_agent: str = "") -> tuple[dict[str, Any], str | None]:
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
        client = _Client(secrets.token_hex(13), secrets.token_hex(16), token,
                         expires=time.monotonic() + self.max_interval,
                         record=ConnectionRecord(user_agent, idle_since=time.time()))
        self.bayeux[client.client_id] = client
        self.connection_log.append(client.record)
        return (_reply(message, True, clientId=client.client_id, version="1.0", minimumVersion="1.0",
                       supportedConnectionTypes=["long-polling"], ext={"replay": True, "payload.format": True}),
                client.cookie)

    def _channel_exists(self, channel: str) -> bool:
        base = replay_key(channel)
        kind, _, name = base.removeprefix("/").partition("/")
        if kind == "topic":
            return name in self.topics
        if "?" in channel:
            return False  # filters are for PushTopics only
        if kind == "event":
            return name in self.platform_events
        if kind == "data":
            return name == "ChangeEvents" or name.removesuffix("ChangeEvent") in self.cdc_entities
        if kind == "u":
            return base in self.streaming_channels
        return False

    def _subscribe(self, client: _Client, message: dict[str, Any]) -> dict[str, Any]:
        channel = str(message.get("subscription"))
        key = replay_key(channel)
        if channel in self.denied:
            return _reply(message, False, subscription=channel, error=self.denied[channel])
        if not self._channel_exists(channel):
            return _reply(message, False, subscription=channel,
                          error=f"400::The channel you requested to subscribe to doesn't exist {{{channel}}}")
        ext = message.get("ext") or {}
        replay_map = ext.get("replay") if isinstance(ext, dict) else None
        replay_id = -1
        if isinstance(replay_map, dict):  # keyed by the channel without a filter (EMP-Connector's way)
            if key not in replay_map:
                return _reply(message, False, subscription=channel,
                              error=f"400::The replayId for channel {{{key}}} wasn't found using the "
                                    "provided replay ID map")
            replay_id = replay_map[key]
        self._expire()
        conditions = filter_of(channel)
        if replay_id == -2:
            backlog = [e for e in self.events if e.topic == key]
        elif replay_id == -1:
            backlog = []
        elif isinstance(replay_id, int) and self.purged_upto <= replay_id <= self._last_replay:
            backlog = [e for e in self.events if e.topic == key and e.replay_id > replay_id]
        else:
            return _reply(message, False, subscription=channel,
                          error=f"400::The replayId {{{replay_id}}} you provided was invalid. Please provide a "
                                "valid ID, -2 to replay all events, or -1 to replay only new events.")
        client.subscriptions.add(channel)
        client.record.subscribe(channel)
        client.queue.extend({**e.message, "channel": channel, "clientId": client.client_id}
                            for e in backlog if _matches(conditions, e.fields))
        if backlog:
            client.wake.set()
        return _reply(message, True, subscription=channel)

    async def _connect(self, request: web.Request, client: _Client,
                       message: dict[str, Any]) -> list[dict[str, Any]] | bytes | None:
        """Hold one connect; while any is held the client cannot expire, and its end starts the clock."""
        client.polls += 1
        client.expires = None
        client.record.idle_since = None
        try:
            return await self._hold(request, client, message)
        finally:
            client.polls -= 1
            if not client.polls:
                client.expires = time.monotonic() + self.max_interval
                client.record.idle_since = time.time()

    async def _hold(self, request: web.Request, client: _Client,
                    message: dict[str, Any]) -> list[dict[str, Any]] | bytes | None:
        client.connects += 1
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
            self._end(client.client_id)  # advice none: the slot is free
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
                self._end(client.client_id)
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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _schema_id(name: str) -> str:
    """A stable schema id per event type, shaped like Salesforce's (22 URL-safe characters)."""
    return base64.urlsafe_b64encode(hashlib.sha256(name.encode()).digest()).decode()[:22]


def _public_key(pem: str | bytes) -> Any:
    """The verifying key of a connected app: from its PEM certificate (what the app's "Use digital
    signatures" upload takes) or a PEM public key."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"CERTIFICATE" in data:
        return x509.load_pem_x509_certificate(data).public_key()
    return serialization.load_pem_public_key(data)


def throwaway_certificate(common_name: str = "listenerd-dev", bits: int = 2048) -> tuple[str, str]:
    """A new RSA private key and a self-signed certificate for it, both PEM: what `openssl req -x509
    -newkey rsa:2048 -nodes` makes for a connected app (the certificate uploaded, the key kept), for
    the dev run and tests; nothing is written to disk."""
    import datetime as dt

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM).decode()


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
