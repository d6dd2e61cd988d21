"""Salesforce PushTopic source: one login and one Bayeux client per integration, one channel per listener.

(Over 400 lines: the login cache, the shared client and the listener's run are one lifecycle.)

Why shared: Salesforce counts concurrent streaming clients per org (20 below Enterprise edition;
past it the handshake is refused with `403::Organization concurrent user limit exceeded`) and logins
per user (3,600 an hour, then `LOGIN_RATE_EXCEEDED`), and its own clients put every topic on one
client (forcedotcom/EMP-Connector `EmpConnector.java`: one `BayeuxClient`, a `TopicSubscription`
per topic; cometd/cometd `cometd-javascript/common/src/main/webapp/js/cometd/cometd.js`). So, shaped
as the DataSift source: the supervisor still runs one task per listener; each task logs in through
its integration's `Login` (one token, cached, shared; a new login only when Salesforce says the
session is invalid, single-flight however many listeners notice at once), finds its PushTopic, then
joins its integration's `Connection` (kept in the supervisor's typed `SalesforceClients`) with its
channel and replayId and waits for its own outcome. The connection's task owns the Bayeux client: a
listener joining or leaving subscribes or unsubscribes on the live client; a channel refused fails
that listener alone; what ends the client (401 twice, advice none, silence) reaches every listener
on it, and those that come back make a new client with the cached token.

The protocol decisions live in `sources/bayeux.py` (pure); this module only does the I/O around it:

1. Login (OAuth 2.0 username-password) with aiohttp against `{login-url}/services/oauth2/token`,
   any host and scheme, TLS verified (optionally against `sources.ca-bundle`). `invalid_grant` /
   `invalid_client` are `failed` with Salesforce's own words; the secrets never appear anywhere.
   `LOGIN_RATE_EXCEEDED` and the org's client limit are `retrying`, named, after a long back-off
   (`LIMIT_BACKOFF_INITIAL` doubling to `LIMIT_BACKOFF_MAX`, +-20 % jitter, per integration).
2. PushTopic lookup and creation with simple-salesforce in direct mode, in a thread (it is
   synchronous), per listener. simple-salesforce always builds `https://<instance>` URLs, so a small
   `requests.Session` rebases them onto the instance URL as given (plain http for simulators).
3. Long-polling: one aiohttp `ClientSession` with its own cookie jar per Bayeux session (a new one at
   each handshake, so `BAYEUX_BROWSER` never leaks into the next session); subscribes for listeners
   that join a live client go beside the held connect, on the same cookie jar. Each event is
   emitted to its channel's listener with its replayId as the checkpoint, which the outbox commits
   with the event, so a restart resumes after the last event that is durable.

A second listener of one integration on a channel its client already carries gets a second client
(a "lane"): one client holds one subscription per channel, with one replayId.

Replay choice (documented in the README): start at the stored checkpoint for `resume` (else -1);
`new` is -1 and `all` is -2 at each launch, but a retry inside one launch resumes from the
checkpoint so a reconnect never skips events, and a checkpoint set through the API is honoured (the
supervisor hands it to that run as `ctx.launch.replay_from`).
A replayId the server no longer holds is reported in the status message and resubscribed from -2
(`resume`, `all`: every retained event; duplicates keep their ids, so the engine drops them) or -1
(`new`: the listener asked for new events only).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import requests
import structlog

from listenerd.backoff import backoff_delay
from listenerd.model import SalesforceIntegration, SalesforceOptions, Sources
from listenerd.net import client_tls, describe, kind_of, mask
from listenerd.outcome import Ended, Fail, Outcome, Retry
from listenerd.sources.base import SourceContext
from listenerd.sources.bayeux import (
    BayeuxClient,
    Message,
    Refused,
    Rehandshake,
    Relogin,
    ReplayRejected,
    Request,
    Subscribed,
)

STOP_TIMEOUT = 2.0  # bound on the unsubscribe/disconnect sent while stopping
MAX_ANSWER_BYTES = 64 << 20  # bound on one long-poll answer (EMP-Connector advises a 10 MB buffer)
FATAL_LOGIN_ERRORS = ("invalid_grant", "invalid_client", "invalid_client_id", "unsupported_grant_type")
# Salesforce's words when a user's logins pass 3,600 an hour (help article 000381578); matched anywhere
# in the OAuth error, before `invalid_grant` counts as bad credentials.
LOGIN_RATE_WORDS = ("login_rate_exceeded", "login rate exceeded")
# Back-off after the org's client limit or the login rate limit: they clear in minutes (a client
# expires, an hour's logins age), and each early retry spends more of the same quota.
LIMIT_BACKOFF_INITIAL = 60.0
LIMIT_BACKOFF_MAX = 300.0


@dataclass(frozen=True)
class Session:
    """The answer of a login; `repr` never shows the token."""

    access_token: str = field(repr=False)
    instance_url: str
    org_id: str


class AnswerTooLarge(Exception):
    """A long-poll answer past the bound: never buffered whole."""


class LoginRateExceeded(Exception):
    """Salesforce refused the login for the user's hourly login limit; carries its words."""


