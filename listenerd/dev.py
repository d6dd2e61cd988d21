"""`listenerd dev`: a complete local run with no accounts and no network beyond loopback.

Starts the Pusher, DataSift and Salesforce simulators (CometD and the Pub/Sub API, one org), a local
engine sink that prints every normalized event and appends it to a JSON-lines file, and the daemon
itself with a demo tenant holding one listener of each kind; demo publishers send realistic payloads
at a gentle rate.
Salesforce logs in with the JWT bearer flow: the run makes its own throwaway RSA key and self-signed
certificate at start (in memory: `dev_app_key`), gives the certificate to the simulated connected app
and the key to the integration, as an admin would with `openssl` (README). Beside the PushTopic
listener there is a Platform Event listener, a Change Data Capture listener and a Pub/Sub API
listener.
Everything runs in this one process and event loop; Ctrl-C stops it all cleanly. There is no config
file for it: the config is built here (`demo_config`), because it points at the simulators' ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import structlog

from listenerd import config as config_module
from listenerd.daemon import Daemon
from listenerd.model import Config
from listenerd.sim.datasift import DataSiftSim
from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.sim.salesforce import SalesforceSim, throwaway_certificate
from listenerd.sim.salesforce_pubsub import SalesforcePubsubSim
from listenerd.store import StoreUnavailable
from listenerd.systemd import Notifier
from listenerd.tasks import cancel_and_wait

log = structlog.get_logger("listenerd.dev")
DEV_TOKEN = "listenerd-dev-token"
TENANT = "demo"
DATASIFT_HASH = "4f3af38ad1c31646561bc814c3e69af5"
TOPIC = "InvoiceStatementUpdates"
PLATFORM_EVENT = "Order_Placed__e"
CDC_OBJECT = "Account"
_INDUSTRIES = ("Banking", "Retail", "Energy", "Healthcare", "Education")
PUBSUB_TOPIC = "/event/Order__e"
_STATES = ("created", "paid", "packed", "shipped", "delivered")
_CUSTOMERS = ("Ada Lovelace", "Grace Hopper", "Alan Turing", "Katherine Johnson", "Edsger Dijkstra")
_INVOICE_STATES = ("Open", "Negotiating", "Pending", "Closed")


class Sink:
    """The local engine's printer: one readable line per event on stdout, one JSON line per event on disk."""

    def __init__(self, path: Path, stream: Any = None):
        self.path = path
        self.stream = stream or sys.stdout
        self.count = 0
        self._file = open(path, "ab")  # noqa: SIM115 - closed in close()

    def __call__(self, envelopes: list[dict[str, Any]]) -> None:
        for envelope in envelopes:
            self.count += 1
            self._file.write(orjson.dumps(envelope) + b"\n")
            event = orjson.dumps(envelope["event"]).decode()
            print(f"engine <- {envelope['source']:<10} {envelope['tenant-id']}/{envelope['listener-id']:<4} {event}",
                  file=self.stream, flush=True)
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def demo_config(listen: str, directory: Path, engine: EngineSim, pusher: PusherSim, datasift: DataSiftSim,
                salesforce: SalesforceSim, pubsub_url: str | None = None) -> Config:
    """The demo's config, validated as a config file is (cross-checks included).

    With `pubsub_url` (the Pub/Sub API simulator's), the Salesforce integration also carries a
    `salesforce-pubsub` listener (LI6) on the org's Platform Event `/event/Order__e`.
    """
    pubsub = {"pubsub-url": pubsub_url} if pubsub_url else {}
    pubsub_listeners = [
        {"id": "LI6", "name": "Demo Salesforce orders (Pub/Sub API)", "type": "salesforce-pubsub",
         "options": {"topic": PUBSUB_TOPIC, "replay": "resume", "batch": 100},
         "mapping": {"order": "OrderNumber__c", "amount": "Amount__c", "state": "Status__c",
                     "replay-id": "$event.replayId", "schema": "$schema.id"}}] if pubsub_url else []
    return config_module.validate({
        "server": {"listen": listen, "tokens": [{"name": "dev", "token": DEV_TOKEN, "tenants": ["*"]}],
                   # integrations made through the API may point at the local simulators
                   "egress": {"hosts": ["localhost"], "networks": ["127.0.0.0/8", "::1/128"], "plaintext": True}},
        "engine": {"url": engine.url},
        "store": {"path": str(directory / "listenerd.db")},
        "supervisor": {"backoff-max": 5.0, "stop-timeout": 5.0},
        "tenants": [{
            "id": TENANT, "name": "Demo tenant",
            "integrations": {
                "pusher": {"key": pusher.key, "secret": pusher.secret, "app-id": pusher.app_id,
                           "host": pusher.host, "port": pusher.port, "tls": False},
                "datasift": {"username": "demo", "api-key": "demo-datasift-key", "stream-url": datasift.url},
                "salesforce": {"auth": "jwt", "consumer-key": "demo-consumer-key", "username": "demo@example.com",
                               "private-key": dev_app_key()[0], "login-url": salesforce.url,
                               **pubsub},
            },
            "listeners": [
                {"id": "LI1", "name": "Demo Datasift", "type": "datasift", "options": {"hash": DATASIFT_HASH},
                 "mapping": {"username": "interaction.author.username", "sentiment": "salience.content.sentiment",
                             "id": "twitter.user.screen_name"}},
                {"id": "LI2", "name": "Demo Salesforce invoices", "type": "salesforce",
                 "options": {"topic": TOPIC, "replay": "resume"},
                 "mapping": {"invoice": "Name", "state": "Status__c", "amount": "Amount__c",
                             "change": "$event.type", "replay-id": "$event.replayId"}},
                {"id": "LI3", "name": "Demo Pusher orders", "type": "pusher",
                 "options": {"channel": "orders"},
                 "mapping": {"order": "id", "state": "state", "customer": "customer.name", "event": "$event"}},
                {"id": "LI4", "name": "Demo Salesforce Platform Event", "type": "salesforce",
                 "options": {"topic": f"/event/{PLATFORM_EVENT}"},
                 "mapping": {"order": "Order_Number__c", "amount": "Amount__c", "replay-id": "$event.replayId",
                             "uuid": "$event.EventUuid"}},
                {"id": "LI5", "name": "Demo Salesforce account changes (CDC)", "type": "salesforce",
                 "options": {"topic": f"/data/{CDC_OBJECT}ChangeEvent"},
                 "mapping": {"account": "Name", "industry": "Industry", "change": "$header.changeType",
                             "records": "$header.recordIds", "replay-id": "$event.replayId"}},
                *pubsub_listeners,
            ],
        }],
    })


