"""Salesforce PushTopic source: OAuth login, PushTopic lookup/creation, and the Bayeux driver with replay.

The protocol decisions live in `sources/bayeux.py` (pure); this module only does the I/O around it:

1. Login (OAuth 2.0 username-password) with aiohttp against `{login-url}/services/oauth2/token`,
   any host and scheme, TLS verified (optionally against `sources.ca-bundle`). `invalid_grant` /
   `invalid_client` are `failed` with Salesforce's own words; the secrets never appear anywhere.
2. PushTopic lookup and creation with simple-salesforce in direct mode, in a thread (it is
   synchronous). simple-salesforce always builds `https://<instance>` URLs, so a small
   `requests.Session` rebases them onto the instance URL as given (plain http for simulators).
3. Long-polling: one aiohttp `ClientSession` with its own cookie jar per Bayeux session (a new one at
   each handshake, so `BAYEUX_BROWSER` never leaks into the next session). Each event is emitted
   with its replayId as the checkpoint, which the outbox commits with the event, so a restart
   resumes after the last event that is durable.

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
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import requests

from listenerd.model import SalesforceIntegration, SalesforceOptions
from listenerd.net import client_tls, describe, kind_of, mask
from listenerd.outcome import Ended, Fail, Retry
from listenerd.sources.base import SourceContext
from listenerd.sources.bayeux import (
    BayeuxClient,
    Message,
    Rehandshake,
    Relogin,
    ReplayRejected,
    Request,
    Subscribed,
)

STOP_TIMEOUT = 2.0  # bound on the unsubscribe/disconnect sent while stopping
MAX_ANSWER_BYTES = 64 << 20  # bound on one long-poll answer (EMP-Connector advises a 10 MB buffer)
FATAL_LOGIN_ERRORS = ("invalid_grant", "invalid_client", "invalid_client_id", "unsupported_grant_type")


@dataclass(frozen=True)
class Session:
    """The answer of a login; `repr` never shows the token."""

    access_token: str = field(repr=False)
    instance_url: str
    org_id: str


class AnswerTooLarge(Exception):
    """A long-poll answer past the bound: never buffered whole."""


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


async def run(ctx: SourceContext) -> None:
    integration: SalesforceIntegration = ctx.integration  # type: ignore[assignment]
    options: SalesforceOptions = ctx.listener.options  # type: ignore[attr-defined]
    stream = Stream(ctx, integration, options)
    try:
        await stream.run()
    except asyncio.CancelledError:
        await stream.goodbye()
        raise
    finally:
        await stream.close()


class Stream:
    """One launch of a Salesforce listener: login, topic, then the Bayeux loop until cancelled."""

    def __init__(self, ctx: SourceContext, integration: SalesforceIntegration, options: SalesforceOptions):
        self.ctx = ctx
        self.integration = integration
        self.options = options
        self.settings = ctx.settings
        self.ssl = client_tls(self.settings.ca_bundle)
        self.timeout = self.settings.connect_timeout
        self.session: Session | None = None
        self.http: aiohttp.ClientSession | None = None  # one per Bayeux session (its cookie jar)
        self.bayeux: BayeuxClient | None = None
        self.note = ""
        self.max_answer = MAX_ANSWER_BYTES

    async def run(self) -> None:
        ctx, options = self.ctx, self.options
        ctx.starting(f"Logging in to {self.integration.login_url}")
        await self.login()
        name = options.topic.removeprefix("/topic/")
        ctx.starting(f"Looking up PushTopic {name}")
        outcome = await self.ensure_topic()
        if outcome == "created":
            ctx.log.info("PushTopic created", topic=name)
        stored = await ctx.checkpoint()
        replay = start_replay(options, stored, ctx.launch.attempt, ctx.launch.replay_from)
        ctx.starting(f"Subscribing to topic: {options.topic} (replay from {replay})")
        await self.follow(replay)

    async def follow(self, replay: int) -> None:
        """The Bayeux loop on the logged-in session, until cancelled or a Retry/Fail ends it."""
        ctx, options = self.ctx, self.options
        self.bayeux = BayeuxClient({options.topic: replay}, replay_fallback=-1 if options.replay == "new" else -2,
                                   margin=self.settings.salesforce_poll_margin, request_timeout=self.timeout,
                                   service="Salesforce streaming")
        bound = None
        outputs: list[Any] = []
        while True:
            if not all(isinstance(o, Message) for o in outputs):
                for output in outputs:  # anything but events: in order, before the next request
                    await self.handle(output)
                outputs = []
            if self.bayeux.subscribed and bound != self.bayeux.heartbeat_bound:
                bound = self.bayeux.heartbeat_bound
                ctx.set_heartbeat_bound(bound)
            # Reconnect at once and hand the last answer's events on while the next poll is in flight:
            # Salesforce wants the next connect soon after an answer with events (40 s), and the two
            # overlap (the server prepares the next batch while the outbox takes this one).
            in_flight = asyncio.create_task(self.send(self.bayeux.next_request()))
            try:
                for output in outputs:
                    await self.emit(output)
                outputs = await in_flight
            finally:
                if not in_flight.done():
                    in_flight.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await in_flight

    async def login(self) -> None:
        async with aiohttp.ClientSession() as http:
            self.session = await login(http, self.integration, self.ssl, self.timeout)

    async def ensure_topic(self) -> str:
        from simple_salesforce.exceptions import SalesforceExpiredSession

        verify: str | bool = self.settings.ca_bundle or True
        for attempt in (1, 2):
            assert self.session is not None
            try:
                return await asyncio.to_thread(ensure_topic, self.session, self.options, verify, self.timeout)
            except SalesforceExpiredSession:
                if attempt == 2:
                    raise Ended(Retry("refused", "Salesforce refused a fresh session for the REST API")) from None
                await self.login()
        raise AssertionError("unreachable")

    async def send(self, request: Request) -> list[Any]:
        assert self.bayeux is not None and self.session is not None
        if request.kind == "handshake":
            await self.close()
            self.http = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        if request.delay:
            await asyncio.sleep(request.delay)
        try:
            status, body = await self.post(request)
        except AnswerTooLarge as exc:  # its events are lost to this session: a new one replays them
            self.ctx.count("oversized")
            return self.bayeux.malformed(str(exc))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return self.bayeux.transport_error(f"{request.kind} failed: {describe(exc)}", kind_of(exc))
        self.ctx.alive()
        if status != 200:
            return self.bayeux.http_error(status, body[:200].decode("utf-8", "replace"))
        try:
            messages = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.ctx.count("malformed")
            return self.bayeux.malformed(f"{request.kind} answer is not JSON")
        if not isinstance(messages, dict | list) or (isinstance(messages, list)
                                                     and not all(isinstance(m, dict) for m in messages)):
            self.ctx.count("malformed")  # JSON, but not Bayeux messages: the machine re-handshakes; count it too
        return self.bayeux.receive(messages)

    async def post(self, request: Request) -> tuple[int, bytes]:
        assert self.http is not None and self.session is not None
        url = f"{self.session.instance_url}/cometd/{self.options.version}"
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

    async def handle(self, output: Any) -> None:
        ctx = self.ctx
        if isinstance(output, Message):
            await self.emit(output)
        elif isinstance(output, Subscribed):
            ctx.started(f"Subscribed to topic: {self.options.topic}{self.note}")
            if output.resubscribe:
                ctx.log.info("resubscribed", topic=self.options.topic, replay=output.replay)
        elif isinstance(output, ReplayRejected):
            what = "all retained events" if output.fallback == -2 else "new events only"
            self.note = (f" (replayId {output.replay_id} is no longer retained by Salesforce: resumed with "
                         f"{what}; events in between may be missing)")
            ctx.count("replay_gap")
            ctx.log.warning("replayId outside the retention window", replay=output.replay_id,
                            fallback=output.fallback, error=output.error)
        elif isinstance(output, Rehandshake):
            ctx.reconnected()
            ctx.log.info("new Bayeux handshake", reason=output.reason)
        elif isinstance(output, Relogin):
            ctx.reconnected()
            ctx.log.info("session expired; logging in again", reason=output.reason)
            await self.login()
            assert self.bayeux is not None
            self.bayeux.relogged_in()
        elif isinstance(output, Retry | Fail):
            raise Ended(output)

    async def emit(self, message: Message) -> None:
        data = message.data
        sobject = data.get("sobject") if isinstance(data, dict) else None
        event = data.get("event") if isinstance(data, dict) else None
        if message.replay_id is None or not isinstance(sobject, dict) or not isinstance(event, dict):
            self.ctx.count("malformed")
            self.ctx.log.warning("event without sobject or replayId skipped", channel=message.channel)
            return
        replay_id = str(message.replay_id)
        await self.ctx.emit(sobject, meta={"$event": event, "$channel": message.channel},
                            key=self.key_prefix + replay_id, checkpoint=replay_id)

    @property
    def key_prefix(self) -> str:
        """`<orgId>/<topic name>/`: with the replayId, the event's identity across restarts."""
        assert self.session is not None
        return f"{self.session.org_id}/{self.options.topic.removeprefix('/topic/')}/"

    async def goodbye(self) -> None:
        """Free the server's client slot: unsubscribe and disconnect, best effort, bounded."""
        request = self.bayeux.stop_request() if self.bayeux else None
        if request is None or self.http is None or self.session is None:
            return
        try:
            async with asyncio.timeout(STOP_TIMEOUT):
                await self.post(request)
        except (aiohttp.ClientError, TimeoutError, OSError):
            pass

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