def scrub(text: str, integration: SalesforceIntegration) -> str:
    """Salesforce's words, minus any secret they might echo (the joined password first)."""
    return mask(text, integration.password + integration.secret_token, *integration.secret_values(), shortest=4)


def org_id_of(answer: dict[str, Any]) -> str:
    """The org from the identity URL `.../id/<orgId>/<userId>`, else the token's `<orgId>!` prefix."""
    parts = urlsplit(str(answer.get("id", ""))).path.strip("/").split("/")
    if len(parts) >= 3 and parts[-3] == "id":
        return parts[-2]
    token = str(answer.get("access_token", ""))
    return token.split("!", 1)[0] if "!" in token else "org"


async def login(http: aiohttp.ClientSession, integration: SalesforceIntegration, sslctx: ssl.SSLContext,
                timeout: float) -> Session:
    url = integration.login_url.rstrip("/") + "/services/oauth2/token"
    form = {"grant_type": "password", "client_id": integration.consumer_key,
            "client_secret": integration.consumer_secret, "username": integration.username,
            "password": integration.password + integration.secret_token}
    try:
        async with http.post(url, data=form, ssl=sslctx, timeout=aiohttp.ClientTimeout(total=timeout),
                             headers={"Accept": "application/json"}) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise Ended(Retry(kind_of(exc), f"Cannot reach {integration.login_url}: {describe(exc)}")) from None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if status == 200 and isinstance(answer, dict) and answer.get("access_token") and answer.get("instance_url"):
        return Session(answer["access_token"], str(answer["instance_url"]).rstrip("/"), org_id_of(answer))
    if isinstance(answer, dict) and answer.get("error"):
        words = scrub(f"{answer['error']}: {answer.get('error_description', '')}".rstrip(": "), integration)
        if any(w in words.lower() for w in LOGIN_RATE_WORDS):
            raise LoginRateExceeded(words)
        if answer["error"] in FATAL_LOGIN_ERRORS:
            raise Ended(Fail(f"Salesforce rejected the login: {words}"))
        raise Ended(Retry("refused", f"Login failed: {words}"))
    raise Ended(Retry("refused", f"Login failed: HTTP {status} from {integration.login_url}"))


# ---------------------------------------------------------------- PushTopic over REST (in a thread)