async def publish_demo_events(pusher: PusherSim, salesforce: SalesforceSim, rate: float,
                              pubsub: SalesforcePubsubSim | None = None) -> None:
    """Realistic payloads at `rate` per second per source (DataSift feeds itself)."""
    rnd = random.Random()
    for n in itertools.count(1):
        await pusher.publish("orders", f"order.{rnd.choice(('created', 'updated'))}", {
            "id": 1000 + n, "state": rnd.choice(_STATES), "amount": round(rnd.uniform(5, 500), 2),
            "customer": {"name": rnd.choice(_CUSTOMERS), "id": rnd.randint(1, 999)}})
        salesforce.publish(TOPIC, {"Id": f"a00D0000008o{n:06d}", "Name": f"INV-{n:04d}",
                                   "Status__c": rnd.choice(_INVOICE_STATES),
                                   "Amount__c": round(rnd.uniform(100, 10_000), 2)},
                           type=rnd.choice(("created", "updated")))
        salesforce.publish_event(PLATFORM_EVENT, {"Order_Number__c": f"ORD-{n:05d}",
                                                  "Amount__c": round(rnd.uniform(5, 500), 2)})
        change = "CREATE" if n % 3 == 1 else "UPDATE"
        salesforce.publish_change(CDC_OBJECT, change, [f"001D000000Ab{(n + 2) // 3:06d}"],
                                  {"Name": rnd.choice(_CUSTOMERS) + " Ltd", "Industry": rnd.choice(_INDUSTRIES)})
        if pubsub is not None:
            pubsub.publish(PUBSUB_TOPIC, {"OrderNumber__c": f"O-{n:05d}", "Amount__c": round(rnd.uniform(5, 500), 2),
                                          "Status__c": rnd.choice(_STATES)})
        await asyncio.sleep(1.0 / rate)


