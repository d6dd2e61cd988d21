"""Logging and metrics.

Logs: structlog to stderr, JSON lines when stderr is not a terminal (journald), console lines when
it is. Standard-library logging and `warnings` go through the same chain, so in JSON mode every
line is JSON. The last processor before rendering removes every known secret value wherever it
hides (message, field, nested structure, exception text): secrets are registered as config and
API objects are loaded, and the redactor is the only way out.

Metrics: one prometheus-client registry per daemon, so tests can run several in one process.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import warnings
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

import ahocorasick
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from listenerd.status import STATES

REDACTED = "[REDACTED]"
_MIN_SUBSTRING = 4  # shorter secrets (config-file ones only: the API refuses them) are redacted only as whole values
# Fields listenerd itself writes: a secret registered through the API must never blind them (a tenant
# whose "secret" is "error" would otherwise erase the level of every line, and with it level-based alerts).
# `event` is structural on listenerd's own lines, not on foreign (stdlib) records, whose message is free text.
STRUCTURAL = frozenset({"level", "logger", "timestamp", "tenant", "listener", "source", "logger_name"})


def encodings(secret: str) -> set[str]:
    """The forms a secret takes on its way out: as is, URL-encoded (path and form), JSON-escaped."""
    forms = {secret, quote(secret, safe=""), quote_plus(secret), json.dumps(secret)[1:-1],
             json.dumps(secret, ensure_ascii=False)[1:-1]}
    return {f for f in forms if f}


def _automaton(words: Iterable[str]) -> Any:
    """One Aho-Corasick automaton over every form of every secret: a string is scanned once, whatever the
    number of secrets (a loop of `in` tests, or a regex alternation, costs a pass or a branch per secret)."""
    automaton = ahocorasick.Automaton(ahocorasick.STORE_LENGTH)
    for word in words:
        automaton.add_word(word)
    automaton.make_automaton()
    return automaton


def _forms(secrets: Iterable[str]) -> set[str]:
    return {form for s in secrets if len(s) >= _MIN_SUBSTRING for form in encodings(s) if len(form) >= _MIN_SUBSTRING}


class SecretRedactor:
    """A structlog processor that replaces every registered secret value, in one pass over each string.

    Secrets are kept per owner (the config file, each API-made integration), so replacing an
    integration's credentials unregisters the old ones, and the set stays as large as what is live.

    Matching: one Aho-Corasick automaton over every secret (built in a background thread, as it takes
    about a second at 60,000 secrets), plus a small automaton over the secrets registered since it was
    built (built when the next line is written, so a new secret is redacted from its first line on and
    the event loop never waits for the big one). A forgotten secret stays matched until the next build.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, frozenset[str]] = {}
        self._whole: frozenset[str] = frozenset()  # every secret, redacted where it is a whole value
        self._built: frozenset[str] = frozenset()  # the secrets in the big automaton
        self._state: tuple[Any, Any] = (None, None)  # (big automaton, automaton of the secrets since), read at once
        self._pending_dirty = False
        self._rebuilding = False

    def register(self, *values: str | None, owner: str = "static") -> None:
        """Add secrets to `owner`'s (the default owner's are never dropped)."""
        fresh = frozenset(v for v in values if v)
        if not fresh <= self._owners.get(owner, frozenset()):
            self.replace(owner, self._owners.get(owner, frozenset()) | fresh)

    def replace(self, owner: str, values: Iterable[str | None]) -> None:
        """`owner`'s secrets are now `values` (none: forget the owner)."""
        fresh = frozenset(v for v in values if v)
        with self._lock:
            if self._owners.get(owner, frozenset()) == fresh:
                return
            if fresh:
                self._owners[owner] = fresh
            else:
                self._owners.pop(owner, None)
            self._whole = frozenset().union(*self._owners.values())
            self._pending_dirty = True
            start = not self._rebuilding
            self._rebuilding = True
        if start:
            threading.Thread(target=self._rebuild, name="listenerd-redactor", daemon=True).start()

    def forget(self, owner: str) -> None:
        self.replace(owner, ())

    @property
    def count(self) -> int:
        return len(self._whole)

    def wait_built(self, timeout: float = 30.0) -> bool:
        """Wait until the big automaton holds every secret (tests and benchmarks)."""
        deadline = time.monotonic() + timeout
        while self._rebuilding and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._rebuilding

    def _rebuild(self) -> None:
        while True:
            with self._lock:
                secrets = self._whole
            automaton = _automaton(_forms(secrets)) if secrets else None
            with self._lock:
                self._built = secrets
                self._state = (automaton, self._state[1])
                self._pending_dirty = True  # what is pending is now relative to this build
                if self._whole == secrets:
                    self._rebuilding = False
                    return

    def _automata(self) -> tuple[Any, Any]:
        if self._pending_dirty:
            with self._lock:
                if self._pending_dirty:
                    pending = _forms(self._whole - self._built)
                    self._state = (self._state[0], _automaton(pending) if pending else None)
                    self._pending_dirty = False
        return self._state

    def scrub(self, value: Any) -> Any:
        return self._scrub(value, self._automata())

    def _scrub(self, value: Any, automata: tuple[Any, Any]) -> Any:
        if isinstance(value, str):
            if value in self._whole:
                return REDACTED
            return _redact(value, automata)
        if isinstance(value, dict):
            return {k: self._scrub(v, automata) for k, v in value.items()}
        if isinstance(value, list | tuple | set):
            return [self._scrub(v, automata) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self._scrub(str(value), automata)

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if not self._whole:
            return event_dict
        automata = self._automata()
        own = event_dict.get("_from_structlog", True)
        return {k: (v if k in STRUCTURAL or (k == "event" and own) or k.startswith("_") else self._scrub(v, automata))
                for k, v in event_dict.items()}


def _redact(value: str, automata: tuple[Any, Any]) -> str:
    """`value` with every character any match of any automaton covers replaced: overlapping secrets, or one
    inside another, leave no remainder whichever automaton knows which."""
    spans = sorted((end + 1 - length, end + 1) for automaton in automata if automaton is not None
                   for end, length in automaton.iter(value))
    if not spans:
        return value
    out, last = [], 0
    start, stop = spans[0]
    for begin, end in spans[1:]:
        if begin <= stop:
            stop = max(stop, end)
            continue
        out += [value[last:start], REDACTED]
        last, start, stop = stop, begin, end
    out += [value[last:start], REDACTED, value[stop:]]
    return "".join(out)



def secrets_owner(tenant_id: str, kind: str) -> str:
    """The redactor's owner of one integration's secrets: replacing them forgets the old ones."""
    return f"integration:{tenant_id}:{kind}"

redactor = SecretRedactor()


class ClientProtocolErrors(logging.Filter):
    """aiohttp logs a client's malformed HTTP as an ERROR with a traceback; it is the client's fault:
    say so in one warning line with the reason, and keep tracebacks for our own failures."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        if record.exc_info and isinstance(record.exc_info[1], HttpProcessingError):
            error = record.exc_info[1]
            record.msg, record.args = "rejected a malformed HTTP request: %s", (str(error.message).strip(),)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def configure_logging(fmt: str = "auto", level: str = "info", stream: Any = None) -> None:
    """Route structlog, stdlib logging and warnings to `stream` (stderr) in one format."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if getattr(stream, "isatty", lambda: False)() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
        structlog.processors.format_exc_info,
        redactor,
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if fmt == "json"
                     else structlog.dev.ConsoleRenderer(colors=getattr(stream, "isatty", lambda: False)()))
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared[:-3],
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared[:-3],
        processors=[structlog.processors.StackInfoRenderer(), structlog.processors.format_exc_info,
                    redactor, structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientProtocolErrors) for f in server_log.filters):
        server_log.addFilter(ClientProtocolErrors())
    for noisy in ("aiohttp.access", "websockets.client", "websockets.server"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    logging.captureWarnings(True)
    warnings.simplefilter("default")


class ListenerStatusGauge:
    """`listenerd_listener_status`, made from the supervisors' status records at each scrape.

    Why not a labelled Gauge: its five series per listener (one per state) were 18 objects per listener
    that Python's full garbage collection walks, a fifth of what a listener costs it (bench/RESULTS.md,
    api scale): at 10,000 listeners a full collection stops the loop for hundreds of milliseconds.
    Scrapes render on a worker thread: each records dict is copied in one C call first.
    """

    NAME = "listenerd_listener_status"

    def __init__(self) -> None:
        self._sources: list[dict[Any, Any]] = []  # supervisors' `records`: key -> ListenerStatus

    def watch(self, records: dict[Any, Any]) -> None:
        if not any(r is records for r in self._sources):
            self._sources.append(records)

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.NAME, "1 for the listener's current status",
                                   labels=("tenant", "listener", "status"))
        for records in self._sources:
            for record in list(records.values()):
                current = record.status
                for state in STATES:
                    family.add_metric((record.tenant_id, record.listener_id, state), 1.0 if state == current else 0.0)
        yield family


