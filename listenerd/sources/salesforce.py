"""Salesforce PushTopic source: one Bayeux client per integration, one channel per listener.

(A little over 400 lines: the shared client's two lanes and its listeners' lifecycle are one object.)

Why shared: Salesforce counts concurrent streaming clients per org (20 below Enterprise edition;
past it the handshake is refused with `403::Organization concurrent user limit exceeded`), and its
own clients put every topic on one client (forcedotcom/EMP-Connector `EmpConnector.java`: one
`BayeuxClient`, a `TopicSubscription` per topic; cometd/cometd
`cometd-javascript/common/src/main/webapp/js/cometd/cometd.js`). So, shaped as the DataSift source:
the supervisor still runs one task per listener; each task gets its integration's token through the
shared `Login` (`salesforce_auth.py`: cached, a new login only when Salesforce says the session is
invalid, single-flight), finds its PushTopic, then joins its integration's `Connection` (kept in
the supervisor's typed `SalesforceClients`) with its channel and replayId, and waits for its own
outcome. The connection's task owns the Bayeux client: a listener joining or leaving subscribes or
unsubscribes on the live client; a channel refused fails that listener alone; what ends the client
(401 again after a fresh login, advice none, silence) reaches every listener on it, and those that
come back make a new client with the cached token. The org's client limit is `retrying`, named,
after the long limit back-off (`LIMIT_BACKOFF_INITIAL` doubling to `LIMIT_BACKOFF_MAX`, per integration).

The protocol decisions live in `sources/bayeux.py` (pure); this module only moves requests: one
aiohttp `ClientSession` with its own cookie jar per Bayeux session (a new one at each handshake, so
`BAYEUX_BROWSER` never leaks into the next session); subscribes for listeners that join a live
client go beside the held connect, on the same cookie jar. Each event is emitted to its channel's
listener with its replayId as the checkpoint, which the outbox commits with the event, so a restart
resumes after the last event that is durable.

Replay choice (documented in the README): start at the stored checkpoint for `resume` (else -1);
`new` is -1 and `all` is -2 at each launch, but a retry inside one launch resumes from the
checkpoint so a reconnect never skips events, and a checkpoint set through the API is honoured (the
supervisor hands it to that run as `ctx.launch.replay_from`).
A replayId the server no longer holds is reported in the status message and resubscribed from -2
(`resume`, `all`: every retained event; duplicates keep their ids, so the engine drops them) or -1
(`new`: the listener asked for new events only).

A second listener of one integration on a channel its client already carries gets a second client
(a "lane"): one client holds one subscription per channel, with one replayId.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog

from listenerd.egress import refusal
from listenerd.model import SalesforceIntegration, SalesforceOptions, Sources, salesforce_channel_kind
from listenerd.net import describe, kind_of, sanitised
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
    replay_key,
)
from listenerd.sources.group import follow, group_key, resolve
from listenerd.sources.salesforce_auth import Login, Session, ensure_topic_for, topic_name

STOP_TIMEOUT = 2.0  # bound on the unsubscribe/disconnect sent while stopping
# Bound on a closing client's goodbye: an unanswered handshake awaited, then the disconnect. A listener
# leaving last waits this long for it, and a new client of the tenant waits for it before its handshake.
CLOSE_WAIT = 2 * STOP_TIMEOUT + 0.5
MAX_ANSWER_BYTES = 64 << 20  # bound on one long-poll answer (EMP-Connector advises a 10 MB buffer)
# Connects that fail fast are retried on the same clientId while Salesforce still holds it: it drops a
# client about 40 s after its last connect (Streaming API limits: "keepalive 40 s").
CONNECT_RETRY_WINDOW = 40.0


class AnswerTooLarge(Exception):
    """A long-poll answer past the bound: never buffered whole."""


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


def event_of(channel: str, data: Any) -> tuple[Any, dict[str, Any]] | None:
    """The payload root and `$` metadata of one streaming message, by the channel's kind; None when the
    message lacks its kind's parts.

    PushTopic: `data.sobject`, `$event` (`type`, `createdDate`, `replayId`). Platform Event, Change Data
    Capture, generic: `data.payload` (generic payloads are strings: JSON ones are decoded), `$event`
    (`replayId`, a Platform Event's `EventUuid`); CDC adds `$header`, the payload's `ChangeEventHeader`
    (`changeType`, `entityName`, `recordIds`, `commitTimestamp`, ...). `$channel` is the channel subscribed.
    """
    event = data.get("event") if isinstance(data, dict) else None
    if not isinstance(event, dict):
        return None
    meta: dict[str, Any] = {"$event": event, "$channel": channel}
    kind = salesforce_channel_kind(channel)
    if kind == "topic":
        sobject = data.get("sobject")
        return (sobject, meta) if isinstance(sobject, dict) else None
    if kind not in ("event", "data", "u") or "payload" not in data:
        return None
    payload = data["payload"]
    if kind == "u" and isinstance(payload, str) and payload[:1] in ("{", "["):
        with contextlib.suppress(orjson.JSONDecodeError):
            payload = orjson.loads(payload)
    if kind == "data":
        header = payload.get("ChangeEventHeader") if isinstance(payload, dict) else None
        if not isinstance(header, dict):
            return None
        meta["$header"] = header
    return payload, meta


def event_key(org_id: str, channel: str, replay_id: str) -> str:
    """The source's identity of an event: org, channel (without a filter's query) and replayId. A
    PushTopic's is `org/Name/replayId` as before channel kinds, so ids stay stable across the upgrade."""
    if salesforce_channel_kind(channel) == "topic":
        return f"{org_id}/{topic_name(channel)}/{replay_id}"
    return f"{org_id}{replay_key(channel)}/{replay_id}"


