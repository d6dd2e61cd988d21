"""Shared plumbing for the chaos scenarios: simulators, a subprocess daemon, a ledger, /proc samples.

(Past 400 lines on purpose: it is the one vocabulary every scenario shares, kept in one place.)

Why one module: every scenario asks the same questions (what did the simulators publish, what did the
engine get, under which ids, what was durable in the outbox when the daemon died, how big is the
process) and they must be answered the same way everywhere, in the CI tests and in the full runs.

The simulators and the engine run in the caller's event loop; the daemon is a real child process
(`python -m listenerd run`, via listenerd.testing.DaemonProcess) so that `kill -9` is a real kill. Every
payload carries a per-source sequence number `n`, mapped to the envelope field `seq`, so the ledger
can tell loss from duplication without trusting the daemon. Secrets are fresh random values for
each run, so a search for them in logs and answers cannot match anything but a leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import re
import secrets
import statistics
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from listenerd.sim.datasift import DataSiftSim
from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.sim.salesforce import SalesforceSim
from listenerd.testing import WAL_SUFFIXES, Api, DaemonProcess, snapshot_envelopes

SOURCES = ("pusher", "datasift", "salesforce")
TENANT = "t"
OTHER_TENANT = "other"
TICK = 0.02  # publisher pacing step (seconds)


# ---------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcSample:
    at: float          # time.monotonic()
    rss_kb: int
    fds: int
    threads: int
    cpu_s: float       # user + system seconds so far


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def sample(pid: int) -> ProcSample:
    """RSS, open fds, threads and CPU seconds of `pid`, straight from /proc (no psutil needed)."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))  # type: ignore[union-attr]
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15 of stat)
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return ProcSample(time.monotonic(), rss, fds, threads, cpu)


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"`nproc` {os.cpu_count()}, CPU \"{cpu}\", Python {platform.python_version()}"


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of y over x (0 for fewer than two points): a growth trend, per unit of x."""
    if len(points) < 2:
        return 0.0
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in points) / den if den else 0.0


# ---------------------------------------------------------------- the ledger


@dataclass
class Ledger:
    """What was published (with how many sockets it reached), delivered (with ids), and seen durable.

    `delivered` keeps each event's distinct ids (one, unless a duplicate came under another id) and
    `copies` how many times it arrived, so a duplicate storm costs a count, not memory.

    Order per listener: the rig publishes each listener's events with increasing `n`, so their first
    deliveries must come in increasing `n` too (events never received leave gaps, which is not disorder;
    a duplicate of an event already delivered is not a first delivery). `newest` keeps the highest `n`
    first-delivered per listener, `disorder` each listener's first deliveries that came after a higher
    one (source -> (tenant, listener) -> [(n, the higher n already delivered)]).
    """

    published: dict[str, dict[int, int]] = field(default_factory=lambda: defaultdict(dict))
    delivered: dict[str, dict[int, list[str]]] = field(default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    copies: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    durable: dict[str, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))  # outbox snapshots
    published_at: dict[str, dict[int, float]] = field(default_factory=lambda: defaultdict(dict))
    windows: list[tuple[float, float]] = field(default_factory=list)  # forced disconnects (monotonic)
    newest: dict[str, dict[tuple[str, str], int]] = field(default_factory=lambda: defaultdict(dict))
    disorder: dict[str, dict[tuple[str, str], list[tuple[int, int]]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(list)))
    deliveries = 0

    def disrupted(self, source: str, n: int) -> bool:
        at = self.published_at.get(source, {}).get(n)
        return at is not None and any(start <= at <= end for start, end in self.windows)

    def on_engine(self, envelopes: list[dict[str, Any]]) -> None:
        for envelope in envelopes:
            seq = envelope["event"].get("seq")
            if isinstance(seq, int):
                source = envelope["source"]
                if seq not in self.delivered[source]:  # a first delivery: in publish order per listener?
                    listener = (envelope.get("tenant-id", ""), envelope.get("listener-id", ""))
                    newest = self.newest[source].get(listener)
                    if newest is not None and seq < newest:
                        self.disorder[source][listener].append((seq, newest))
                    else:
                        self.newest[source][listener] = seq
                ids = self.delivered[source][seq]
                if envelope["id"] not in ids:
                    ids.append(envelope["id"])
                self.copies[envelope["source"]][seq] += 1
            self.deliveries += 1

    def delivered_count(self) -> int:
        return sum(c.total() for c in self.copies.values())

    def remember_outbox(self, db_path: Path) -> int:
        """Record every envelope durable in the (dead daemon's) outbox; returns how many.

        Read from a snapshot (`listenerd.testing.store_snapshot`): the restart then recovers from the
        WAL exactly as the kill left it."""
        rows = snapshot_envelopes(db_path)
        for body in rows:
            envelope = orjson.loads(body)
            seq = envelope["event"].get("seq")
            if isinstance(seq, int):
                self.durable[envelope["source"]][seq] = envelope["id"]
        return len(rows)

    def report(self, source: str) -> dict[str, Any]:
        """Loss and duplication for one source.

        - committed: delivered at least once, or seen in the outbox on disk after a kill;
        - lost_committed: committed but never delivered (must be 0);
        - not_received: published but never committed: for sockets without replay (Pusher, DataSift)
          that is what arrived while the daemon was dead or sat in socket buffers at the kill;
          `not_received_no_subscriber` is the part published while no socket was subscribed at all;
        - duplicates: deliveries beyond the first; `mixed_ids`: events delivered under two ids (must be 0);
        - out_of_order: listeners whose events' first deliveries were not in publish order (must be 0 where
          order per listener is promised), `out_of_order_events` how many first deliveries came late, and
          `out_of_order_examples` a few (listener, n, the higher n delivered before it).
        """
        published = self.published.get(source, {})
        delivered = self.delivered.get(source, {})
        durable = self.durable.get(source, {})
        committed = set(delivered) | set(durable)
        lost = committed - set(delivered)
        not_received = set(published) - committed
        mixed = [n for n, ids in delivered.items() if len(set(ids)) > 1]
        mixed += [n for n, i in durable.items() if n in delivered and i not in delivered[n]]
        return {
            "published": len(published),
            "delivered_unique": len(delivered),
            "committed": len(committed),
            "lost_committed": len(lost),
            "not_received": len(not_received),
            "not_received_no_subscriber": sum(1 for n in not_received if published.get(n) == 0),
            "not_received_in_disconnect": sum(1 for n in not_received if published.get(n)
                                              and self.disrupted(source, n)),
            "duplicates": self.copies.get(source, Counter()).total() - len(delivered),
            "mixed_ids": len(set(mixed)),
            "invented": len(set(delivered) - set(published)),
            "out_of_order": len(self.disorder.get(source, {})),
            "out_of_order_events": sum(len(v) for v in self.disorder.get(source, {}).values()),
            "out_of_order_examples": [(f"{t}/{lid}", n, newer) for (t, lid), late in
                                      sorted(self.disorder.get(source, {}).items())[:5] for n, newer in late[:2]],
        }


# ---------------------------------------------------------------- a slow engine that acknowledges late


class SlowAckEngine(EngineSim):
    """EngineSim whose answers leave `ack_delay` seconds after the batch was accepted and counted.

    Why not EngineSim.delay: it waits *before* accepting, so a daemon killed meanwhile leaves nothing
    at the engine. A real slow engine has often processed the batch when the connection dies; the
    daemon never hears the 200 and sends the batch again: that is where duplicates come from, and
    where the rig must check that a duplicate carries the same id.

    `unavailable = True` answers every request 503 without accepting it (an overloaded engine) until
    set back; `unavailable_answers` counts those answers. Why not `fail_next`: a scripted count ends by
    itself, and the scenario needs the engine down exactly as long as its fault lasts.
    """

    ack_delay = 0.0
    unavailable = False
    unavailable_answers = 0

    def make_app(self) -> web.Application:
        app = super().make_app()

        @web.middleware
        async def late_ack(request: web.Request, handler: Any) -> web.StreamResponse:
            if self.unavailable:
                self.unavailable_answers += 1
                return web.json_response({"error": "engine unavailable"}, status=503)
            response = await handler(request)
            if self.ack_delay:
                await asyncio.sleep(self.ack_delay)
            return response

        app.middlewares.append(late_ack)
        return app


# ---------------------------------------------------------------- the rig


@dataclass
class Secrets:
    """Fresh per run: every value here must never appear in a log line or an API answer."""

    ops_token: str = field(default_factory=lambda: "chaos-ops-" + secrets.token_hex(12))
    other_token: str = field(default_factory=lambda: "chaos-other-" + secrets.token_hex(12))
    engine_token: str = field(default_factory=lambda: "chaos-engine-" + secrets.token_hex(12))
    pusher_secret: str = field(default_factory=lambda: "chaos-pusher-" + secrets.token_hex(12))
    datasift_key: str = field(default_factory=lambda: "chaos-dskey-" + secrets.token_hex(12))
    sf_consumer_secret: str = field(default_factory=lambda: "chaos-sfcs-" + secrets.token_hex(12))
    sf_password: str = field(default_factory=lambda: "chaos-sfpw-" + secrets.token_hex(12))
    sf_token: str = field(default_factory=lambda: "CHAOSSFTK" + secrets.token_hex(8).upper())

    def values(self) -> list[str]:
        return list(vars(self).values())



def integrations_toml(s: Secrets, pusher: Any, datasift: Any, salesforce: Any) -> str:
    """One tenant's three integration tables against the simulators, with the run's secrets."""
    return f"""[tenants.integrations.pusher]