def banner(daemon: Daemon, directory: Path, sims: dict[str, str]) -> str:
    api = daemon.api_url
    curl = f'curl -s -H "Authorization: Bearer {DEV_TOKEN}"'
    lines = [
        "",
        f"listenerd dev: open the console at {api}/console/  (token: {DEV_TOKEN})",
        "",
        "A complete local run (simulators, demo listeners, a local engine sink):",
        f"  API:       {api}        token: {DEV_TOKEN}",
        f"  engine:    {sims['engine']}  (prints every event below; also {directory / 'engine-events.jsonl'})",
        f"  store:     {directory / 'listenerd.db'}",
        f"  simulators: pusher {sims['pusher']}  datasift {sims['datasift']}  salesforce {sims['salesforce']}"
        f"  salesforce pub/sub {sims['pubsub']}",
        "",
        "Try:",
    ]
    for lid in ("LI1", "LI2", "LI3", "LI4", "LI5", "LI6"):
        lines.append(f"  {curl} {api}/1.0/tenants/{TENANT}/listeners/{lid}/status")
    lines += [
        f"  {curl} {api}/1.0/tenants/{TENANT}/listeners",
        f"  {curl} -N {api}/1.0/tenants/{TENANT}/listeners/LI3/tap",
        f"  curl -s {api}/metrics | grep listenerd_events",
        f"  listenerd status --url {api} --token {DEV_TOKEN}",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


@functools.cache
def dev_app_key() -> tuple[str, str]:
    """This run's connected app key pair (private key PEM, certificate PEM): made once, never written."""
    return throwaway_certificate("listenerd-dev")


def simulators(sink: Sink | None = None) -> tuple[EngineSim, PusherSim, DataSiftSim, SalesforceSim]:
    """The four simulators of a dev run, not started; their credentials are the ones `demo_config` holds
    (the Salesforce connected app trusts this run's throwaway certificate)."""
    engine = EngineSim(on_events=sink, keep=False)  # the sink keeps them on disk; memory stays flat
    pusher = PusherSim("12345", "demo-app-key", "demo-app-secret")
    datasift = DataSiftSim(users={"demo": "demo-datasift-key"}, tick_interval=10.0)
    salesforce = SalesforceSim(users={"demo@example.com": "demo-passwordDEMOTOKEN"},
                               clients={"demo-consumer-key": "demo-consumer-secret"},
                               certificates={"demo-consumer-key": dev_app_key()[1]}, long_poll=30.0)
    salesforce.define_platform_event(PLATFORM_EVENT)
    salesforce.enable_change_events(CDC_OBJECT)
    return engine, pusher, datasift, salesforce


class DevStack:
    """A dev run's parts in one event loop: the four simulators, the daemon, the demo publishers.

    `listenerd dev` runs one until Ctrl-C; the browser tests run one to drive the simulators
    (drop a socket, refuse a batch) while a real browser watches the console.
    """

    def __init__(self, listen: str, workdir: Path, rate: float = 1.0, stream: Any = None):
        self.listen, self.workdir, self.rate = listen, workdir, rate
        self.sink = Sink(workdir / "engine-events.jsonl", stream)
        self.engine, self.pusher, self.datasift, self.salesforce = simulators(self.sink)
        self.pubsub: SalesforcePubsubSim | None = None
        self.daemon: Daemon | None = None
        self._started: list[Any] = []
        self._publisher: asyncio.Task[None] | None = None

    async def start(self) -> DevStack:
        """Start everything; a StoreUnavailable or OSError (the API's port taken) leaves nothing running."""
        try:
            for sim in (self.engine, self.pusher, self.datasift, self.salesforce):
                await sim.start()
                self._started.append(sim)
            self.salesforce.create_topic(TOPIC, "SELECT Id, Name, Status__c, Amount__c FROM Invoice_Statement__c")
            self.pubsub = await SalesforcePubsubSim(self.salesforce).start()  # the same org: its tokens work on both
            self._started.append(self.pubsub)
            config = demo_config(self.listen, self.workdir, self.engine, self.pusher, self.datasift, self.salesforce,
                                 pubsub_url=self.pubsub.url)
            self.daemon = Daemon(config, None, notifier=Notifier.from_env())
            await self.daemon.start()
        except BaseException:
            await self.stop()
            raise
        self.datasift.feed(DATASIFT_HASH, interval=1.0 / self.rate)
        self._publisher = asyncio.create_task(publish_demo_events(self.pusher, self.salesforce, self.rate,
                                                                  self.pubsub), name="demo-publisher")
        return self

    async def stop(self) -> None:
        if self._publisher:
            await cancel_and_wait(self._publisher)
            self._publisher = None
        if self.daemon and self.daemon.ready:
            await self.daemon.stop()
        for sim in reversed(self._started):
            with contextlib.suppress(Exception):
                await sim.stop()
        self._started.clear()
        self.sink.close()

    async def __aenter__(self) -> DevStack:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    def banner(self) -> str:
        assert self.daemon is not None
        return banner(self.daemon, self.workdir, {"engine": self.engine.url, "pusher": self.pusher.url,
                                                  "datasift": self.datasift.url, "salesforce": self.salesforce.url,
                                                  "pubsub": self.pubsub.url if self.pubsub else ""})


async def dev(listen: str = "127.0.0.1:8088", directory: str | None = None, rate: float = 1.0) -> int:
    workdir = Path(directory) if directory else Path(tempfile.mkdtemp(prefix="listenerd-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = DevStack(listen, workdir, rate)
    try:
        try:
            await stack.start()
        except StoreUnavailable as exc:
            log.error("listenerd dev could not start", error=str(exc))
            return 1
        except OSError as exc:
            log.error("cannot start the API", listen=listen, error=str(exc),
                      hint="is another listenerd running? try `listenerd dev --listen 127.0.0.1:8089`")
            return 1
        print(stack.banner(), flush=True)
        await stop.wait()
        log.info("listenerd dev stopping", events_in_sink=stack.sink.count)
        return 0
    finally:
        await stack.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