class SalesforceClients:
    """The logins and Bayeux clients of one supervisor (`ctx.shared`), by tenant and integration."""

    def __init__(self) -> None:
        self.logins: dict[str, Login] = {}
        self.connections: dict[str, list[Connection]] = {}
        self.closing: dict[str, set[Connection]] = {}  # by tenant: clients still saying goodbye

    def login_for(self, ctx: SourceContext) -> Login:
        # the settings too: after a reload that changes them, restarted listeners get a login that uses them
        key = group_key(ctx.tenant_id, ctx.integration.dump(), ctx.settings.dump(), repr(ctx.egress))
        found = self.logins.get(key)
        if found is None:
            found = self.logins[key] = Login(ctx.integration, ctx.settings, ctx.egress,  # type: ignore[arg-type]
                                                 user_agent=ctx.user_agent)
        return found

    def connection_for(self, ctx: SourceContext, login: Login, options: SalesforceOptions) -> Connection:
        """The integration's live client that does not carry this channel yet, else a new one."""
        key = group_key(id(login), options.version)
        lanes = self.connections.setdefault(key, [])
        key_of = replay_key(options.topic)  # a filtered topic shares its replay key with the unfiltered one
        for connection in lanes:
            if not connection.closed and all(replay_key(c) != key_of for c in connection.members):
                return connection

        tenant = ctx.tenant_id

        def retire(done: Connection) -> None:
            if done in lanes:
                lanes.remove(done)
            if not lanes and self.connections.get(key) is lanes:
                del self.connections[key]
            if done.task is not None and not done.task.done():  # its goodbye is still to come
                closing = self.closing.setdefault(tenant, set())
                closing.add(done)
                done.task.add_done_callback(lambda _: self._said_goodbye(tenant, done))

        # Release before acquire: the org counts a client until its disconnect is answered, so a new one
        # handshakes after the goodbyes of the tenant's clients closing now (an org below Enterprise
        # edition has 20 slots; a client closing as another opens would take two for a moment).
        after = [c.task for c in self.closing.get(tenant, ()) if c.task is not None]
        connection = Connection(login, options.version, ctx.settings, tenant_id=tenant, retire=retire, after=after)
        lanes.append(connection)
        return connection

    def _said_goodbye(self, tenant: str, done: Connection) -> None:
        closing = self.closing.get(tenant)
        if closing is not None:
            closing.discard(done)
            if not closing:
                del self.closing[tenant]


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
                 retire: Any = None, after: list[asyncio.Task[None]] | None = None):
        self.login = login
        self.version = version
        self.settings = settings
        self.ssl = login.ssl
        self.timeout = settings.connect_timeout
        self.session: Session | None = login.session
        self.http: aiohttp.ClientSession | None = None  # one per Bayeux session (its cookie jar)
        self.machine = BayeuxClient({}, margin=settings.salesforce_poll_margin, request_timeout=self.timeout,
                                    connect_retry_window=CONNECT_RETRY_WINDOW, service="Salesforce streaming")
        self.members: dict[str, _Member] = {}
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.max_answer = MAX_ANSWER_BYTES
        self._retire = retire
        self._after = after or []  # closing clients' tasks: their goodbyes come before this handshake
        self._unanswered: asyncio.Task[list[Any]] | None = None  # a handshake in flight when the client closed
        self._dirty = asyncio.Event()
        self._bound: float | None = None
        self._broken: Retry | None = None  # the control lane crashed: the client ends with this
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
            if self._broken is None:
                raise
            ended = self._broken  # cancelled by its own control lane, which crashed
            asyncio.current_task().uncancel()  # type: ignore[union-attr]
        except Exception as exc:  # a bug here must not strand the listeners: they retry
            self.log.exception("salesforce client crashed")
            ended = Retry("crash", f"Unexpected error: {type(exc).__name__}: {exc}")
        finally:
            self._close(cancel=False)
            control.cancel()
            for member in list(self.members.values()):
                resolve(member, ended)
            with contextlib.suppress(BaseException):
                await control
            await self._goodbye()
            if self.http is not None:
                await self.http.close()
                self.http = None

    async def _follow(self) -> None:
        """The poll lane: handshake, first subscribes, then connect after connect, until something ends it."""
        machine = self.machine
        if self._after:
            await asyncio.wait(self._after, timeout=CLOSE_WAIT)
            self._after = []
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
            request = machine.next_request()
            in_flight = asyncio.create_task(self._send(request))
            # A handshake is never cut off: the server makes the client whether or not the answer is read,
            # so a client closing meanwhile awaits it and disconnects that clientId (`_goodbye`).
            handshake = request.kind == "handshake"
            try:
                for output in outputs:
                    await self._emit(output)
                outputs = await (asyncio.shield(in_flight) if handshake else in_flight)
            finally:
                if not in_flight.done():
                    if handshake:
                        self._unanswered = in_flight
                    else:
                        in_flight.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await in_flight
            self._dirty.set()  # a connect answered: the control lane may have work again

    async def _control(self) -> None:
        """The control lane: subscribes and unsubscribes for listeners joining or leaving the live client."""
        machine = self.machine
        try:
            while True:
                await self._dirty.wait()
                self._dirty.clear()
                while (request := machine.control_request()) is not None:
                    try:
                        status, body = await self._post(request)
                        answer = orjson.loads(body) if status == 200 else None
                    except (aiohttp.ClientError, TimeoutError, OSError, AnswerTooLarge, orjson.JSONDecodeError):
                        answer = None
                    outputs = (machine.control_failed(request) if answer is None
                               else machine.control_answer(request, answer))
                    for output in outputs:
                        await self._handle(output)
        except Exception as exc:  # never a silent lane: its listeners would wait for a subscribe forever
            self.log.exception("salesforce control lane crashed")
            self._broken = Retry("crash", f"Unexpected error: {type(exc).__name__}: {exc}")
            if self.task is not None:
                self.task.cancel()

    async def _send(self, request: Request) -> list[Any]:
        machine = self.machine
        if request.kind == "handshake":
            if self.http is not None:
                await self.http.close()
            self.http = aiohttp.ClientSession(**self.login.http_options(cookie_jar=aiohttp.CookieJar(unsafe=True)))
        if request.delay:
            await asyncio.sleep(request.delay)
        try:
            status, body = await self._post(request)
        except AnswerTooLarge as exc:  # its events are lost to this session: a new one replays them
            self._count("oversized")
            return machine.malformed(str(exc))
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if (refused := refusal(exc)) is not None:
                raise Ended(Fail(f"instance_url: {refused}")) from None
            return machine.transport_error(f"{request.kind} failed: {describe(exc)}", kind_of(exc))
        for member in self.members.values():
            member.ctx.alive()
        if status != 200:
            return machine.http_error(status, sanitised(body[:400].decode("utf-8", "replace")))
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
                resolve(member, output.outcome)
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
        assert self.session is not None
        found = event_of(member.channel, message.data)
        if message.replay_id is None or found is None:
            member.ctx.count("malformed")
            member.ctx.log.warning("event without its payload or replayId skipped", channel=message.channel)
            return
        payload, meta = found
        replay_id = str(message.replay_id)
        await member.ctx.emit(payload, meta=meta, key=event_key(self.session.org_id, member.channel, replay_id),
                              checkpoint=replay_id)

    def _count(self, kind: str) -> None:
        for member in self.members.values():
            member.ctx.count(kind)

    # -- ending

    async def _goodbye(self) -> None:
        """Free the server's client slot: unsubscribe and disconnect, best effort, bounded. A handshake still
        unanswered is awaited first (bounded): its answer names the client to disconnect, as cometd.js's
        `disconnect()` sends `/meta/disconnect` from any state but disconnected (cometd/cometd
        `cometd-javascript/.../cometd.js`) and EMP-Connector's `stop()` calls `client.disconnect()`
        (forcedotcom/EMP-Connector `EmpConnector.java`)."""
        pending, self._unanswered = self._unanswered, None
        if pending is not None:
            try:
                with contextlib.suppress(Exception):  # refused, failed, timed out: no client to free
                    async with asyncio.timeout(STOP_TIMEOUT):
                        await pending  # the machine takes the answer: its clientId, if the server made one
            finally:
                if not pending.done():
                    pending.cancel()
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




