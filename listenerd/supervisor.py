"""Desired listeners -> running tasks. Owns every status change and the restart policy.

Each enabled listener runs as one asyncio task (a `Runner`) that calls its source again and again:
a transient failure is reported `retrying` with the reason and the time of the next attempt, and
retried after a capped, jittered exponential back-off that resets once a run has been healthy for
`healthy-after` seconds; a permanent failure is reported `failed` and left alone until the
listener's definition changes or an operator restarts it. A failing listener never touches the
others. `reconcile()` compares definitions and restarts only what changed.

Sources report (`listenerd.outcome`); the policy is decided here: a retry asking to go at once
(`delay=0`: the server asked for a reconnect, a heartbeat was missed) is honoured `IMMEDIATE_RETRIES`
times in a row, then the back-off applies, so a server that keeps asking gets no reconnect storm. The
count resets with the back-off, once a run has been healthy. What a run may know of this (how many
runs of its launch ended before it, a resume point set by an operator) it gets in `ctx.launch`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from listenerd.backoff import backoff_delay
from listenerd.egress import Policy
from listenerd.model import Config, Integration, ListenerBase
from listenerd.model import Supervisor as SupervisorSettings
from listenerd.net import user_agent
from listenerd.outcome import Ended, Fail, Outcome, Retry
from listenerd.sources import source_for
from listenerd.sources.base import Launch, Shared, SourceContext
from listenerd.status import ListenerStatus, State, rfc3339
from listenerd.tasks import cancel_and_wait

if TYPE_CHECKING:
    from listenerd.delivery.outbox import Outbox
    from listenerd.observability import Metrics

log = structlog.get_logger("listenerd.supervisor")

Key = tuple[str, str]  # (tenant id, listener id)

IMMEDIATE_RETRIES = 3  # immediate retries honoured in a row before the back-off applies
GUARD_FACTOR = 2.0  # the watchdog's bound over the one a source declares (see `guard_bound`)
WATCH_MAX = 10.0  # seconds between the watchdog's passes at most (an eighth of the tightest guard when less)


def retry_delay(outcome: Retry, attempt: int, settings: SupervisorSettings) -> float:
    """Seconds before retry number `attempt` (1-based since the last healthy run) after `outcome`."""
    if outcome.delay is not None and (outcome.delay > 0 or attempt <= IMMEDIATE_RETRIES):
        return outcome.delay
    return backoff_delay(attempt, settings.backoff_initial, settings.backoff_max)


def guard_bound(declared: float) -> float:
    """Seconds a `started` listener may be silent before the watchdog restarts it. A source declares its
    protocol core's own bound, so the core, the one judge of liveness, always speaks first; the watchdog
    only catches a wedged task or a source without a core."""
    return GUARD_FACTOR * declared


@dataclass(frozen=True)
class Desired:
    listener: ListenerBase
    integration: Integration | None

    def runs_as(self, other: Desired, dumps: dict[int, Any]) -> bool:
        """Whether `other` runs the same: the same definition with the same credentials. `dumps` memoizes
        each integration's dump for one reconcile (a tenant's listeners share one integration object),
        and a definition the fleet reused unchanged is the same object, so a reload of 10,000 unchanged
        listeners dumps almost nothing."""
        if self.listener is not other.listener and self.listener.definition() != other.listener.definition():
            return False
        return _dump(self.integration, dumps) == _dump(other.integration, dumps)


def _dump(integration: Integration | None, dumps: dict[int, Any]) -> Any:
    if integration is None:
        return None
    memo = dumps.get(id(integration))
    if memo is None:  # kept with its object: alive for the whole reconcile, so its id is not reused meanwhile
        memo = dumps[id(integration)] = (integration, integration.dump())
    return memo[1]


def _never(want: Desired) -> bool:
    return False


def runs_stale(old: Config, new: Config) -> Callable[[Desired], bool]:
    """Which running listeners a new config makes stale though their definitions are unchanged: the API-made
    integrations' when `[server.egress]` changed (they run under it: a narrowed policy must reach connections
    already open); none otherwise. `[sources]` tuning applies as listeners (re)start: a reload restarts only
    changed definitions, as the contract says."""
    if old.server.egress.dump() != new.server.egress.dump():
        return lambda want: want.integration is not None and want.integration.managed_by == "api"
    return _never


def _no_changes() -> dict[str, list[Key]]:
    return {"started": [], "restarted": [], "stopped": [], "removed": [], "unchanged": []}


class Runner:
    """One listener's task: run the source, classify how it ended, back off, run again."""

    def __init__(self, supervisor: Supervisor, key: Key, desired: Desired, record: ListenerStatus,
                 replay_from: str | None = None):
        self.supervisor = supervisor
        self.key = key
        self.desired = desired
        self.record = record
        self.ctx: SourceContext | None = None
        self.task: asyncio.Task[None] | None = None
        self._attempt_task: asyncio.Task[None] | None = None
        self._kicked: str | None = None
        self._replay_from = replay_from  # for the first run only: a retry resumes from the stored checkpoint

    @property
    def log(self) -> Any:
        """Bound when a line is written (rarely), not kept: a bound logger per listener costs memory."""
        return log.bind(tenant=self.key[0], listener=self.key[1])

    def start(self) -> None:
        self.record.attempts = 0
        self.task = asyncio.create_task(self._loop(), name=f"listener:{self.key[0]}/{self.key[1]}")

    async def stop(self, message: str, timeout: float) -> None:
        try:
            if self.task:
                with contextlib.suppress(Exception):  # its end, a timeout: never the caller's own cancellation
                    await cancel_and_wait(self.task, timeout)
        finally:
            self._let_go(message)

    def _let_go(self, message: str) -> None:
        self.record.set("stopped", message)
        # let go of the run: a cancelled task keeps its CancelledError, whose traceback's frames hold this
        # runner, so a runner holding its tasks is a reference cycle; thousands of stopped listeners then wait
        # for the cyclic GC's full collection, which stops the loop for as long as it walks them
        self.task = self._attempt_task = self.ctx = None

    def kick(self, reason: str) -> None:
        """End the current attempt as `Retry("heartbeat", reason)` (the watchdog's guard)."""
        if self._attempt_task and not self._attempt_task.done():
            self._kicked = reason
            self._attempt_task.cancel()

    async def _loop(self) -> None:
        settings = self.supervisor.config.supervisor
        listener = self.desired.listener
        while True:
            if self.desired.integration is None:
                self.record.set("failed", f"No {listener.type} integration for tenant {self.key[0]}: "
                                          f"set one up before starting this listener",
                                error="missing integration")
                return
            self.record.set("starting", f"Starting {listener.type} listener")
            launch = Launch(self.record.attempts, self._replay_from)
            self._replay_from = None
            self.ctx = self.supervisor.context(self.key, self.desired, self.record, launch)
            outcome = await self._attempt()
            if isinstance(outcome, Fail):
                self.record.set("failed", outcome.reason, error=outcome.reason)
                self.log.error("listener failed", reason=outcome.reason)
                return  # wait for a definition change
            healthy_since = self.record.started_at
            if healthy_since is not None and time.time() - healthy_since >= settings.healthy_after:
                self.record.attempts = 0
            self.record.attempts += 1
            delay = retry_delay(outcome, self.record.attempts, settings)
            self.supervisor.metrics.reconnects.labels(*self.key).inc()
            at = rfc3339(time.time() + delay)
            reason = outcome.reason
            self.record.set("retrying", f"{reason}; next attempt in {delay:.1f}s (at {at})", error=reason)
            self.log.warning("listener will retry", reason=reason, kind=outcome.kind, delay=round(delay, 3),
                             attempt=self.record.attempts)
            await asyncio.sleep(delay)

    async def _attempt(self) -> Outcome:
        """Run the source once; how it ended."""
        assert self.ctx is not None
        self._kicked = None
        self._attempt_task = asyncio.create_task(source_for(self.desired.listener.type)(self.ctx))
        try:
            await asyncio.shield(self._attempt_task)
            return Retry("closed", "Connection ended")
        except asyncio.CancelledError:
            if self._kicked is None or not self._attempt_task.cancelled():
                self._attempt_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._attempt_task
                raise
            return Retry("heartbeat", self._kicked)
        except Ended as exc:
            return exc.outcome
        except Exception as exc:  # isolated: one listener's bug never stops the others
            self.log.exception("listener crashed")
            return Retry("crash", f"Unexpected error: {type(exc).__name__}: {exc}")


