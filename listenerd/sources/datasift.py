"""DataSift multi-stream source: one shared WebSocket per tenant and credentials, one hash per listener.

Why it is shaped this way: DataSift's `/multi` endpoint carries many stream hashes on one socket
(`{stream-url}?username=U&api_key=K`, then `{"action":"subscribe","hash":H}` per hash), and an
account's connections are a limited resource, so the listeners of one tenant that use the same
credentials and stream URL share ONE socket. The supervisor still runs one task per listener: each
task registers its hash with the shared `Stream` (kept in the supervisor's typed `Streams`) and
waits for its own outcome, while the stream's own task owns the socket. The socket lives for one
connection "epoch": when it ends (drop, `{"reconnect": true}`, 65 s of silence, a failure) every
listener on it gets its outcome, the supervisor applies its policy, and the listeners that come
back open a fresh socket and resubscribe their hashes, after the delay of the reconnect policy kept
per tenant and credentials across sockets (`ReconnectPolicy`: DataSift's own client's back-off). Adding
or removing a listener while the socket is live subscribes or unsubscribes on it; the last listener to
leave closes it. A failure or a "doesn't exist" warning naming hashes ends only their listeners.

Every protocol decision (subscriptions, failure scope, when a listener is started, silence) lives in
`datasift_protocol.DataSiftProtocol`, without I/O; this module only moves frames, sleeps until the
machine's deadline and performs its actions.

The api key travels only in the URL query and is never logged: logs and reasons carry the URL
without its query, and the machine masks any server text that echoes the key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from listenerd.egress import EgressRefused, Policy, websocket_options
from listenerd.model import Sources
from listenerd.net import client_tls, describe, kind_of
from listenerd.outcome import Ended, Fail, Outcome, Retry
from listenerd.sources.base import SourceContext
from listenerd.sources.datasift_protocol import (
    Action,
    Count,
    DataSiftProtocol,
    End,
    Item,
    Notice,
    ReconnectPolicy,
    Resolve,
    Send,
    Started,
    Unconfirmed,
    public_url,
    stream_url,
)
from listenerd.sources.group import Registered, follow, group_key, resolve

_CLOSE_WAIT = 2.0  # how long the last listener leaving waits for the socket's close handshake
# websockets logs the request line (with the api key in its query) at DEBUG: never let that through,
# whatever the daemon's log level.
_WS_LOG = logging.getLogger("listenerd.source.datasift.websockets")
_WS_LOG.setLevel(logging.INFO)


class Streams(dict[str, "Stream"]):
    """The live sockets of one supervisor, by tenant, credentials, URL and settings (`ctx.shared`), and
    the reconnect policy of each key, which outlives its sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.policies: dict[str, ReconnectPolicy] = {}


@dataclass(eq=False)
class _Subscriber:
    ctx: SourceContext
    hash: str
    outcome: asyncio.Future[Outcome]
    member: int  # the machine's ticket for this listener
    started: bool = False