class Metrics:
    """Every metric listenerd exports, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        labels = ("tenant", "listener")
        self.received = Counter("listenerd_events_received", "Events committed to the outbox", labels, registry=r)
        self.forwarded = Counter("listenerd_events_forwarded", "Events acknowledged by the engine", labels,
                                 registry=r)
        self.listener_errors = Counter("listenerd_listener_errors", "Non-fatal problems by kind",
                                       (*labels, "kind"), registry=r)
        self.reconnects = Counter("listenerd_reconnects", "Connection attempts after the first", labels,
                                  registry=r)
        self.status = ListenerStatusGauge()
        r.register(self.status)  # type: ignore[arg-type]
        self.outbox_depth = Gauge("listenerd_outbox_depth", "Events waiting for the engine", registry=r)
        self.outbox_bytes = Gauge("listenerd_outbox_bytes", "Bytes waiting for the engine", registry=r)
        self.outbox_oldest_age = Gauge("listenerd_outbox_oldest_age_seconds", "Age of the oldest waiting event",
                                       registry=r)
        self.delivered = Counter("listenerd_engine_delivered_events", "Events the engine accepted", registry=r)
        self.retried = Counter("listenerd_engine_retries", "Engine requests retried", ("reason",), registry=r)
        self.dead_lettered = Counter("listenerd_dead_lettered_events", "Events the engine refused", registry=r)
        self.engine_latency = Histogram("listenerd_engine_request_seconds", "Engine POST latency", registry=r)
        self.backpressure = Counter("listenerd_backpressure_waits", "Times a source waited for outbox room",
                                    registry=r)
        self.api_errors = Counter("listenerd_api_errors", "API error answers by status code", ("code",),
                                  registry=r)
        self.damaged_events = Counter("listenerd_store_damaged_events", "Stored events whose segment failed its "
                                      "checksum: set aside as dead letters, never sent", registry=r)
        self.oversized_events = Counter("listenerd_oversized_events", "Events larger than engine.max-event-bytes: "
                                        "set aside in their listener's dead letters, never sent", registry=r)
        self.api_guard = Counter("listenerd_api_connections_closed", "API connections refused past "
                                 "server.max-connections or closed for headers late (server.header-timeout)",
                                 ("reason",), registry=r)
        self.api_connections = Gauge("listenerd_api_connections", "Open API connections (server.max-connections "
                                     "bounds them)", registry=r)
        self.accept_errors = Counter("listenerd_api_accept_errors", "accept() calls that failed (out of file "
                                     "descriptors): logged once per 10 s", registry=r)
        self.store_errors = Counter("listenerd_store_errors", "Store operations that failed (disk full, I/O error)",
                                    ("op",), registry=r)
        # a cluster node's view (cluster.py): absent on a single node
        self._registry = r
        self.cluster_nodes: Gauge | None = None

    def cluster(self, view: dict) -> None:
        """The cluster as this node sees it: live nodes, groups it holds, seconds since its last renewal."""
        if self.cluster_nodes is None:
            r = self._registry
            self.cluster_nodes = Gauge("listenerd_cluster_nodes", "Live nodes (not draining) this node sees",
                                       registry=r)
            self.cluster_groups = Gauge("listenerd_cluster_groups_owned", "Connection groups this node holds "
                                        "leases on", registry=r)
            self.cluster_lease_age = Gauge("listenerd_cluster_lease_age_seconds", "Seconds since this node last "
                                           "renewed its leases", registry=r)
        self.cluster_nodes.set(view["nodes"])
        self.cluster_groups.set(view["groups_owned"])
        self.cluster_lease_age.set(view["lease_age"] or 0.0)

    def forget_listener(self, tenant_id: str, listener_id: str) -> None:
        for metric in (self.received, self.forwarded, self.reconnects):
            try:
                metric.remove(tenant_id, listener_id)
            except KeyError:
                pass