class Supervisor:
    def __init__(self, config: Config, outbox: Outbox, metrics: Metrics,
                 tap: Callable[[str, str, dict[str, Any]], None] | None = None,
                 tap_clients: Callable[[str, str], int] | None = None):
        self.config = config
        self.outbox = outbox
        self.metrics = metrics
        self.tap = tap
        self.tap_clients = tap_clients
        self.records: dict[Key, ListenerStatus] = {}
        metrics.status.watch(self.records)  # listenerd_listener_status is made from these at each scrape
        self.runners: dict[Key, Runner] = {}
        # a cluster node: its records carry `node`, and a listener another node runs is answered from that
        # node's last written record (cluster.Cluster.remote_status)
        self.node: str | None = None
        self.remote_status: Callable[[Key], Any] | None = None
        self.on_status_change: Callable[[], None] | None = None  # a cluster node writes its records at once
        self.desired: dict[Key, Desired] = {}
        self.shared = Shared()
        self._replay_from: dict[Key, str] = {}  # resume points set through the API, for each key's next launch
        self.running = False
        self._watchdog: asyncio.Task[None] | None = None
        self._watch_interval = WATCH_MAX
        self._watch_wake = asyncio.Event()
        self._lock = asyncio.Lock()
        outbox.health.watch(self._store_failing)

    # -- lifecycle

    async def start(self, desired: dict[Key, Desired]) -> None:
        self.running = True
        self._watchdog = asyncio.create_task(self._watch_heartbeats(), name="heartbeat-watchdog")
        await self.reconcile(desired)

    async def stop(self, timeout: float | None = None) -> None:
        """Stop every listener within `timeout` (default: the stop timeout); statuses end `stopped`."""
        self.running = False
        if self._watchdog:
            self._watchdog.cancel()
        timeout = self.config.supervisor.stop_timeout if timeout is None else timeout
        await asyncio.gather(*(r.stop("Stopped: listenerd is shutting down", timeout)
                               for r in self.runners.values()))
        self.runners.clear()

    async def release(self, keys: list[Key], message: str, timeout: float | None = None) -> None:
        """Stop these listeners at once, together, and forget them (a cluster node giving their groups up: all
        must be stopped before its leases can expire, so not one after the other)."""
        timeout = self.config.supervisor.stop_timeout if timeout is None else timeout
        async with self._lock:
            runners = [self.runners.pop(k) for k in keys if k in self.runners]
            await asyncio.gather(*(r.stop(message, timeout) for r in runners))
            for key in keys:
                if self.desired.pop(key, None) is not None or key in self.records:
                    self.records.pop(key, None)
                    self._replay_from.pop(key, None)
                    self.metrics.forget_listener(*key)

    # -- reconciliation

    async def reconcile(self, desired: dict[Key, Desired], config: Config | None = None) -> dict[str, list[Key]]:
        """Bring running listeners in line with the whole `desired` set; only changed definitions restart."""
        async with self._lock:
            stale = _never
            if config is not None:
                stale = runs_stale(self.config, config)
                self.config = config
            changes = _no_changes()
            dumps: dict[int, Any] = {}
            for key in [k for k in self.desired if k not in desired]:
                await self._reconcile_key(key, None, dumps, changes)
            for key, want in desired.items():
                await self._reconcile_key(key, want, dumps, changes, stale(want))
            return changes

    async def reconcile_some(self, desired: dict[Key, Desired | None]) -> dict[str, list[Key]]:
        """Bring only these listeners in line (None: it is gone); the others are not looked at."""
        async with self._lock:
            changes = _no_changes()
            dumps: dict[int, Any] = {}
            for key, want in desired.items():
                await self._reconcile_key(key, want, dumps, changes)
            return changes

    async def _reconcile_key(self, key: Key, want: Desired | None, dumps: dict[int, Any],
                             changes: dict[str, list[Key]], stale: bool = False) -> None:
        timeout = self.config.supervisor.stop_timeout
        runner = self.runners.get(key)
        previous = self.desired.get(key)
        if want is None:
            if previous is None and runner is None:
                return
            self.runners.pop(key, None)
            if runner:
                await runner.stop("Stopped: listener deleted", timeout)
            self.desired.pop(key, None)
            self.records.pop(key, None)
            self._replay_from.pop(key, None)
            self.metrics.forget_listener(*key)
            changes["removed"].append(key)
            return
        self.desired[key] = want
        same = previous is not None and not stale and previous.runs_as(want, dumps)
        if same and (runner is not None or not want.listener.status):
            changes["unchanged"].append(key)
            return
        if runner:
            await runner.stop("Restarting with its new definition", timeout)
            del self.runners[key]
        record = self.records.get(key) or self._new_record(key)
        if not want.listener.status:
            record.set("stopped", "Disabled: the listener's status is false")
            changes["stopped"].append(key)
        else:
            self._launch(key, want, record)
            changes["restarted" if runner else "started"].append(key)

    async def restart(self, key: Key, while_stopped: Callable[[], Awaitable[Any]] | None = None,
                      replay_from: str | None = None) -> bool:
        """Restart one listener now, also out of `failed`. False when it is unknown.

        `while_stopped` runs after the old run has stopped and before the new one starts: a checkpoint
        written there cannot be overwritten by the old run's last commit. `replay_from` is where the
        next run resumes (the checkpoint API's "restart from there"), whatever the listener's replay
        option; a disabled listener keeps it for when it is enabled.
        """
        async with self._lock:
            want = self.desired.get(key)
            if want is None:
                return False
            runner = self.runners.pop(key, None)
            if runner:
                await runner.stop("Restarting on request", self.config.supervisor.stop_timeout)
            if while_stopped is not None:
                await self.outbox.flush()  # the old run's queued events and checkpoints land first
                await while_stopped()
            if replay_from is not None:
                self._replay_from[key] = replay_from
            if want.listener.status:
                self._launch(key, want, self.records[key])
            return True

    def _launch(self, key: Key, want: Desired, record: ListenerStatus) -> None:
        runner = Runner(self, key, want, record, self._replay_from.pop(key, None))
        self.runners[key] = runner
        if self.running:
            runner.start()

    def _new_record(self, key: Key) -> ListenerStatus:
        record = ListenerStatus(key[0], key[1], on_change=self._status_changed, node=self.node)
        record.store_failing(self.outbox.health.problem)
        self.records[key] = record
        self._status_changed(record, record.status)
        return record

    def _status_changed(self, record: ListenerStatus, previous: State) -> None:
        if record.status != previous:
            log.info("listener status", tenant=record.tenant_id, listener=record.listener_id,
                     status=record.status, message=record.message)
            if self.on_status_change is not None:
                self.on_status_change()

    def _store_failing(self, problem: str | None) -> None:
        """The store cannot write (or can again): every listener's status says so."""
        for record in self.records.values():
            record.store_failing(problem)

    # -- what the others ask

    def context(self, key: Key, want: Desired, record: ListenerStatus, launch: Launch) -> SourceContext:
        """One run's view: its own listener and integration and the sources settings, nothing else."""
        assert want.integration is not None
        ctx = SourceContext(tenant_id=key[0], listener=want.listener, integration=want.integration,
                            settings=self.config.sources, launch=launch, status=record, outbox=self.outbox,
                            metrics=self.metrics, shared=self.shared, tap=self.tap, tap_clients=self.tap_clients,
                            egress=(Policy.from_settings(self.config.server.egress)
                                    if want.integration.managed_by == "api" else None),
                            user_agent=user_agent(self.node))
        ctx.on_bound = self._bound_declared
        return ctx

    def status(self, key: Key) -> ListenerStatus | None:
        record = self.records.get(key)
        if record is None and self.remote_status is not None:
            return self.remote_status(key)
        return record

    def forwarded(self, tenant_id: str, listener_id: str, count: int) -> None:
        """The engine took `count` of this listener's events. A deleted listener's (its waiting events still go
        out) count in the engine's totals only: a series made for it now would never be removed."""
        record = self.records.get((tenant_id, listener_id))
        if record:
            record.forwarded += count
            self.metrics.forwarded.labels(tenant_id, listener_id).inc(count)

    def summary(self) -> str:
        """One line of counts per status, for systemd's STATUS=."""
        counts: dict[str, int] = {}
        for record in self.records.values():
            counts[record.status] = counts.get(record.status, 0) + 1
        return ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no listeners"

    async def _watch_heartbeats(self) -> None:
        """Restart a `started`, unpaused listener silent past its `guard_bound`; the Runner reports the
        `Retry("heartbeat")` like any other outcome (why the cores own liveness: `sources/base.py`).

        One pass a tick over the runners both checks them and finds the tightest guard, which sets the
        next tick: an eighth of it, at most WATCH_MAX; a source declaring a tighter bound wakes it at once.
        With thousands of listeners this pass was most of the idle CPU at one a second."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._watch_wake.wait(), self._watch_interval)
            self._watch_wake.clear()
            now = time.monotonic()
            tightest = WATCH_MAX * 8
            for runner in list(self.runners.values()):
                ctx = runner.ctx
                if ctx is None or not ctx.heartbeat_bound:
                    continue
                guard = guard_bound(ctx.heartbeat_bound)
                if guard < tightest:
                    tightest = guard
                if ctx.paused or runner.record.status != "started":
                    continue
                silent = now - ctx.last_alive
                if silent > guard:
                    runner.kick(f"No data or heartbeat for {silent:.0f}s (the source's bound is "
                                f"{ctx.heartbeat_bound:g}s); restarting")
            self._watch_interval = tightest / 8

    def _bound_declared(self, seconds: float) -> None:
        """A source declared its heartbeat bound: wake the watchdog if it must now look more often."""
        if guard_bound(seconds) / 8 < self._watch_interval:
            self._watch_wake.set()
