"""What a source is given and what it must do.

A source is one coroutine, `async def run(ctx: SourceContext) -> None`, run as one asyncio task per
listener by the supervisor. It connects, reports progress with `ctx.starting()`/`ctx.started()`,
calls `ctx.alive()` on every frame it receives, hands each payload to `ctx.emit()`, and runs until
cancelled. It ends by raising `listenerd.outcome.Ended` with

- `Retry(kind, reason, delay=None)`: transient; the supervisor reports `retrying` and starts it again
  after `delay` seconds, or after its capped, jittered back-off when `delay` is None (whether an
  immediate retry, `delay=0`, is honoured is the supervisor's policy);
- `Fail(reason)`: given up until the listener's definition changes (bad credentials, unknown topic,
  a fatal close code);

and any other exception is treated as transient (kind "crash") and logged with its traceback.

The supervisor owns the status and the policy; the source only reports. What it may know of the
supervisor's decisions comes in `ctx.launch`. It sees its own listener, its integration and the
`sources` settings, never the rest of the configuration (other tenants' secrets).

Liveness: the protocol core is the one judge. It knows what silence means on its connection
(Pusher's activity and pong timeouts, DataSift's silence timeout, Bayeux's timed-out long polls)
and whom a dead connection concerns (a DataSift socket serves many listeners), so it ends the
connection with a reason the operator can read, and asks for an immediate reconnect where the
protocol says so. The source declares that core's own bound with `ctx.set_heartbeat_bound()`. The
supervisor's watchdog only guards: it restarts a `started` listener (not one paused by
back-pressure) silent past `supervisor.guard_bound()`, twice the declared bound, long after the
core would have spoken, so it catches a wedged task or a source without a core and never races
the core; its `Retry("heartbeat")` is reported like any other outcome.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast

import structlog

from listenerd.mapping import CompiledMapping, EventTooLarge, compile_mapping
from listenerd.net import user_agent as net_user_agent
from listenerd.status import ListenerStatus

if TYPE_CHECKING:
    from listenerd.delivery.outbox import Outbox
    from listenerd.egress import Policy
    from listenerd.model import Integration, ListenerBase, Sources
    from listenerd.observability import Metrics

T = TypeVar("T")
_log = structlog.get_logger("listenerd.source")


@dataclass(frozen=True, slots=True)
class Launch:
    """What the supervisor tells a run about why it starts: the source's only window on its policy."""

    attempt: int = 0  # runs of this launch that ended before this one (0: a start, restart or new definition)
    replay_from: str | None = None  # a resume point an operator set for this run (the checkpoint API)


class Shared:
    """Resources the listeners of one source type share within one supervisor (DataSift's sockets).

    One object per class, made on first use: a source asks for its own typed class
    (`ctx.shared.get(Streams)`), so it never reaches another source type's resources.
    """

    def __init__(self) -> None:
        self._objects: dict[type, object] = {}

    def get(self, kind: type[T]) -> T:
        found = self._objects.get(kind)
        if found is None:
            found = self._objects[kind] = kind()
        return cast(T, found)


class SourceRun(Protocol):
    def __call__(self, ctx: SourceContext) -> Awaitable[None]: ...