key = "{pusher.key}"
secret = "{s.pusher_secret}"
app-id = "{pusher.app_id}"
host = "{pusher.host}"
port = {pusher.port}
tls = false

[tenants.integrations.datasift]
username = "chaos"
api-key = "{s.datasift_key}"
stream-url = "{datasift.url}"

[tenants.integrations.salesforce]
consumer-key = "chaos-ck"
consumer-secret = "{s.sf_consumer_secret}"
username = "sf@example.com"
password = "{s.sf_password}"
secret-token = "{s.sf_token}"
login-url = "{salesforce.url}"
"""

class Rig:
    """Sims + engine in this loop, the daemon as a child process, and the ledger between them.

    `counts` is how many listeners of each source type (tenant `t`); DataSift listeners share one
    socket (one tenant, one credential), Pusher and Salesforce listeners have a connection each.
    `store_dir` puts the store elsewhere than `workdir` (a small tmpfs to fill); the log stays in `workdir`.
    `server_toml`, `limits_toml`, `other_tenant_toml` and `tenant_toml` add config text in those places.
    """

    def __init__(self, workdir: Path, counts: dict[str, int] | None = None, *, engine_delay: float = 0.0,
                 long_poll: float = 0.5, sources_toml: str = "", engine_toml: str = "", keep_logs: bool = True,
                 store_dir: Path | None = None, server_toml: str = "", limits_toml: str = "",
                 other_tenant_toml: str = "", tenant_toml: str = ""):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.store_dir = Path(store_dir) if store_dir is not None else self.workdir
        self.counts = {s: 1 for s in SOURCES} if counts is None else {s: counts.get(s, 0) for s in SOURCES}
        self.secrets = Secrets()
        self.ledger = Ledger()
        self.engine = SlowAckEngine(token=self.secrets.engine_token, on_events=self.ledger.on_engine, keep=False)
        self.engine.ack_delay = engine_delay
        self.pusher = PusherSim("4242", "chaos-app-key", self.secrets.pusher_secret)
        self.datasift = DataSiftSim(users={"chaos": self.secrets.datasift_key}, tick_interval=1.0)
        self.salesforce = SalesforceSim(users={"sf@example.com": self.secrets.sf_password + self.secrets.sf_token},
                                        clients={"chaos-ck": self.secrets.sf_consumer_secret},
                                        long_poll=long_poll)
        self.sources_toml = sources_toml
        self.engine_toml = engine_toml
        self.server_toml = server_toml  # more [server] keys
        self.limits_toml = limits_toml  # the [limits] table's keys
        self.other_tenant_toml = other_tenant_toml  # the other tenant's tables (integrations, listeners)
        self.tenant_toml = tenant_toml  # more of the tenant's tables, after its listeners
        self.daemon: DaemonProcess | None = None
        self.api: Api | None = None
        self.responses: list[str] = []  # every API answer body the scenarios saw (searched for secrets)
        self._seq = {s: 0 for s in SOURCES}
        self._live_since: dict[str, int] = {}
        self._pump: asyncio.Task[None] | None = None
        self.keep_logs = keep_logs
        self.wal_at_kills: list[int] = []  # bytes of -wal left by each kill -9: what the restart recovers from

    # -- names

    def listener_ids(self, source: str) -> list[str]:
        prefix = {"pusher": "P", "datasift": "D", "salesforce": "S"}[source]
        return [f"{prefix}{i}" for i in range(self.counts[source])]

    def all_listener_ids(self) -> list[str]:
        return [lid for s in SOURCES for lid in self.listener_ids(s)]

    @staticmethod
    def channel(i: int) -> str:
        return f"private-chaos-{i}"  # private: signed with the integration secret on every (re)subscribe

    @staticmethod
    def hash(i: int) -> str:
        return f"{i:032x}"

    @staticmethod
    def topic(i: int) -> str:
        return f"Chaos{i}"

    @property
    def db_path(self) -> Path:
        return self.store_dir / "listenerd.db"

    # -- lifecycle

    async def start(self) -> None:
        await self.engine.start()
        await self.pusher.start()
        await self.datasift.start()
        for i in range(self.counts["salesforce"]):
            self.salesforce.create_topic(self.topic(i), f"SELECT Id, n FROM Chaos{i}__c")
        await self.salesforce.start()

    def config_text(self) -> str:
        s = self.secrets
        listeners = []
        for i, lid in enumerate(self.listener_ids("pusher")):
            listeners.append(f'[[tenants.listeners]]\nid = "{lid}"\ntype = "pusher"\n'
                             f'options = {{ channel = "{self.channel(i)}" }}\nmapping = {{ seq = "n" }}\n')
        for i, lid in enumerate(self.listener_ids("datasift")):
            listeners.append(f'[[tenants.listeners]]\nid = "{lid}"\ntype = "datasift"\n'
                             f'options = {{ hash = "{self.hash(i)}" }}\nmapping = {{ seq = "n" }}\n')
        for i, lid in enumerate(self.listener_ids("salesforce")):
            listeners.append(f'[[tenants.listeners]]\nid = "{lid}"\ntype = "salesforce"\n'
                             f'options = {{ topic = "{self.topic(i)}" }}\nmapping = {{ seq = "n" }}\n')
        body = "\n".join(listeners)
        return f"""