@dataclass(eq=False)
class Stream(Registered):
    """One WebSocket to `/multi` shared by every listener of one tenant with the same credentials."""

    key: str
    registry: Streams
    tenant_id: str
    username: str
    api_key: str
    base_url: str
    settings: Sources
    egress: Policy | None = None  # an API-made integration's connections obey it
    user_agent: str = ""  # `net.user_agent`: names the node in a cluster
    subscribers: list[_Subscriber] = field(default_factory=list)
    closed: bool = False
    task: asyncio.Task[None] | None = None
    ws: ClientConnection | None = None
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    # frames to send and listeners to mark started, in order: a listener is started after its subscribe
    _outgoing: deque[Action] = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.url = public_url(self.base_url)
        self.machine = DataSiftProtocol(url=self.url, api_key=self.api_key,
                                        silence_timeout=self.settings.datasift_silence_timeout,
                                        max_frame_bytes=self.settings.max_frame_bytes,
                                        policy=self.registry.policies.setdefault(self.key, ReconnectPolicy()))
        self.log = structlog.get_logger("listenerd.source").bind(tenant=self.tenant_id, source="datasift",
                                                                 stream=self.url)

    def log_for(self, stream_hash: str | None) -> Any:
        """The stream's logger, naming the listener(s) that follow `stream_hash`."""
        ids = sorted({s.ctx.listener_id for s in self.subscribers if s.hash == stream_hash})
        return self.log.bind(listener=",".join(ids)) if ids else self.log

    # -- listeners joining and leaving (called from listener tasks)

    def add(self, ctx: SourceContext, stream_hash: str) -> _Subscriber:
        sub = _Subscriber(ctx, stream_hash, asyncio.get_running_loop().create_future(), self.machine.join(stream_hash))
        self.subscribers.append(sub)
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"datasift:{self.url}")
        self._dirty.set()
        return sub

    def remove(self, sub: _Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
            self.machine.leave(sub.member)
        if not self.subscribers and not self.closed:
            self.registry.policies.pop(self.key, None)  # nobody follows these credentials any more
            self._close()
        else:
            self._dirty.set()

    # -- the socket's task

    async def _run(self) -> None:
        try:
            await self._connect_and_read()
            ended: Outcome = Retry("closed", "DataSift closed the connection")
        except Ended as exc:
            ended = exc.outcome
        except asyncio.CancelledError:
            ended = Retry("closed", "DataSift connection closed")
            raise
        except Exception as exc:  # a bug here must not strand the listeners: they retry
            self.log.exception("datasift stream crashed")
            ended = Retry("crash", f"Unexpected error: {type(exc).__name__}: {self.machine.mask(str(exc))}")
        finally:
            self._close(cancel=False)
            for sub in list(self.subscribers):
                resolve(sub, ended)
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_CLOSE_WAIT):
                        await self.ws.close()

    async def _connect_and_read(self) -> None:
        settings, machine = self.settings, self.machine
        url = stream_url(self.base_url, self.username, self.api_key)
        for sub in self.subscribers:
            sub.ctx.starting(f"Connecting to DataSift at {self.url} for stream: {sub.hash}")
        try:
            checked = await websocket_options(self.egress, "datasift", url, "stream-url", settings.connect_timeout)
        except EgressRefused as exc:
            raise Ended(Fail(str(exc))) from None
        except (OSError, TimeoutError) as exc:
            raise Ended(machine.unreachable(describe(exc), kind_of(exc))) from None
        try:
            self.ws = await connect(
                url, **checked, open_timeout=settings.connect_timeout,
                ssl=client_tls(settings.ca_bundle) if url.lower().startswith("wss:") else None,
                max_size=settings.max_frame_bytes * 16, close_timeout=_CLOSE_WAIT,
                user_agent_header=self.user_agent, logger=_WS_LOG)
        except InvalidURI:
            raise Ended(machine.invalid_url()) from None
        except InvalidStatus as exc:
            raise Ended(machine.handshake_refused(exc.response.status_code)) from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            raise Ended(machine.unreachable(describe(exc), kind_of(exc))) from None
        loop = asyncio.get_running_loop()
        self._outgoing.extend(machine.opened(loop.time()))
        self.log.info("datasift connected", listener=",".join(sorted({s.ctx.listener_id for s in self.subscribers})))
        writer = asyncio.create_task(self._write(), name=f"datasift-write:{self.url}")
        try:
            await self._read(loop)
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def _write(self) -> None:
        """Send the machine's frames and mark listeners started, in order (started after its subscribe)."""
        assert self.ws is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self._outgoing.extend(self.machine.sync(asyncio.get_running_loop().time()))
            while self._outgoing:
                action = self._outgoing.popleft()
                if isinstance(action, Send):
                    await self.ws.send(action.text)
                    self.log_for(action.hash).info(f"datasift {action.action}", hash=action.hash)
                    if action.action == "subscribe":
                        for sub in self.subscribers:
                            if sub.hash == action.hash and not sub.started and not sub.outcome.done():
                                sub.ctx.starting(f"Subscribed to stream {sub.hash}; waiting for DataSift "
                                                 f"to confirm it")
                elif isinstance(action, Started):
                    self._mark_started(action.members)

    async def _read(self, loop: asyncio.AbstractEventLoop) -> None:
        assert self.ws is not None
        machine = self.machine
        while True:
            try:
                async with asyncio.timeout_at(machine.deadline()):  # not wait_for: on 3.11 it can swallow a cancel
                    raw = await self.ws.recv(decode=False)
            except TimeoutError:
                await self._perform(machine.tick(loop.time()))
                continue
            except ConnectionClosed as exc:
                received = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else None
                sent = (exc.sent.code, exc.sent.reason) if exc.sent is not None else None
                raise Ended(machine.closed(received, sent)) from None
            if self.closed:  # the last listener left while this frame arrived
                return
            for sub in self.subscribers:
                sub.ctx.alive()
            await self._perform(machine.receive(raw, loop.time()))
            machine.listening(loop.time())  # time spent emitting under back-pressure is not the server's silence

    async def _perform(self, actions: list[Action]) -> None:
        for action in actions:
            match action:
                case Item():
                    meta = {"$hash": action.hash, "$deleted": action.deleted}
                    for sub in [s for s in self.subscribers if s.hash == action.hash]:
                        await sub.ctx.emit(action.data, meta=meta, key=action.key)
                case Started():
                    self._outgoing.append(action)  # behind any subscribe still being written
                    self._dirty.set()
                case Unconfirmed():
                    for sub in self.subscribers:
                        if sub.member in action.members and not sub.started and not sub.outcome.done():
                            sub.ctx.starting(action.message)
                case Notice():
                    log = self.log_for(action.hash)
                    if action.level == "warning":
                        log.warning("datasift warning", message=action.message, hash=action.hash)
                    else:
                        log.info("datasift notice", level=action.level, message=action.message, hash=action.hash)
                case Count():
                    for sub in self.subscribers:
                        if sub.hash in action.hashes:
                            sub.ctx.count(action.kind)
                    self.log.warning("datasift frame skipped", kind=action.kind, reason=action.reason)
                case Resolve():
                    for sub in [s for s in self.subscribers if s.hash == action.hash]:
                        resolve(sub, action.outcome)
                case End():
                    raise Ended(action.outcome)

    def _mark_started(self, members: frozenset[int]) -> None:
        for sub in self.subscribers:
            if sub.member in members and not sub.outcome.done():  # not one the reader has just ended
                sub.started = True
                sub.ctx.started(f"Connected to stream: {sub.hash}")

    # -- ending



def _stream_for(ctx: SourceContext) -> Stream:
    registry = ctx.shared.get(Streams)
    creds = ctx.integration
    # settings too: after a reload that changes them, restarted listeners get a socket that uses them
    key = group_key(ctx.tenant_id, creds.username, creds.api_key, creds.stream_url, ctx.settings.dump(),
                    repr(ctx.egress))
    stream = registry.get(key)
    if stream is None or stream.closed:
        stream = Stream(key=key, registry=registry, tenant_id=ctx.tenant_id, username=creds.username,
                        api_key=creds.api_key, base_url=creds.stream_url, settings=ctx.settings,
                        egress=ctx.egress, user_agent=ctx.user_agent)
        registry[key] = stream
    return stream


async def run(ctx: SourceContext) -> None:
    """One listener: join the shared socket with its hash, wait for this listener's outcome."""
    stream_hash = ctx.listener.options.hash
    ctx.starting(f"Connecting to DataSift for stream: {stream_hash}")
    stream = _stream_for(ctx)
    ctx.set_heartbeat_bound(stream.machine.heartbeat_bound)
    await follow(stream, stream.add(ctx, stream_hash), _CLOSE_WAIT + 0.5)