async def run(ctx: SourceContext) -> None:
    """One listener: the shared login, its PushTopic, then its channel on the shared client until its outcome."""
    integration: SalesforceIntegration = ctx.integration  # type: ignore[assignment]
    options: SalesforceOptions = ctx.listener.options  # type: ignore[attr-defined]
    clients = ctx.shared.get(SalesforceClients)
    login = clients.login_for(ctx)
    ctx.starting(f"Logging in to {integration.login_url}")
    await login.current()
    if salesforce_channel_kind(options.topic) == "topic":  # the others are defined in the org, not by us
        name = topic_name(options.topic)
        if ctx.launch.attempt == 0 or name not in login.topics_found:  # no REST storm when a client ends
            ctx.starting(f"Looking up PushTopic {name}")
            outcome = await ensure_topic_for(login, options, ctx.settings)
            if outcome == "created":
                ctx.log.info("PushTopic created", topic=name)
            elif outcome.startswith("updated"):
                ctx.log.info("PushTopic updated to the listener's query", topic=name,
                             changed=outcome.removeprefix("updated: "))
            login.topics_found.add(name)
    stored = await ctx.checkpoint()
    replay = start_replay(options, stored, ctx.launch.attempt, ctx.launch.replay_from)
    ctx.starting(f"Subscribing to topic: {options.topic} (replay from {replay})")
    connection = clients.connection_for(ctx, login, options)
    await follow(connection, connection.add(ctx, options, replay), CLOSE_WAIT)