class RebasedSession(requests.Session):
    """Sends simple-salesforce's `https://<instance>/...` URLs to the instance URL as configured, verified
    against the configured CA bundle (or the system's)."""

    def __init__(self, instance_url: str, verify: str | bool, timeout: float):
        super().__init__()
        parts = urlsplit(instance_url)
        self._from = f"https://{parts.netloc}/"
        self._to = f"{parts.scheme}://{parts.netloc}/"
        self.verify = verify
        self._timeout = timeout

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> requests.Response:
        if isinstance(url, str) and url.startswith(self._from):
            url = self._to + url[len(self._from):]
        kwargs.setdefault("timeout", self._timeout)
        # Per request, because requests lets REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE override a session's verify.
        kwargs.setdefault("verify", self.verify)
        return super().request(method, url, *args, **kwargs)


def ensure_topic(session: Session, options: SalesforceOptions, verify: str | bool, timeout: float) -> str:
    """Find the PushTopic, creating it when a query is configured; 'found' or 'created'."""
    from simple_salesforce import Salesforce  # imported lazily: it pulls in a large dependency tree
    from simple_salesforce.exceptions import (
        SalesforceError,
        SalesforceExpiredSession,
        SalesforceGeneralError,
    )

    name = options.topic.removeprefix("/topic/")
    http = RebasedSession(session.instance_url, verify, timeout)
    sf = Salesforce(instance_url=session.instance_url, session_id=session.access_token, session=http,
                    version=options.version)
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    try:
        found = sf.query(f"SELECT Id, Name, Query, ApiVersion, IsActive FROM PushTopic WHERE Name = '{quoted}'")
        if found.get("totalSize", 0) > 0:
            return "found"
        if not options.query:
            raise Ended(Fail(f"PushTopic {name} does not exist in the org, and the listener has no query "
                             f"to create it with (set options.query, or create the PushTopic)"))
        sf.PushTopic.create({"Name": name, "Query": options.query, "ApiVersion": float(options.version),
                             "NotifyForOperationCreate": True, "NotifyForOperationUpdate": True,
                             "NotifyForOperationDelete": True, "NotifyForOperationUndelete": True,
                             "NotifyForFields": "Referenced"})
        return "created"
    except SalesforceExpiredSession:
        raise
    except SalesforceGeneralError as exc:
        raise Ended(Retry("refused", f"Salesforce REST error for PushTopic {name}: {rest_words(exc)}")) from None
    except SalesforceError as exc:
        raise Ended(Fail(f"Salesforce refused PushTopic {name}: {rest_words(exc)}")) from None
    except requests.RequestException as exc:
        raise Ended(Retry(kind_of(exc), f"Cannot reach {session.instance_url}: {describe(exc, limit=200)}")) from None
    finally:
        http.close()


def rest_words(exc: Any) -> str:
    content = getattr(exc, "content", None)
    if isinstance(content, list):
        return "; ".join(f"{c.get('errorCode', '')}: {c.get('message', '')}" for c in content if isinstance(c, dict))
    return f"HTTP {getattr(exc, 'status', '?')}"


# ---------------------------------------------------------------- the source


def start_replay(options: SalesforceOptions, stored: str | None, attempts: int,
                 replay_from: str | None = None) -> int:
    """Where a launch subscribes from.

    `resume`: the stored checkpoint, else -1. `new` / `all`: -1 / -2 at each launch, except that (a) a
    retry within a launch (`attempts` > 0) resumes from the checkpoint, so a reconnect never skips
    events, and (b) a resume point set through the API's `PUT .../checkpoint`, which restarts the
    listener "from there" (`replay_from`), is honoured.
    """
    for point in (replay_from, stored if options.replay == "resume" or attempts > 0 else None):
        if point is not None and point.lstrip("-").isdigit():
            return int(point)
    return -2 if options.replay == "all" else -1