class SourceContext:
    """Everything one listener's source may use, and nothing more."""

    def __init__(self, *, tenant_id: str, listener: ListenerBase, integration: Integration, settings: Sources,
                 status: ListenerStatus, outbox: Outbox, metrics: Metrics, shared: Shared,
                 launch: Launch = Launch(), tap: Callable[[str, str, dict[str, Any]], None] | None = None,
                 tap_clients: Callable[[str, str], int] | None = None, egress: Policy | None = None,
                 user_agent: str | None = None):
        self.tenant_id = tenant_id
        self.listener = listener
        self.listener_id = listener.id
        self.integration = integration
        self.settings = settings
        self.launch = launch
        self.shared = shared
        # where an API-made integration may connect (checked again at connect time); None: the operator's own
        self.egress = egress
        self.user_agent = user_agent or net_user_agent()  # names the node in a cluster (`net.user_agent`)
        self._status = status
        self._outbox = outbox
        self._metrics = metrics
        self._mapping: CompiledMapping = compile_mapping(listener.mapping)
        self._tap = tap
        # when the tap can say whether anyone is listening, envelopes are handed to it only while someone
        # is (the outbox otherwise reports commits as counts, not per event); without it, always
        self._tap_clients = tap_clients
        self.heartbeat_bound: float | None = None
        self.on_bound: Callable[[float], None] | None = None  # the supervisor's watchdog, told of a new bound
        self.last_alive = time.monotonic()
        self.paused = False  # waiting for outbox room: silence then is ours, not the provider's
        self._received = metrics.received.labels(tenant_id, listener.id)

    @property
    def log(self) -> Any:
        """Bound when a line is written (rarely), not kept: a bound logger per listener costs memory."""
        return _log.bind(tenant=self.tenant_id, listener=self.listener_id, source=self.listener.type)

    # -- status reporting (the supervisor's record is the single writer)

    def starting(self, message: str) -> None:
        self._status.set("starting", message)

    def started(self, message: str) -> None:
        self._status.set("started", message)
        self.alive()

    def alive(self) -> None:
        """Any frame proves the connection lives; call on every receipt."""
        self.last_alive = time.monotonic()

    def set_heartbeat_bound(self, seconds: float | None) -> None:
        """Longest silence this protocol's core allows before it ends the connection itself; the
        supervisor's guard restarts the listener well past it (`supervisor.guard_bound`)."""
        self.heartbeat_bound = seconds
        self.alive()
        if seconds and self.on_bound is not None:
            self.on_bound(seconds)

    def count(self, kind: str) -> None:
        """Count a non-fatal problem (unmappable payload, malformed frame, reconnect ...)."""
        self._metrics.listener_errors.labels(self.tenant_id, self.listener_id, kind).inc()

    def reconnected(self) -> None:
        self._metrics.reconnects.labels(self.tenant_id, self.listener_id).inc()

    # -- events

    async def emit(self, payload: Any, *, meta: dict[str, Any] | None = None, key: str | None = None,
                   checkpoint: str | None = None) -> None:
        """Map `payload`, wrap it in an envelope and queue it for the durable outbox.

        Returns once queued; waits first while the outbox is at its bound (back-pressure: the
        source stops reading its socket). The event counts as received once committed.
        `key` is the source's own identity of the event (it makes the envelope id stable);
        `checkpoint` is the resume point committed in the same transaction as this event.
        """
        try:
            event = self._mapping.apply(payload, meta, max_bytes=self._outbox.max_event_bytes)
        except EventTooLarge as exc:  # stopped before the copies were built: set aside, never sent
            await self._outbox.set_aside_oversized(self.tenant_id, self.listener_id, exc.size, None)
            self.count("oversized")
            return
        except Exception as exc:  # a mapping never raises on data; this is a guard, counted
            self.count("mapping")
            self.log.warning("payload could not be mapped", error=str(exc))
            return
        tapped = self._tap is not None and (self._tap_clients is None
                                            or self._tap_clients(self.tenant_id, self.listener_id) > 0)
        # `_committed_count` bound at each call (equal bound methods are one key of the outbox's counters): kept
        # on self, it would make every context a reference cycle, left to the cyclic GC when its listener stops
        queued = await self._outbox.append(self.tenant_id, self.listener_id, self.listener.type, event,
                                           key=key, checkpoint=checkpoint, on_commit=self._tapped if tapped else None,
                                           on_commit_count=self._committed_count, on_wait=self._paused)
        if not queued:
            self.count("oversized")

    def outbox_room(self) -> int:
        """How many more events the outbox takes before its bound: a pull-based source asks for no more."""
        return self._outbox.room()

    async def wait_for_room(self) -> None:
        """Wait (reported as paused by back-pressure) until the outbox is below its bounds."""
        await self._outbox.wait_for_room(self._paused)

    async def flush(self) -> None:
        """Wait until everything this listener emitted is durable."""
        await self._outbox.flush()

    async def checkpoint(self) -> str | None:
        """The stored resume point, read once what earlier runs queued has landed: a retry that read it while
        their events waited in the outbox would resume before them and the outbox would hold them twice."""
        await self._outbox.flush()
        return await self._outbox.store.get_checkpoint(self.tenant_id, self.listener_id)

    def _committed_count(self, count: int) -> None:
        """The outbox committed `count` of this listener's events (called once per commit)."""
        self._status.committed(count)
        self._received.inc(count)

    def _tapped(self, envelope: dict[str, Any]) -> None:
        if self._tap:
            self._tap(self.tenant_id, self.listener_id, envelope)

    def _paused(self, paused: bool) -> None:
        self.paused = paused
        self.alive()  # the connection's silence while paused is back-pressure, not a dead provider
        self._status.paused(paused)
