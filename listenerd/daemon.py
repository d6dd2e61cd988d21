"""The running daemon: wires store, outbox, forwarder, supervisor, control, API and systemd, and owns the lifecycle.

Start: open the store, apply the config's objects to it, start the outbox and forwarder, launch the
listeners, serve the API, then READY=1. SIGHUP: re-read the config; a config that does not validate
is refused whole (running set unchanged, errors logged, STATUS= says so); a valid one is applied to
the store and reconciled, restarting only changed listeners. SIGTERM/SIGINT: STOPPING=1, stop the
sources, commit what they handed over, flush to the engine within the stop bound, exit 0.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import signal
import time
from typing import Any

import structlog
from aiohttp import web

from listenerd import config as config_module
from listenerd import sources
from listenerd.api.app import ApiRunner, create_app
from listenerd.api.guard import AcceptErrorLog, Guard, GuardedSite
from listenerd.cluster import Cluster
from listenerd.control import Control
from listenerd.delivery.dead_letters import DeadLetters
from listenerd.delivery.forwarder import Forwarder
from listenerd.delivery.outbox import Outbox
from listenerd.fleet import Fleet
from listenerd.model import SOURCE_TYPES, Config, Integration, stored_listener, without_secrets
from listenerd.observability import Metrics, redactor
from listenerd.sealing import sealer_for
from listenerd.store import Store
from listenerd.store_pg import PostgresStore
from listenerd.supervisor import Key, Supervisor
from listenerd.systemd import Notifier
from listenerd.tap import TapHub
from listenerd.tasks import cancel_and_wait

log = structlog.get_logger("listenerd.daemon")
SHUTDOWN_TIMEOUT = 2.0  # seconds a stop waits for API answers under way before it cancels them


def log_tasks() -> None:
    """SIGUSR1: one log line per asyncio task with where it waits (an operator's 'what is it doing now')."""
    for task in asyncio.all_tasks():
        frames = [f"{f.f_code.co_filename.rsplit('/', 2)[-1]}:{f.f_lineno} {f.f_code.co_name}"
                  for f in task.get_stack(limit=12)]
        log.warning("task", task=task.get_name(), where=frames)


def build_store(config: Config) -> Store:
    """The store `[store]` names: PostgreSQL with `url`, else SQLite at `path` (the embedded default)."""
    sealer = functools.partial(sealer_for, config.store, config.store.path)
    if config.store.url is not None:
        return PostgresStore(config.store.url, config.store.synchronous, sealer=sealer)
    return Store(config.store.path, config.store.synchronous, config.store.create_directory, sealer=sealer)


def freeze_startup_heap() -> None:
    """Move every object made so far (modules, classes, the config, the API's app: ~70,000 at start-up) to the
    permanent generation, where the cyclic GC never looks again. A full (generation 2) collection stops the event
    loop for as long as it takes to walk every tracked object, and runs whenever the heap has grown by a quarter:
    measured in bench/api_scale.py, 40-130 ms at 100-1,000 listeners, the slow requests of that benchmark, and
    about half of that with this heap frozen. Done before any listener runs, so that what a listener makes (its
    tasks, connections and the cycles they leave when it stops) stays collectable; modules and classes do not
    become garbage, so freezing them frees nothing later that would have been freed."""
    gc.collect()
    gc.freeze()


class Daemon:
    def __init__(self, config: Config, config_path: str | None = None, notifier: Notifier | None = None):
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier.from_env()
        self.metrics = Metrics()
        self.store = build_store(config)
        self.outbox = Outbox(self.store, max_events=config.store.outbox_max_events,
                             max_bytes=config.store.outbox_max_bytes, metrics=self.metrics,
                             max_event_bytes=config.engine.max_event_bytes)
        self.dead_letters = DeadLetters(self.store, self.outbox)
        self.tap = TapHub(config.server.tap_queue)
        self.supervisor: Supervisor | None = None
        self.fleet: Fleet | None = None
        self.forwarder: Forwarder | None = None
        self.cluster: Cluster | None = None
        self.ready = False
        # `run` (the CLI's daemon) sets it: the heap made at start-up is left out of every later collection
        self.freeze_gc = False
        self.api_url: str | None = None
        self._runner: web.AppRunner | None = None
        self._previous_exception_handler: Any = None
        self._stopping = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._reloads: set[asyncio.Task[bool]] = set()  # SIGHUP's, kept so that stop can wait for them
        redactor.replace("config", config.secret_values())

    # -- lifecycle

    async def start(self) -> None:
        sources.load_all()  # not on the loop later, while requests wait: a first listener of a type imports nothing
        await self.store.open()
        if resealed := await self.store.reseal():
            log.info("integration secrets sealed with the current key", integrations=resealed)
        await self.apply_config_objects(self.config)
        await self.outbox.start(count_waiting=self.config.cluster is None)
        self.supervisor = Supervisor(self.config, self.outbox, self.metrics, tap=self.tap.publish,
                                     tap_clients=self.tap.clients)
        self.forwarder = Forwarder(self.config.engine, self.outbox, self.metrics, self.supervisor.forwarded)
        await self.forwarder.start()
        self.fleet = Fleet(self.store, self.supervisor, lambda: {t.id for t in self.config.tenants},
                           configured=self.configured_integration)
        control = Control(self.store, self.supervisor, self.fleet, self.outbox.health,
                          limits=lambda: self.config.limits)
        server = self.config.server
        # idle-timeout is aiohttp's keep-alive timeout: it runs from the connection's start and after each answer
        # a stop waits for answers under way at most this long (aiohttp's default is a minute): a slow client, or
        # a tap relayed from another node, must not hold `systemctl stop`
        self._runner = ApiRunner(create_app(self, control), access_log=None, handle_signals=False,
                                 keepalive_timeout=server.idle_timeout, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        loop = asyncio.get_running_loop()
        self._previous_exception_handler = loop.get_exception_handler()
        loop.set_exception_handler(AcceptErrorLog(on_error=self.metrics.accept_errors.inc))
        guard = Guard(server.header_timeout, server.max_connections,
                      on_event=lambda kind: self.metrics.api_guard.labels(kind).inc(),
                      on_open=self.metrics.api_connections.set)
        site = GuardedSite(self._runner, server.host, server.port, guard)
        await site.start()
        port = self._runner.addresses[0][1] if self._runner.addresses else server.port
        self.api_url = f"http://{server.host}:{port}"
        if self.config.cluster is not None:
            self.cluster = Cluster(self.store, self.config.cluster, self.outbox, lambda: self.fleet,
                                   rewind=self.forwarder.rewind, metrics=self.metrics, api_url=self.api_url)
            self.fleet.owns = self.cluster.owns
            self.fleet.announce = self.cluster.announce
            self.supervisor.node = self.config.cluster.node_id
            self.supervisor.remote_status = self.cluster.remote_status
            self.supervisor.on_status_change = self.cluster.status_changed
        if self.freeze_gc:
            freeze_startup_heap()
        await self.supervisor.start(await self.fleet.everything())
        if self.cluster is not None:
            await self.cluster.start()
        self.ready = True
        log.info("listenerd ready", api=self.api_url, listeners=len(self.supervisor.records),
                 engine=self.config.engine.public_url)
        self.notifier.notify(READY=1, STATUS=self.status_line())
        self.notifier.start_watchdog()

    async def stop(self) -> None:
        log.info("listenerd stopping")
        self.ready = False
        deadline = time.monotonic() + self.config.supervisor.stop_timeout  # one bound for every step

        def left() -> float:
            return max(0.1, deadline - time.monotonic())

        await self._finish_reloads(timeout=left())  # first: a reload's READY=1 must not follow STOPPING=1
        self.notifier.notify(STOPPING=1, STATUS="Stopping: flushing events to the engine")
        if self.cluster is not None:  # first: hand the groups over at once, not after the lease TTL
            await self.cluster.stop(timeout=left())
        if self.supervisor:
            await self.supervisor.stop(timeout=left())
        await self.outbox.close(timeout=left())
        if self.forwarder:
            await self.forwarder.stop(flush_timeout=left())
        self.tap.close()  # open taps end now, not at their next keep-alive
        if self._runner:
            await self._runner.cleanup()
            asyncio.get_running_loop().set_exception_handler(self._previous_exception_handler)
        # undelivered: what the store holds for the engine; never-written: events only memory held (the store
        # could not commit them before the bound), which never counted as received
        never_written = self.outbox.never_written
        (log.error if never_written else log.info)("listenerd stopped", undelivered=self.outbox.depth,
                                                   never_written=never_written)
        await self.store.close()
        await self.notifier.close()

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (SIGHUP reloads), stop."""
        await self.store.open()  # first: a store that cannot be used ends the run before there is anything to stop
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stopping.set)
        loop.add_signal_handler(signal.SIGINT, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload_in_background)
        loop.add_signal_handler(signal.SIGUSR1, log_tasks)  # kept through the stop: a stop that hangs says where
        status_task: asyncio.Task[None] | None = None
        self.freeze_gc = True
        try:
            await self.start()
            status_task = asyncio.create_task(self._report_status())
            await self._stopping.wait()
        finally:
            if status_task is not None:
                await cancel_and_wait(status_task)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            try:
                await self.stop()
            finally:
                loop.remove_signal_handler(signal.SIGUSR1)

    def _reload_in_background(self) -> None:
        task = asyncio.create_task(self.reload(), name="reload")
        self._reloads.add(task)
        task.add_done_callback(self._reload_done)

    def _reload_done(self, task: asyncio.Task[bool]) -> None:
        self._reloads.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("config reload failed", exc_info=task.exception())

    async def _finish_reloads(self, timeout: float) -> None:
        """Let a reload under way finish within the stop bound; cancel it past that."""
        if not self._reloads:
            return
        _, late = await asyncio.wait(set(self._reloads), timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(10)
            self.notifier.notify(STATUS=self.status_line())

    def components(self) -> dict[str, bool]:
        """Whether each part /readyz reports on is up; the store is up while open and writing."""
        components = {"store": self.store.is_open and not self.outbox.health.failing,
                      "supervisor": self.supervisor is not None and self.supervisor.running}
        if self.config.cluster is not None:  # this node holds its leases (renewed within the TTL's stand-down bound)
            components["cluster"] = self.cluster is not None and self.cluster.holds_leases()
        return components

    def status_line(self) -> str:
        listeners = self.supervisor.summary() if self.supervisor else "starting"
        problem = self.outbox.health.problem
        return f"{listeners}; outbox {self.outbox.depth} event(s)" + (f"; store failing: {problem}" if problem else "")

    # -- configuration

    async def reload(self) -> bool:
        """Re-read the config file and reconcile; refuse an invalid config whole."""
        async with self._reload_lock:
            self.notifier.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
                                 STATUS="Reloading configuration")
            try:
                if not self.config_path:
                    raise config_module.ConfigError([config_module.Problem("", "no config file to reload")])
                new = config_module.load(self.config_path)
            except config_module.ConfigError as exc:
                for problem in exc.problems:
                    log.error("config reload refused", problem=str(problem))
                self.notifier.notify(READY=1, STATUS=f"Reload failed ({len(exc.problems)} config problem(s)); "
                                                     f"still running the previous config. {self.status_line()}")
                return False
            redactor.replace("config", new.secret_values())  # a secret the new config dropped is forgotten
            await self._apply_settings(self.config, new)
            self.config = new
            await self.apply_config_objects(new)
            assert self.supervisor is not None
            assert self.fleet is not None
            changes = await self.fleet.reconcile_all(config=new)
            log.info("config reloaded", **reload_summary(changes))
            self.notifier.notify(READY=1, STATUS=self.status_line())
            return True

    async def _apply_settings(self, old: Config, new: Config) -> None:
        """Apply what a reload can change in place; name what needs a restart."""
        if new.engine != old.engine and self.forwarder is not None:
            previous = self.forwarder  # stopped before the new one starts: one sender, so order holds
            self.forwarder = Forwarder(new.engine, self.outbox, self.metrics, self.supervisor.forwarded
                                       if self.supervisor else None)
            await previous.stop(flush_timeout=min(1.0, new.supervisor.stop_timeout))
            await self.forwarder.start()
            log.info("engine settings reloaded", engine=new.engine.public_url)
        if (new.store.outbox_max_events, new.store.outbox_max_bytes) != (old.store.outbox_max_events,
                                                                         old.store.outbox_max_bytes):
            self.outbox.set_bounds(new.store.outbox_max_events, new.store.outbox_max_bytes)
        self.outbox.max_event_bytes = new.engine.max_event_bytes
        self.tap.queue_size = new.server.tap_queue
        logging.getLogger().setLevel(new.log.level.upper())
        needs_restart = [name for name, before, after in (
            ("server.listen", old.server.listen, new.server.listen),
            ("server.max-body-bytes", old.server.max_body_bytes, new.server.max_body_bytes),
            ("server.idle-timeout", old.server.idle_timeout, new.server.idle_timeout),
            ("server.header-timeout", old.server.header_timeout, new.server.header_timeout),
            ("server.max-connections", old.server.max_connections, new.server.max_connections),
            ("store.path", old.store.path, new.store.path),
            ("store.url", old.store.url, new.store.url),
            ("cluster", old.cluster, new.cluster),
            ("store.synchronous", old.store.synchronous, new.store.synchronous),
            ("log.format", old.log.format, new.log.format)) if before != after]
        if needs_restart:
            log.warning("config change needs a restart to take effect", keys=needs_restart)

    def configured_integration(self, tenant_id: str, kind: str) -> Integration | None:
        """A config-file integration as the config holds it: its secrets live there, never in the store."""
        tenant = self.config.tenant(tenant_id)
        return tenant.integrations.get(kind) if tenant is not None else None

    async def apply_config_objects(self, config: Config) -> None:
        tenants = [(t.id, t.name) for t in config.tenants]
        # config-file secrets stay in the config (their home): the store keeps the rest of the integration
        integrations = [(t.id, kind, without_secrets(integration)) for t in config.tenants for kind in SOURCE_TYPES
                        if (integration := t.integrations.get(kind)) is not None]
        listeners = [(t.id, spec.id, stored_listener(spec)) for t in config.tenants for spec in t.listeners]
        await self.store.sync_config_objects(tenants, integrations, listeners)


LOGGED_KEYS = 50  # listeners named per kind of change in the reload's log line; past that, a count


def reload_summary(changes: dict[str, list[Key]]) -> dict[str, object]:
    """What a reload changed, for its log line: the listeners started, restarted, stopped or removed
    (the first LOGGED_KEYS of each, then how many more), and how many were left alone. The unchanged are
    counted, never listed: with 10,000 listeners that list alone took seconds to write (every value of
    a log line is checked against every secret)."""
    summary: dict[str, object] = {}
    for kind, keys in changes.items():
        if kind == "unchanged":
            summary[kind] = len(keys)
        elif keys:
            summary[kind] = [f"{t}/{i}" for t, i in keys[:LOGGED_KEYS]]
            if len(keys) > LOGGED_KEYS:
                summary[f"{kind}-more"] = len(keys) - LOGGED_KEYS
    return summary