class Login:
    """One integration's OAuth session, shared by its listeners and its Bayeux clients.

    `current()` logs in once and caches the token; `refresh(stale)` logs in again only if the token
    Salesforce refused is still the cached one, and concurrent callers share one login (single
    flight), so a session expiry under any number of listeners costs exactly one login.
    """

    def __init__(self, integration: SalesforceIntegration, settings: Sources):
        self.integration = integration
        self.ssl = client_tls(settings.ca_bundle)
        self.timeout = settings.connect_timeout
        self.session: Session | None = None
        self.logins = 0
        self._flight: asyncio.Task[Session] | None = None
        self._limit_hits = 0
        self.topics_found: set[str] = set()  # PushTopics seen to exist: a retry does not look them up again

    async def current(self) -> Session:
        return self.session if self.session is not None else await self._login()

    async def refresh(self, stale: Session | None) -> Session:
        if self.session is not None and self.session is not stale:
            return self.session  # another listener already logged in again
        self.session = None
        return await self._login()

    def limited(self) -> float:
        """A limit was hit (org clients, login rate): the long back-off, longer at each hit in a row."""
        self._limit_hits += 1
        return backoff_delay(self._limit_hits, LIMIT_BACKOFF_INITIAL, LIMIT_BACKOFF_MAX)

    def unlimited(self) -> None:
        self._limit_hits = 0

    async def _login(self) -> Session:
        if self._flight is None:
            self._flight = asyncio.create_task(self._post(), name=f"salesforce-login:{self.integration.login_url}")
            self._flight.add_done_callback(self._landed)
        return await asyncio.shield(self._flight)  # a waiter cancelled does not cancel the others' login

    def _landed(self, flight: asyncio.Task[Session]) -> None:
        if self._flight is flight:
            self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved here: a login nobody waits for any more is not an error to log

    async def _post(self) -> Session:
        try:
            async with aiohttp.ClientSession() as http:
                self.logins += 1
                session = await login(http, self.integration, self.ssl, self.timeout)
        except LoginRateExceeded as exc:
            raise Ended(Retry("refused", f"Salesforce's login rate limit for this user is reached "
                                         f"(LOGIN_RATE_EXCEEDED: {exc}); logging in again later",
                              delay=self.limited())) from None
        self.session = session
        return session


class SalesforceClients:
    """The logins and Bayeux clients of one supervisor (`ctx.shared`), by tenant and integration."""

    def __init__(self) -> None:
        self.logins: dict[str, Login] = {}
        self.connections: dict[str, list[Connection]] = {}

    def login_for(self, ctx: SourceContext) -> Login:
        # the settings too: after a reload that changes them, restarted listeners get a login that uses them
        key = _digest([ctx.tenant_id, ctx.integration.dump(), ctx.settings.dump()])
        found = self.logins.get(key)
        if found is None or found.integration != ctx.integration:
            found = self.logins[key] = Login(ctx.integration, ctx.settings)  # type: ignore[arg-type]
        return found

    def connection_for(self, ctx: SourceContext, login: Login, options: SalesforceOptions) -> Connection:
        """The integration's live client that does not carry this channel yet, else a new one."""
        key = _digest([id(login), options.version])
        lanes = self.connections.setdefault(key, [])
        for connection in lanes:
            if not connection.closed and options.topic not in connection.members:
                return connection
        connection = Connection(login, options.version, ctx.settings, tenant_id=ctx.tenant_id,
                                retire=lambda c: lanes.remove(c) if c in lanes else None)
        lanes.append(connection)
        return connection