[server]
listen = "127.0.0.1:0"
{self.server_toml}

[[server.tokens]]
name = "ops"
token = "{s.ops_token}"
tenants = ["{TENANT}"]

[[server.tokens]]
name = "other"
token = "{s.other_token}"
tenants = ["{OTHER_TENANT}"]

[engine]
url = "{self.engine.url}"
token = "{s.engine_token}"
linger-ms = 5
retry-initial = 0.05
retry-max = 0.5
{self.engine_toml}

[store]
path = "{self.db_path}"

[supervisor]
backoff-initial = 0.05
backoff-max = 0.5
stop-timeout = 5

[sources]
{self.sources_toml}

[limits]
{self.limits_toml}

[[tenants]]
id = "{OTHER_TENANT}"
{self.other_tenant_toml}

[[tenants]]
id = "{TENANT}"

{integrations_toml(s, self.pusher, self.datasift, self.salesforce)}
{body}
{self.tenant_toml}
"""

    async def begin(self, rate: float | None = None) -> None:
        """The common opening: simulators, daemon, every listener started and primed, then the pump at `rate`."""
        await self.start()
        await self.start_daemon()
        await self.wait_all_started()
        self.mark_live()
        await self.prime()
        if rate is not None:
            self.start_pump(rate)

    async def start_daemon(self, timeout: float = 60.0) -> Api:
        """Start (or restart after a kill) the daemon child; returns an API client with the ops token."""
        if self.daemon is None:
            self.daemon = DaemonProcess(self.workdir, self.config_text(), name="daemon")
        if self.api is not None:
            await self.api.close()
        self.api = Api(await self.daemon.start(timeout=timeout), token=self.secrets.ops_token)
        return self.api

    @property
    def pid(self) -> int:
        assert self.daemon and self.daemon.process
        return self.daemon.process.pid

    def store_files(self) -> dict[str, tuple[int, int]]:
        """(size, mtime ns) of the store's db, -wal and -shm files that exist."""
        files = [self.db_path.with_name(self.db_path.name + suffix) for suffix in WAL_SUFFIXES]
        return {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()}

    def kill9(self) -> int:
        """kill -9 the daemon, then record what its outbox held on disk; returns that count.

        The restart must recover from the WAL as the kill left it: `wal_at_kills` records the WAL's size
        at each kill, and reading the outbox must leave every store file exactly as it was."""
        assert self.daemon is not None
        self.daemon.kill9()
        files = self.store_files()
        self.wal_at_kills.append(files.get(self.db_path.name + "-wal", (0, 0))[0])
        durable = self.ledger.remember_outbox(self.db_path)
        if self.store_files() != files:
            raise AssertionError(f"reading the killed store changed its files: {files} -> {self.store_files()}")
        return durable

    def remove_shm(self) -> bool:
        """Delete the killed daemon's `-shm` (as a reboot clearing /dev/shm-like state would): the restart
        must rebuild the WAL index from the WAL itself. True when there was one."""
        shm = self.db_path.with_name(self.db_path.name + "-shm")
        existed = shm.exists()
        shm.unlink(missing_ok=True)
        return existed

    async def stop(self, strict: bool = True) -> int | None:
        """SIGTERM the daemon (if running) and stop the simulators; returns the daemon's exit code.

        `strict`: a non-zero exit raises (a scenario that reports the code instead passes False)."""
        await self.stop_pump()
        if self.api is not None:
            await self.api.close()
            self.api = None
        code = None
        if self.daemon and self.daemon.process and self.daemon.process.poll() is None:
            code = await self.daemon.stop()
            if code != 0 and strict:
                raise AssertionError(f"daemon exited {code} on SIGTERM")
        for sim in (self.salesforce, self.datasift, self.pusher, self.engine):
            with contextlib.suppress(Exception):
                await sim.stop()
        return code

    # -- publishing

    async def publish(self, source: str, index: int) -> None:
        """One event with the next sequence number on listener `index` of `source`."""
        n = self._seq[source]
        self._seq[source] = n + 1
        if source == "pusher":
            reached = await self.pusher.publish(self.channel(index), "chaos", {"n": n})
        elif source == "datasift":
            reached = await self.datasift.publish(self.hash(index), {"interaction": {"id": f"ds-{n}"}, "n": n})
        else:
            self.salesforce.publish(self.topic(index), {"Id": f"a00{n:015d}", "n": n})
            reached = 1  # Salesforce keeps it for replay: reachable whether or not a client listens
        self.ledger.published[source][n] = reached
        self.ledger.published_at[source][n] = time.monotonic()

    def start_pump(self, rate: float, sources: tuple[str, ...] | None = None) -> None:
        """Publish `rate` events/s in total, spread evenly over the given sources and their listeners."""
        chosen = [s for s in (sources or SOURCES) if self.counts[s]]
        self._pump = asyncio.create_task(self._run_pump(rate / len(chosen), chosen), name="chaos-pump")

    async def stop_pump(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            self._pump = None

    async def _run_pump(self, per_source: float, chosen: list[str]) -> None:
        start = time.monotonic()
        done = {s: 0 for s in chosen}
        rr = {s: 0 for s in chosen}
        burst = max(1, int(per_source * TICK * 4))  # never more than 4 ticks' worth at once: the sims share this loop
        while True:
            due = int((time.monotonic() - start) * per_source)
            for s in chosen:
                count = min(burst, due - done[s])
                for _ in range(count):
                    await self.publish(s, rr[s])
                    rr[s] = (rr[s] + 1) % self.counts[s]
                done[s] += max(0, count)
                if due - done[s] > burst:  # fallen behind: skip ahead (the achieved rate is what gets reported)
                    done[s] = due - burst
            await asyncio.sleep(TICK)

    async def prime(self, timeout: float = 120.0) -> None:
        """One event through every listener, delivered, before the faults begin.

        Why: a Salesforce listener with `replay = "resume"` and no checkpoint yet subscribes for new
        events only (-1, CONTRACT section 2); after a re-handshake it asks for new events again, so
        what was published in between is, by contract, not replayed. One committed event gives every
        listener a checkpoint, so that each fault afterwards is tested against replay from it.
        """
        for source in SOURCES:
            for index in range(self.counts[source]):
                await self.publish(source, index)
        await self.wait_delivered(timeout=timeout)

    def published_total(self) -> int:
        return sum(len(p) for p in self.ledger.published.values())

    # -- reading the daemon

    async def get(self, path: str, token: str | None | bool = True) -> tuple[int, Any]:
        assert self.api is not None
        code, body = await self.api.call("GET", path, token=token)
        self.responses.append(body if isinstance(body, str) else orjson.dumps(body).decode())
        return code, body

    async def metrics(self) -> dict[str, float]:
        """`/metrics` as {"name{labels}": value} (comments dropped)."""
        assert self.api is not None
        async with self.api.session.get(self.api.base_url + "/metrics") as response:
            text = await response.text()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def errors_by_kind(self) -> dict[str, float]:
        """listenerd_listener_errors_total summed per kind over all listeners."""
        totals: dict[str, float] = defaultdict(float)
        for name, value in (await self.metrics()).items():
            if name.startswith("listenerd_listener_errors_total{"):
                kind = re.search(r'kind="([^"]*)"', name).group(1)  # type: ignore[union-attr]
                totals[kind] += value
        return dict(totals)

    async def readyz(self) -> tuple[int, Any]:
        """`GET /readyz` (no auth): (status code, body)."""
        return await self.get("/readyz", token=None)

    async def status_details(self) -> dict[str, dict[str, Any]]:
        """Every listener's full status answer (status, message, last-error ...), by id."""
        out = {}
        for lid in self.all_listener_ids():
            code, body = await self.get(f"/1.0/tenants/{TENANT}/listeners/{lid}/status")
            out[lid] = body if code == 200 and isinstance(body, dict) else {"status": f"HTTP {code}"}
        return out

    async def outbox_depth(self) -> float:
        return (await self.metrics()).get("listenerd_outbox_depth", 0.0)

    async def statuses(self) -> dict[str, str]:
        code, body = await self.get(f"/1.0/tenants/{TENANT}/listeners")
        assert code == 200, (code, body)
        out = {}
        for item in body:
            code, status = await self.get(f"/1.0/tenants/{TENANT}/listeners/{item['id']}/status")
            out[item["id"]] = status.get("status") if code == 200 else f"HTTP {code}"
        return out

    async def wait_all_started(self, timeout: float = 60.0) -> float:
        """Wait until every listener reports `started`; returns the seconds it took."""
        began = time.monotonic()
        last: dict[str, str] = {}
        while True:
            last = await self.statuses()
            if last and all(v == "started" for v in last.values()):
                return time.monotonic() - began
            if time.monotonic() - began > timeout:
                bad = {k: v for k, v in last.items() if v != "started"}
                raise AssertionError(f"listeners not started after {timeout}s: {dict(list(bad.items())[:10])}")
            await asyncio.sleep(0.1)

    async def wait_delivered(self, timeout: float = 120.0, sources: tuple[str, ...] = SOURCES) -> float:
        """Wait until every committed-or-replayable event is at the engine; returns seconds waited.

        Salesforce: everything published. Pusher/DataSift: everything published to a live subscriber
        since the last kill, and everything seen durable.
        """
        began = time.monotonic()

        def missing() -> int:
            total = 0
            for source in sources:
                delivered = self.ledger.delivered.get(source, {})
                want = self._expected(source)
                total += len(want - set(delivered))
            return total

        while missing():
            if time.monotonic() - began > timeout:
                detail = {s: sorted(self._expected(s) - set(self.ledger.delivered.get(s, {})))[:10] for s in sources}
                raise AssertionError(f"{missing()} events still missing at the engine after {timeout}s: {detail}")
            await asyncio.sleep(0.05)
        return time.monotonic() - began

    def _expected(self, source: str) -> set[int]:
        published = self.ledger.published.get(source, {})
        durable = set(self.ledger.durable.get(source, {}))
        if source == "salesforce":
            return set(published) | durable
        since = self._live_since.get(source, 0)
        return {n for n, reached in published.items() if reached and n >= since
                and not self.ledger.disrupted(source, n)} | durable

    @contextlib.asynccontextmanager
    async def disconnect_window(self, lead: float = 0.5) -> Any:
        """Mark a forced disconnect: events published from `lead` seconds before it until the block ends
        (the daemon has reconnected) may have been in a socket torn down under them. A live socket
        without replay cannot get those back; they are reported apart, and everything else must arrive."""
        start = time.monotonic() - lead
        try:
            yield
        finally:
            self.ledger.windows.append((start, time.monotonic()))

    def mark_live(self) -> None:
        """From here on, events published to a subscribed socket are expected (the daemon is up and subscribed)."""
        self._live_since = dict(self._seq)

    # -- security

    def secret_hits(self, extra_texts: list[str] | None = None) -> dict[str, int]:
        """How many times each secret appears in the daemon log and every API answer seen: must be all 0."""
        texts = [self.daemon.log_text() if self.daemon else "", *self.responses, *(extra_texts or [])]
        hits = {}
        for name, value in vars(self.secrets).items():
            hits[name] = sum(t.count(value) for t in texts)
        return hits


# ---------------------------------------------------------------- RESULTS.md


def write_section(title: str, body: str, path: Path | None = None) -> None:
    """Replace (or append) the `## {title}` section of bench/RESULTS.md, leaving every other section alone."""
    path = path or Path(__file__).resolve().parents[1] / "RESULTS.md"
    heading = f"## {title}"
    text = path.read_text() if path.exists() else ""
    block = f"{heading}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == heading), None)
    if start is None:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        text = "".join(lines[:start]) + block + ("\n" + "".join(lines[end:]) if end < len(lines) else "")
    path.write_text(text)


def header(run_note: str) -> str:
    return (f"Machine: {machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
            f"load average when written {loadavg()} (2 cores shared with four other engineers' runs). {run_note}")


# ---------------------------------------------------------------- hypothesis outside a test


def draw(strategy: Any, count: int, seed: int = 0) -> list[Any]:
    """Up to `count` distinct examples of a hypothesis strategy, reproducibly (fixed seed, no database).

    Why not `strategy.example()`: it is meant for the REPL; running the strategy under `@given` with a
    seed gives hypothesis's full case generation (boundaries, shrinking-friendly variety) and is stable.
    """
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hseed

    seen: list[Any] = []

    @hseed(seed)
    @settings(max_examples=count, database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(value: Any) -> None:
        if value not in seen:
            seen.append(value)

    collect()
    return seen[:count]
