"""Pusher source: one WebSocket per listener, protocol 7 on `websockets`.

Why not Pysher (deepbrook/Pysher `src/pysher/connection.py`): it speaks protocol 6, runs two threads
per connection, ignores close codes and cannot re-sign a private channel after a reconnect. The
protocol (https://pusher.com/docs/channels/library_auth_reference/pusher-websockets-protocol) lives in
`pusher_protocol.PusherProtocol`; this driver only opens the socket, moves frames between the socket
and the machine, sleeps until the machine's next deadline, and raises the machine's outcome
(`listenerd.outcome`) to the supervisor, which decides how soon to honour a "reconnect at once".
Every connection gets a fresh machine, so private and presence channels are signed with that
connection's `socket_id`.

Close code 4000 (TLS only) is `failed` like the rest of 4000-4099: the URL is used as configured,
scheme included, and the status message tells the operator to set `tls = true`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from listenerd.net import client_tls, describe, kind_of
from listenerd.outcome import Ended, Fail, Outcome, Retry
from listenerd.sources.pusher_protocol import (
    CLIENT_VERSION,
    Count,
    Emit,
    Established,
    PusherProtocol,
    Send,
    Subscribed,
    build_url,
)

if TYPE_CHECKING:
    from listenerd.model import PusherIntegration, PusherOptions
    from listenerd.sources.base import SourceContext


async def run(ctx: SourceContext) -> None:
    integration: PusherIntegration = ctx.integration  # type: ignore[assignment]
    tls = integration.tls
    url = build_url(key=integration.key, cluster=integration.cluster, host=integration.host,
                    port=integration.port, tls=tls)
    raise Ended(await _connection(ctx, url, tls))


async def _connection(ctx: SourceContext, url: str, tls: bool) -> Outcome:
    """One connection attempt, from connect to the outcome that ends it."""
    settings = ctx.settings
    options: PusherOptions = ctx.listener.options  # type: ignore[attr-defined]
    integration: PusherIntegration = ctx.integration  # type: ignore[assignment]
    ctx.starting(f"Connecting to {url}")
    loop = asyncio.get_running_loop()
    try:
        ws = await connect(url, open_timeout=settings.connect_timeout, ping_interval=None,
                           max_size=settings.max_frame_bytes, compression=None, proxy=None,
                           close_timeout=1, ssl=client_tls(settings.ca_bundle) if tls else None,
                           user_agent_header=f"listenerd/{CLIENT_VERSION}")
    except InvalidStatus as exc:
        return Retry("refused", f"Pusher refused the WebSocket handshake at {url}: HTTP {exc.response.status_code}")
    except InvalidURI as exc:
        return Fail(f"Invalid Pusher URL {url}: {exc}")
    except (OSError, TimeoutError, InvalidHandshake) as exc:
        return Retry(kind_of(exc), f"Could not connect to {url}: {describe(exc, limit=200)}")
    machine = PusherProtocol(key=integration.key, secret=integration.secret, channel=options.channel,
                             wants=options.wants, activity_timeout=settings.pusher_activity_timeout,
                             pong_timeout=settings.pusher_pong_timeout, connect_timeout=settings.connect_timeout,
                             user_id=f"listenerd-{ctx.tenant_id}-{ctx.listener_id}", now=loop.time())
    link = _Link(ctx, ws, machine, loop)
    clock = asyncio.create_task(link.clock(), name=f"pusher-clock:{ctx.listener_id}")
    try:
        return await link.converse()
    finally:
        clock.cancel()
        try:
            await ws.close()  # at once when the clock already cut the socket
        except Exception:  # the socket is going away either way
            pass


class _Link:
    """One open connection: the receive loop and the clock task around one machine."""

    def __init__(self, ctx: SourceContext, ws: ClientConnection, machine: PusherProtocol,
                 loop: asyncio.AbstractEventLoop):
        self.ctx, self.ws, self.machine, self.loop = ctx, ws, machine, loop
        self.outcome: Outcome | None = None  # set by the clock when it ends the connection
        self.emitting = False  # the receive loop waits in emit(): the outbox is full

    async def clock(self) -> None:
        """Sleep until the machine's deadline; ping, or end the connection when the machine gives up.

        A separate task rather than a timeout around each `recv()`: frames move the deadline forward
        without arming a timer per frame, and a timeout can never interrupt an `emit()` half-way.
        While the receive loop is held by back-pressure the silence is ours, not the server's: unread
        frames wait in the socket, so the connection is kept and reported alive.
        """
        machine, loop = self.machine, self.loop
        while True:
            delay = machine.deadline() - loop.time()
            if delay > 0:
                await asyncio.sleep(min(delay, 3600.0))
                continue
            if self.emitting:
                machine.hold(loop.time())
                self.ctx.alive()
                continue
            for action in machine.tick(loop.time()):
                if isinstance(action, Send):
                    try:
                        await self.ws.send(action.text)
                    except ConnectionClosed:
                        return
                elif isinstance(action, Retry | Fail):
                    self.outcome = action
                    if self.ws.transport is not None:
                        self.ws.transport.abort()  # a peer that stopped answering will not answer a close
                    return

    async def converse(self) -> Outcome:
        """Feed frames to the machine and perform its actions; return how the connection ends."""
        ctx, ws, machine, loop = self.ctx, self.ws, self.machine, self.loop
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed as exc:
                if self.outcome is not None:
                    return self.outcome
                code = exc.rcvd.code if exc.rcvd is not None else None
                reason = exc.rcvd.reason if exc.rcvd is not None else None
                actions = machine.closed(code, reason, sent=exc.sent.code if exc.sent is not None else None)
            else:
                ctx.alive()
                actions = machine.receive(frame, loop.time())
            for action in actions:
                if isinstance(action, Emit):
                    self.emitting = True
                    try:
                        await ctx.emit(action.data, meta={"$channel": action.channel, "$event": action.event})
                    finally:
                        self.emitting = False
                elif isinstance(action, Send):
                    try:
                        await ws.send(action.text)
                    except ConnectionClosed:
                        pass  # the next recv reports how the connection ended
                elif isinstance(action, Subscribed):
                    ctx.started(f"Subscribed to channel: {action.channel}")
                elif isinstance(action, Established):
                    ctx.set_heartbeat_bound(machine.heartbeat_bound)
                elif isinstance(action, Count):
                    ctx.count(action.kind)
                    ctx.log.warning("pusher frame problem", kind=action.kind, detail=action.detail)
                else:
                    return action