def _digest(parts: list[Any]) -> str:
    return hashlib.sha256(orjson.dumps(parts, option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


@dataclass(eq=False)
class _Member:
    """One listener on a shared client: its channel, its status and its own outcome."""

    ctx: SourceContext
    options: SalesforceOptions
    outcome: asyncio.Future[Outcome]
    note: str = ""

    @property
    def channel(self) -> str:
        return self.options.topic


class Connection:
    """One Bayeux client of one integration, carrying a channel per listener; its task owns the HTTP."""

    def __init__(self, login: Login, version: str, settings: Sources, *, tenant_id: str = "",
                 retire: Any = None):
        self.login = login
        self.version = version
        self.settings = settings
        self.ssl = login.ssl
        self.timeout = settings.connect_timeout
        self.session: Session | None = login.session
        self.http: aiohttp.ClientSession | None = None  # one per Bayeux session (its cookie jar)
        self.machine = BayeuxClient({}, margin=settings.salesforce_poll_margin, request_timeout=self.timeout,
                                    service="Salesforce streaming")
        self.members: dict[str, _Member] = {}
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.max_answer = MAX_ANSWER_BYTES
        self._retire = retire
        self._dirty = asyncio.Event()
        self._bound: float | None = None
        self.log = structlog.get_logger("listenerd.source").bind(tenant=tenant_id, source="salesforce",
                                                                 login_url=login.integration.login_url)

    # -- listeners joining and leaving (called from listener tasks)

    def add(self, ctx: SourceContext, options: SalesforceOptions, replay: int) -> _Member:
        member = _Member(ctx, options, asyncio.get_running_loop().create_future())
        self.members[member.channel] = member
        self.machine.add(member.channel, replay, -1 if options.replay == "new" else -2)
        ctx.set_heartbeat_bound(self.machine.heartbeat_bound)
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"salesforce:{self.login.integration.login_url}")
        self._dirty.set()
        return member

    def remove(self, member: _Member) -> None:
        if self.members.get(member.channel) is member:
            del self.members[member.channel]
            if self.members:  # the others go on: unsubscribe on the live client
                self.machine.remove(member.channel)
                self._dirty.set()
        if not self.members and not self.closed:
            self._close()  # the last one: the task unsubscribes and disconnects on its way out

    # -- the client's task

    async def _run(self) -> None:
        ended: Outcome = Retry("closed", "Salesforce streaming client closed")
        control = asyncio.create_task(self._control(), name="salesforce-control")
        try:
            await self._follow()
        except Ended as exc:
            ended = exc.outcome
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not strand the listeners: they retry
            self.log.exception("salesforce client crashed")
            ended = Retry("crash", f"Unexpected error: {type(exc).__name__}: {exc}")
        finally:
            self._close(cancel=False)
            control.cancel()
            for member in list(self.members.values()):
                _resolve(member, ended)
            with contextlib.suppress(BaseException):
                await control
            await self._goodbye()
            if self.http is not None:
                await self.http.close()
                self.http = None

    async def _follow(self) -> None:
        """The poll lane: handshake, first subscribes, then connect after connect, until something ends it."""
        machine = self.machine
        self.session = await self.login.current()
        outputs: list[Any] = []
        while True:
            if not all(isinstance(o, Message) for o in outputs):
                for output in outputs:  # anything but events: in order, before the next request
                    await self._handle(output)
                outputs = []
            if machine.subscribed and self._bound != machine.heartbeat_bound:
                self._bound = machine.heartbeat_bound
                for member in self.members.values():
                    member.ctx.set_heartbeat_bound(self._bound)
            # Reconnect at once and hand the last answer's events on while the next poll is in flight:
            # Salesforce wants the next connect soon after an answer with events (40 s), and the two
            # overlap (the server prepares the next batch while the outbox takes this one).
            in_flight = asyncio.create_task(self._send(machine.next_request()))
            try:
                for output in outputs:
                    await self._emit(output)
                outputs = await in_flight
            finally:
                if not in_flight.done():
                    in_flight.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await in_flight
            self._dirty.set()  # a connect answered: the control lane may have work again

    async def _control(self) -> None:
        """The control lane: subscribes and unsubscribes for listeners joining or leaving the live client."""
        machine = self.machine
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            while (request := machine.control_request()) is not None:
                try:
                    status, body = await self._post(request)
                    answer = orjson.loads(body) if status == 200 else None
                except (aiohttp.ClientError, TimeoutError, OSError, AnswerTooLarge, orjson.JSONDecodeError):
                    answer = None
                outputs = machine.control_failed(request) if answer is None else machine.control_answer(request,
                                                                                                       answer)
                for output in outputs:
                    await self._handle(output)

    async def _send(self, request: Request) -> list[Any]:
        machine = self.machine
        if request.kind == "handshake":
            if self.http is not None:
                await self.http.close()
            self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        if request.delay:
            await asyncio.sleep(request.delay)
        try:
            status, body = await self._post(request)
        except AnswerTooLarge as exc:  # its events are lost to this session: a new one replays them
            self._count("oversized")
            return machine.malformed(str(exc))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return machine.transport_error(f"{request.kind} failed: {describe(exc)}", kind_of(exc))
        for member in self.members.values():
            member.ctx.alive()
        if status != 200:
            return machine.http_error(status, body[:200].decode("utf-8", "replace"))
        try:
            messages = orjson.loads(body)
        except orjson.JSONDecodeError:
            self._count("malformed")
            return machine.malformed(f"{request.kind} answer is not JSON")
        if not isinstance(messages, dict | list) or (isinstance(messages, list)
                                                     and not all(isinstance(m, dict) for m in messages)):
            self._count("malformed")  # JSON, but not Bayeux messages: the machine re-handshakes; count it too
        return machine.receive(messages)

    async def _post(self, request: Request) -> tuple[int, bytes]:
        if self.http is None or self.session is None:
            raise aiohttp.ClientConnectionError("no Bayeux session")
        url = f"{self.session.instance_url}/cometd/{self.version}"
        headers = {"Authorization": f"Bearer {self.session.access_token}", "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=request.timeout, connect=self.timeout)
        async with self.http.post(url, data=orjson.dumps(request.messages), headers=headers, ssl=self.ssl,
                                  timeout=timeout) as response:
            length = response.content_length
            if length is not None and length <= self.max_answer:
                return response.status, await response.read()
            body = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > self.max_answer:
                    raise AnswerTooLarge(f"answer larger than {self.max_answer} bytes")
            return response.status, bytes(body)

    async def _handle(self, output: Any) -> None:
        if isinstance(output, Message):
            await self._emit(output)
        elif isinstance(output, Subscribed):
            self.login.unlimited()
            member = self.members.get(output.channel)
            if member is not None and not member.outcome.done():
                member.ctx.started(f"Subscribed to topic: {member.channel}{member.note}")
                if output.resubscribe:
                    member.ctx.log.info("resubscribed", topic=member.channel, replay=output.replay)
        elif isinstance(output, ReplayRejected):
            member = self.members.get(output.channel)
            if member is not None:
                what = "all retained events" if output.fallback == -2 else "new events only"
                member.note = (f" (replayId {output.replay_id} is no longer retained by Salesforce: resumed with "
                               f"{what}; events in between may be missing)")
                member.ctx.count("replay_gap")
                member.ctx.log.warning("replayId outside the retention window", replay=output.replay_id,
                                       fallback=output.fallback, error=output.error)
        elif isinstance(output, Refused):
            member = self.members.get(output.channel)
            if member is not None:
                _resolve(member, output.outcome)
        elif isinstance(output, Rehandshake):
            for member in self.members.values():
                member.ctx.reconnected()
            self.log.info("new Bayeux handshake", reason=output.reason)
            if output.abandoned:  # the server still holds it: free its slot before taking a new one
                await self._post_quietly(Request("disconnect", [{"channel": "/meta/disconnect",
                                                                 "clientId": output.abandoned, "id": "bye"}],
                                                 STOP_TIMEOUT))
        elif isinstance(output, Relogin):
            for member in self.members.values():
                member.ctx.reconnected()
            self.log.info("session expired; logging in again", reason=output.reason)
            self.session = await self.login.refresh(self.session)
            self.machine.relogged_in()
        elif isinstance(output, Retry):
            if self.machine.limited:
                output = dataclasses.replace(output, delay=self.login.limited())
            raise Ended(output)
        elif isinstance(output, Fail):
            raise Ended(output)

    async def _emit(self, message: Message) -> None:
        member = self.members.get(message.channel)
        if member is None:
            return
        data = message.data
        sobject = data.get("sobject") if isinstance(data, dict) else None
        event = data.get("event") if isinstance(data, dict) else None
        if message.replay_id is None or not isinstance(sobject, dict) or not isinstance(event, dict):
            member.ctx.count("malformed")
            member.ctx.log.warning("event without sobject or replayId skipped", channel=message.channel)
            return
        assert self.session is not None
        replay_id = str(message.replay_id)
        key = f"{self.session.org_id}/{member.channel.removeprefix('/topic/')}/{replay_id}"
        await member.ctx.emit(sobject, meta={"$event": event, "$channel": message.channel}, key=key,
                              checkpoint=replay_id)

    def _count(self, kind: str) -> None:
        for member in self.members.values():
            member.ctx.count(kind)

    # -- ending

    async def _goodbye(self) -> None:
        """Free the server's client slot: unsubscribe and disconnect, best effort, bounded."""
        request = self.machine.stop_request()
        if request is not None:
            await self._post_quietly(request)

    async def _post_quietly(self, request: Request) -> None:
        if self.http is None or self.session is None:
            return
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, AnswerTooLarge):
            async with asyncio.timeout(STOP_TIMEOUT):
                await self._post(request)

    def _close(self, cancel: bool = True) -> None:
        """No new listener may join this client; the next one makes a new client."""
        if not self.closed:
            self.closed = True
            if self._retire is not None:
                self._retire(self)
        if cancel and self.task is not None and not self.task.done():
            self.task.cancel()


def _resolve(member: _Member, outcome: Outcome) -> None:
    if not member.outcome.done():
        member.outcome.set_result(outcome)


async def ensure_topic_for(login: Login, options: SalesforceOptions, settings: Sources) -> str:
    """`ensure_topic` in a thread, with the shared token; a 401 there refreshes it once (single flight)."""
    from simple_salesforce.exceptions import SalesforceExpiredSession

    verify: str | bool = settings.ca_bundle or True
    session = await login.current()
    for attempt in (1, 2):
        try:
            return await asyncio.to_thread(ensure_topic, session, options, verify, settings.connect_timeout)
        except SalesforceExpiredSession:
            if attempt == 2:
                raise Ended(Retry("refused", "Salesforce refused a fresh session for the REST API")) from None
            session = await login.refresh(session)
    raise AssertionError("unreachable")


async def run(ctx: SourceContext) -> None:
    """One listener: the shared login, its PushTopic, then its channel on the shared client until its outcome."""
    integration: SalesforceIntegration = ctx.integration  # type: ignore[assignment]
    options: SalesforceOptions = ctx.listener.options  # type: ignore[attr-defined]
    clients = ctx.shared.get(SalesforceClients)
    login = clients.login_for(ctx)
    ctx.starting(f"Logging in to {integration.login_url}")
    await login.current()
    name = options.topic.removeprefix("/topic/")
    if ctx.launch.attempt == 0 or options.topic not in login.topics_found:  # no REST storm when a client ends
        ctx.starting(f"Looking up PushTopic {name}")
        if await ensure_topic_for(login, options, ctx.settings) == "created":
            ctx.log.info("PushTopic created", topic=name)
        login.topics_found.add(options.topic)
    stored = await ctx.checkpoint()
    replay = start_replay(options, stored, ctx.launch.attempt, ctx.launch.replay_from)
    ctx.starting(f"Subscribing to topic: {options.topic} (replay from {replay})")
    connection = clients.connection_for(ctx, login, options)
    member = connection.add(ctx, options, replay)
    try:
        outcome = await member.outcome
    finally:
        connection.remove(member)
        task = connection.task
        if connection.closed and task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task}, timeout=STOP_TIMEOUT + 0.5)  # its goodbye, bounded
    raise Ended(outcome)
