"""Pusher source: one WebSocket per tenant and integration, carrying every channel of its listeners.

Why shared: Pusher counts concurrent connections per app (close code 4004 past the plan's quota), and
its own client, pusher-js, puts every channel of a `Pusher` object on one connection
(pusher/pusher-js `src/core/pusher.ts`, `src/core/connection/connection_manager.ts`). So the
listeners of one tenant with the same integration (key, secret, host or cluster, port, tls) and the
same `sources` settings share ONE `Connection`, kept in the supervisor's typed `Connections`. The
supervisor still runs one task per listener: each task joins the connection with its channel and waits
for its own outcome, while the connection's task owns the socket. A listener added or removed while
the socket is live subscribes or unsubscribes on it; the others see nothing. The socket lives for one
connection "epoch": when it ends (a close code, a drop, a missing pong) every listener on it gets the
outcome, the supervisor applies its policy, and the listeners that come back open a fresh socket and
are signed again with its `socket_id`. The last listener to leave closes it.

Why not Pysher (deepbrook/Pysher `src/pysher/connection.py`): it speaks protocol 6, runs two threads
per connection, ignores close codes and cannot re-sign a private channel after a reconnect. Every
protocol decision lives in `pusher_protocol.PusherProtocol`; this driver only opens the socket, moves
frames between the socket and the machine, sleeps until the machine's next deadline, and hands each
listener its outcome (`listenerd.outcome`).

Close code 4000 (TLS only) is `failed` like the rest of 4000-4099: the URL is used as configured,
scheme included, and the status message tells the operator to set `tls = true`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from listenerd.egress import EgressRefused, Policy, websocket_options
from listenerd.net import client_tls, describe, kind_of
from listenerd.outcome import Fail, Outcome, Retry
from listenerd.sources.group import Registered, follow, group_key, resolve
from listenerd.sources.pusher_protocol import (
    Action,
    Count,
    Emit,
    Established,
    PusherProtocol,
    Resolve,
    Send,
    Subscribed,
    build_url,
)

if TYPE_CHECKING:
    from listenerd.model import PusherIntegration, PusherOptions, Sources
    from listenerd.sources.base import SourceContext

_CLOSE_WAIT = 1.0  # how long the last listener leaving waits for the socket's close handshake
_ALIVE_EVERY = 1.0  # seconds between "the connection lives" reports to every listener on it


class Connections(dict[str, "Connection"]):
    """The live Pusher sockets of one supervisor, by tenant, integration and settings (`ctx.shared`)."""


@dataclass(eq=False)
class _Subscriber:
    ctx: SourceContext
    channel: str
    outcome: asyncio.Future[Outcome]
    ticket: int  # the machine's name for this listener


@dataclass(eq=False)
class Connection(Registered):
    """One WebSocket to a Pusher app shared by every listener of one tenant with the same integration."""

    key: str
    registry: Connections
    tenant_id: str
    integration: PusherIntegration
    settings: Sources
    egress: Policy | None = None  # an API-made integration's connections obey it
    user_agent: str = ""  # `net.user_agent`: names the node in a cluster
    subscribers: dict[int, _Subscriber] = field(default_factory=dict)
    closed: bool = False
    task: asyncio.Task[None] | None = None
    ws: ClientConnection | None = None
    emitting: bool = False  # the reader waits in emit(): the outbox is full
    _ended: Outcome | None = None  # set by the clock when it ends the connection
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)
    _alive_at: float = 0.0

    def __post_init__(self) -> None:
        integration, settings = self.integration, self.settings
        self.tls = integration.tls
        self.url = build_url(key=integration.key, cluster=integration.cluster, host=integration.host,
                             port=integration.port, tls=self.tls)
        master = integration.encryption_master_key
        self.machine = PusherProtocol(
            key=integration.key, secret=integration.secret, activity_timeout=settings.pusher_activity_timeout,
            pong_timeout=settings.pusher_pong_timeout, connect_timeout=settings.connect_timeout,
            user_id=f"listenerd-{self.tenant_id}", master_key=base64.b64decode(master) if master else None)
        self._log = structlog.get_logger("listenerd.source").bind(tenant=self.tenant_id, source="pusher",
                                                                  url=self.url)

    def log_for(self, tickets: frozenset[int] | None = None) -> structlog.typing.FilteringBoundLogger:
        """The connection's logger, naming its listeners (those of `tickets` when given)."""
        subs = self.subscribers.values() if tickets is None else self._named(tickets)
        return self._log.bind(listener=",".join(sorted({sub.ctx.listener_id for sub in subs})) or "-")

    # -- listeners joining and leaving (called from listener tasks)

    def add(self, ctx: SourceContext, options: PusherOptions) -> _Subscriber:
        ticket = self.machine.join(options.channel, options.wants, members=options.members)
        sub = _Subscriber(ctx, options.channel, asyncio.get_running_loop().create_future(), ticket)
        self.subscribers[ticket] = sub
        if self.machine.established:
            ctx.set_heartbeat_bound(self.machine.heartbeat_bound)
            ctx.starting(f"Subscribing to channel: {options.channel}")
        else:
            ctx.starting(f"Connecting to {self.url}")
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"pusher:{self.tenant_id}:{self.url}")
        self._dirty.set()
        return sub

    def remove(self, sub: _Subscriber) -> None:
        if self.subscribers.pop(sub.ticket, None) is not None:
            self.machine.leave(sub.ticket)
        if not self.subscribers and not self.closed:
            self._close()
        else:
            self._dirty.set()

    # -- the socket's task

    async def _run(self) -> None:
        ended: Outcome = Retry("closed", "Connection to Pusher closed")
        try:
            ended = await self._connect_and_converse()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must not strand the listeners: they retry
            self.log_for().exception("pusher connection crashed")
            ended = Retry("crash", f"Unexpected error: {type(exc).__name__}: {exc}")
        finally:
            self._close(cancel=False)
            for sub in list(self.subscribers.values()):
                resolve(sub, ended)
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_CLOSE_WAIT):
                        await self.ws.close()  # at once when the clock already cut the socket

    async def _connect_and_converse(self) -> Outcome:
        settings, url = self.settings, self.url
        try:
            checked = await websocket_options(self.egress, "pusher", url, "host", settings.connect_timeout)
        except EgressRefused as exc:
            return Fail(str(exc))
        except (OSError, TimeoutError) as exc:
            return Retry(kind_of(exc), f"Could not connect to {url}: {describe(exc, limit=200)}")
        try:
            self.ws = await connect(url, **checked, open_timeout=settings.connect_timeout, ping_interval=None,
                                    max_size=settings.max_frame_bytes, compression=None, proxy=None,
                                    close_timeout=_CLOSE_WAIT, ssl=client_tls(settings.ca_bundle) if self.tls else None,
                                    user_agent_header=self.user_agent)
        except InvalidStatus as exc:
            return Retry("refused", f"Pusher refused the WebSocket handshake at {url}: HTTP {exc.response.status_code}")
        except InvalidURI as exc:
            return Fail(f"Invalid Pusher URL {url}: {exc}")
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            return Retry(kind_of(exc), f"Could not connect to {url}: {describe(exc, limit=200)}")
        loop = asyncio.get_running_loop()
        self.machine.opened(loop.time())
        self.log_for().info("pusher connected", listeners=len(self.subscribers))
        tasks = [asyncio.create_task(self._clock(loop), name=f"pusher-clock:{url}"),
                 asyncio.create_task(self._write(loop), name=f"pusher-write:{url}")]
        try:
            return await self._converse(loop)
        finally:
            for task in tasks:
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*tasks)

    async def _write(self, loop: asyncio.AbstractEventLoop) -> None:
        """Subscribe and unsubscribe on the live socket as listeners join and leave."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._perform(self.machine.sync(loop.time()))

    async def _clock(self, loop: asyncio.AbstractEventLoop) -> None:
        """Sleep until the machine's deadline; ping, or end what the machine gives up on.

        A separate task rather than a timeout around each `recv()`: frames move the deadline forward
        without arming a timer per frame, and a timeout can never interrupt an `emit()` half-way.
        While the reader is held by back-pressure the silence is ours, not the server's: unread frames
        wait in the socket, so the connection is kept and reported alive.
        """
        machine = self.machine
        while True:
            delay = machine.deadline() - loop.time()
            if delay > 0:
                await asyncio.sleep(min(delay, 3600.0))
                continue
            if self.emitting:
                machine.hold(loop.time())
                self._alive(loop.time(), force=True)
                continue
            outcome = await self._perform(machine.tick(loop.time()))
            if outcome is not None:
                self._ended = outcome
                if self.ws is not None and self.ws.transport is not None:
                    self.ws.transport.abort()  # a peer that stopped answering will not answer a close
                return

    async def _converse(self, loop: asyncio.AbstractEventLoop) -> Outcome:
        """Feed frames to the machine and perform its actions; return how the connection ends."""
        ws, machine = self.ws, self.machine
        assert ws is not None
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as exc:
                if self._ended is not None:
                    return self._ended
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else None
                actions = machine.closed(code, reason, sent=exc.sent.code if exc.sent is not None else None)
            else:
                now = loop.time()
                self._alive(now)
                actions = machine.receive(frame, now)
            outcome = await self._perform(actions)
            if outcome is not None:
                return outcome

    async def _perform(self, actions: list[Action]) -> Outcome | None:
        """Carry out the machine's actions; the connection-wide outcome among them, if any."""
        for action in actions:
            if isinstance(action, Emit):
                meta = {"$channel": action.channel, "$event": action.event}
                if action.user_id is not None:
                    meta["$user_id"] = action.user_id
                for ticket in action.members:
                    sub = self.subscribers.get(ticket)
                    if sub is None or sub.outcome.done():
                        continue  # left while an earlier listener's emit waited
                    self.emitting = True
                    try:
                        await sub.ctx.emit(action.data, meta=meta)
                    finally:
                        self.emitting = False
            elif isinstance(action, Send):
                assert self.ws is not None
                try:
                    await self.ws.send(action.text)
                except ConnectionClosed:
                    pass  # the next recv reports how the connection ended
            elif isinstance(action, Subscribed):
                for sub in self._named(action.members):
                    sub.ctx.started(f"Subscribed to channel: {action.channel}")
            elif isinstance(action, Established):
                for sub in self.subscribers.values():
                    sub.ctx.set_heartbeat_bound(self.machine.heartbeat_bound)
            elif isinstance(action, Count):
                named = self.subscribers.values() if action.members is None else self._named(action.members)
                for sub in named:
                    sub.ctx.count(action.kind)
                self.log_for(action.members).warning("pusher frame problem", kind=action.kind, detail=action.detail)
            elif isinstance(action, Resolve):
                for sub in self._named(action.members):
                    resolve(sub, action.outcome)
            else:
                return action
        return None

    def _named(self, tickets: frozenset[int]) -> list[_Subscriber]:
        return [sub for ticket in tickets if (sub := self.subscribers.get(ticket)) is not None]

    def _alive(self, now: float, force: bool = False) -> None:
        """Every listener on the socket is alive while it is: reported at most once a second, so a frame
        costs the same with one listener or a thousand."""
        if force or now - self._alive_at >= _ALIVE_EVERY:
            self._alive_at = now
            for sub in self.subscribers.values():
                sub.ctx.alive()

    # -- ending



def _connection_for(ctx: SourceContext) -> Connection:
    registry = ctx.shared.get(Connections)
    integration: PusherIntegration = ctx.integration  # type: ignore[assignment]
    # settings too: after a reload that changes them, restarted listeners get a socket that uses them
    key = group_key(ctx.tenant_id, integration.dump(), ctx.settings.dump(), repr(ctx.egress))
    connection = registry.get(key)
    if connection is None or connection.closed:
        connection = Connection(key=key, registry=registry, tenant_id=ctx.tenant_id, integration=integration,
                                settings=ctx.settings, egress=ctx.egress, user_agent=ctx.user_agent)
        registry[key] = connection
    return connection


async def run(ctx: SourceContext) -> None:
    """One listener: join the shared connection with its channel, wait for this listener's outcome."""
    options: PusherOptions = ctx.listener.options  # type: ignore[attr-defined]
    connection = _connection_for(ctx)
    await follow(connection, connection.add(ctx, options), _CLOSE_WAIT + 0.5)
