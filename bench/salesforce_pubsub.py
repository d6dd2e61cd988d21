"""Pub/Sub API listener against the CometD listener on the same events, and flow control with the engine down.

    .venv/bin/python bench/salesforce_pubsub.py [--events 10000] [--repeat 3] [--bound 1000] [--backlog 5000]

Two processes, so the listener's CPU is its own: the simulators (one org: `SalesforceSim` for the
login and CometD with a PushTopic, `SalesforcePubsubSim` for the Pub/Sub API with a Platform Event of
the same fields) in a child; listenerd (store, durable outbox, supervisor, the real sources) here.

1. Throughput and CPU per event, each listener type alone with the same N events (fields `n`, `t`,
   a 100-byte `pad`): the backlog is published while the server holds back (CometD connects held,
   Pub/Sub stream silent), then released; events/s = N / (last commit to the outbox - release), and
   CPU per event = this process's CPU time (all threads) over the same span / N. The median run of
   `--repeat` is reported, with all runs. Both listeners stop at the durable outbox (no engine), so
   the comparison is the sources' own cost: gRPC + Avro against long-polled JSON.
2. Flow control with the engine down: an outbox bound of `--bound` events, nothing draining it, a
   backlog of `--backlog` events on the Pub/Sub topic. Reported: the outbox depth at rest, what the
   server sent against what was asked for, the process's RSS; then the engine "comes back" (the
   outbox drained as the forwarder would: lease, ack) and the stream resumes: time to drain, every
   event delivered once in order, the same stream throughout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson  # noqa: E402

from bench.common import cpu_model  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener, wait_for  # noqa: E402

USER, PASSWORD, KEY, SECRET = "bench@example.com", "benchpassTOKEN", "bench-key", "bench-secret"
PUSH_TOPIC, EVENT_TOPIC = "Bench", "/event/Bench__e"
PAD = "x" * 100
BENCH_SCHEMA = {"type": "record", "name": "Bench__e", "namespace": "com.sforce.eventbus", "fields": [
    {"name": "CreatedDate", "type": "long"}, {"name": "CreatedById", "type": "string"},
    {"name": "n", "type": ["null", "long"], "default": None},
    {"name": "t", "type": ["null", "double"], "default": None},
    {"name": "pad", "type": ["null", "string"], "default": None}]}


# ---------------------------------------------------------------- simulator process


def sim_main(conn: Any) -> None:
    from listenerd.sim.salesforce import SalesforceSim
    from listenerd.sim.salesforce_pubsub import SalesforcePubsubSim

    async def serve() -> None:
        org = SalesforceSim(users={USER: PASSWORD}, clients={KEY: SECRET}, long_poll=30.0, batch=1000)
        org.create_topic(PUSH_TOPIC, "SELECT Id, Name FROM Invoice__c")
        bus = SalesforcePubsubSim(org, keepalive=270.0)
        bus.add_topic(EVENT_TOPIC, BENCH_SCHEMA)
        await org.start()
        await bus.start()
        conn.send((org.url, bus.url))
        loop = asyncio.get_running_loop()
        while True:
            cmd, *args = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                break
            if cmd == "backlog":  # publish `count` while holding back, then release; the release time back
                kind, count = args
                org.silence(True) if kind == "cometd" else bus.silence(True)
                for n in range(count):
                    record = {"Id": f"a0B{n:012d}", "Name": f"INV-{n}", "n": n, "t": time.time(), "pad": PAD}
                    if kind == "cometd":
                        org.publish(PUSH_TOPIC, record)
                    else:
                        bus.publish(EVENT_TOPIC, {"CreatedDate": 0, "CreatedById": "005", "n": n, "t": record["t"],
                                                  "pad": PAD})
                await asyncio.sleep(0.2)
                released = time.time()
                org.silence(False) if kind == "cometd" else bus.silence(False)
                conn.send(released)
            elif cmd == "streams":
                conn.send([(s.topic, s.requested, s.sent, s.most_owed) for s in bus.streams])
        await bus.stop()
        await org.stop()

    asyncio.run(serve())


# ---------------------------------------------------------------- listenerd (this process)


class Listenerd:
    """Store, outbox and supervisor with one listener; no forwarder (the outbox is where we measure)."""

    def __init__(self, org_url: str, bus_url: str, max_events: int = 10_000_000):
        workdir = tempfile.mkdtemp(prefix="pubsub-bench-")
        self.config = Config.model_validate({"store": {"path": os.path.join(workdir, "bench.db")}})
        self.creds = integration("salesforce", **{"consumer-key": KEY, "consumer-secret": SECRET, "username": USER,
                                                  "password": PASSWORD, "login-url": org_url, "pubsub-url": bus_url})
        self.max_events = max_events

    async def start(self, kind: str, batch: int = 100) -> Any:
        self.store = Store(self.config.store.path, self.config.store.synchronous)
        await self.store.open()
        metrics = Metrics()
        self.outbox = Outbox(self.store, max_events=self.max_events, max_bytes=1 << 31, metrics=metrics)
        await self.outbox.start()
        self.supervisor = Supervisor(self.config, self.outbox, metrics)
        if kind == "cometd":
            spec = listener(id="LB", type="salesforce", options={"topic": PUSH_TOPIC, "replay": "new"})
        else:
            spec = listener(id="LB", type="salesforce-pubsub", options={"topic": EVENT_TOPIC, "replay": "new",
                                                                        "batch": batch})
        await self.supervisor.start({("bench", "LB"): Desired(spec, self.creds)})
        record = self.supervisor.status(("bench", "LB"))
        await wait_for(lambda: record.status == "started", timeout=30, interval=0.05, what=f"{kind} started")
        return record

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.outbox.close()
        await self.store.close()


async def burst(sim: Any, ours: Listenerd, record: Any, kind: str, count: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    base = record.received
    sim.send(("backlog", kind, count))
    released = await loop.run_in_executor(None, sim.recv)
    cpu0 = time.process_time()
    await wait_for(lambda: record.received >= base + count, timeout=120, interval=0.002, what="committed")
    done = time.time()
    cpu = time.process_time() - cpu0
    return {"events_per_s": count / (done - released), "cpu_us_per_event": cpu / count * 1e6}


async def throughput(sim: Any, urls: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("cometd", "pubsub"):
        ours = Listenerd(*urls)
        record = await ours.start(kind)
        await burst(sim, ours, record, kind, 1000)  # warm-up (schema fetch, first commits)
        runs = [await burst(sim, ours, record, kind, args.events) for _ in range(args.repeat)]
        await ours.stop()
        ordered = sorted(runs, key=lambda r: r["events_per_s"])
        out[kind] = {"median": ordered[len(ordered) // 2], "runs": runs}
    return out


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def flow_control(sim: Any, urls: tuple[str, str], args: argparse.Namespace) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sim.send(("streams",))
    streams_before = len(await loop.run_in_executor(None, sim.recv))
    ours = Listenerd(*urls, max_events=args.bound)
    record = await ours.start("pubsub", batch=100)
    sim.send(("backlog", "pubsub", args.backlog))
    await loop.run_in_executor(None, sim.recv)
    await wait_for(lambda: ours.outbox.depth >= args.bound, timeout=60, interval=0.01, what="outbox at its bound")
    await asyncio.sleep(2.0)  # the engine stays down: nothing more may arrive
    sim.send(("streams",))
    streams_at_rest = await loop.run_in_executor(None, sim.recv)
    at_rest = {"depth": ours.outbox.depth, "committed": record.received, "status": record.status,
               "requested": streams_at_rest[-1][1], "sent": streams_at_rest[-1][2],
               "most_owed": streams_at_rest[-1][3], "rss_mib": rss_mib()}
    started = time.monotonic()
    delivered: list[int] = []
    max_depth = 0
    while len(delivered) < args.backlog:  # the engine is back: drain as the forwarder does
        rows = await ours.outbox.lease(500)
        if rows:
            delivered += [orjson.loads(row.body)["event"]["n"] for row in rows]
            await ours.outbox.ack(rows)
        else:
            await asyncio.sleep(0.001)
        max_depth = max(max_depth, ours.outbox.depth)
        if time.monotonic() - started > 60:
            break
    drained = time.monotonic() - started
    sim.send(("streams",))
    streams = await loop.run_in_executor(None, sim.recv)
    await ours.stop()
    return {"at_rest": at_rest, "drain_seconds": drained, "delivered": len(delivered),
            "in_order_once": delivered == list(range(args.backlog)), "max_depth_while_draining": max_depth,
            "streams": len(streams) - streams_before, "sent": streams[-1][2], "requested": streams[-1][1]}


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    t, f = result["throughput"], result["flow"]
    c, p = t["cometd"]["median"], t["pubsub"]["median"]
    rest = f["at_rest"]

    def runs(kind: str, key: str, fmt: str) -> str:
        return ", ".join(format(r[key], fmt) for r in t[kind]["runs"])

    return "\n".join([
        "## salesforce pub/sub API",
        "",
        f"`.venv/bin/python bench/salesforce_pubsub.py --events {args.events} --repeat {args.repeat} --bound "
        f"{args.bound} --backlog {args.backlog}` on {result['machine']}, {result['when']} (a machine shared with "
        f"other builds; load average {result['load']}). Simulators in a child process; listenerd's CPU is this "
        "process's (all threads). Both listeners stop at the durable outbox (SQLite, committed).",
        "",
        f"| {args.events} events, backlog released at once | CometD listener (`salesforce`) | Pub/Sub listener "
        "(`salesforce-pubsub`, batch 100) |",
        "|---|---|---|",
        f"| events/s to the outbox, median (all runs) "
        f"| {c['events_per_s']:,.0f} ({runs('cometd', 'events_per_s', ',.0f')})"
        f" | **{p['events_per_s']:,.0f}** ({runs('pubsub', 'events_per_s', ',.0f')}) |",
        f"| CPU per event, µs (all runs) | {c['cpu_us_per_event']:.0f} ({runs('cometd', 'cpu_us_per_event', '.0f')})"
        f" | **{p['cpu_us_per_event']:.0f}** ({runs('pubsub', 'cpu_us_per_event', '.0f')}) |",
        "",
        f"Flow control, engine down: outbox bound {args.bound} events, {args.backlog} events waiting on the topic.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| outbox depth at rest (2 s after reaching the bound) | {rest['depth']} (bound {args.bound}) |",
        f"| events the server sent / events asked for | {rest['sent']} / {rest['requested']} |",
        f"| most events owed at once (asked, not yet sent) | {rest['most_owed']} |",
        f"| listener status at rest | {rest['status']} |",
        f"| RSS at rest | {rest['rss_mib']:.0f} MiB |",
        f"| engine back: all {args.backlog} delivered in | {f['drain_seconds']:.2f} s |",
        f"| delivered once each, in order | {f['delivered']} events, {'yes' if f['in_order_once'] else 'NO'} |",
        f"| outbox depth while draining, at most | {f['max_depth_while_draining']} |",
        f"| Subscribe streams used (1 = the stream resumed, no reconnect) | {f['streams']} |",
        f"| server sent / asked for, at the end | {f['sent']} / {f['requested']} |",
    ])


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    sim, child = ctx.Pipe()
    proc = ctx.Process(target=sim_main, args=(child,), daemon=True)
    proc.start()
    urls = sim.recv()
    try:
        result = {"throughput": await throughput(sim, urls, args), "flow": await flow_control(sim, urls, args)}
    finally:
        with contextlib.suppress(Exception):
            sim.send(("stop",))
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    result["machine"] = f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}"
    result["when"] = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    result["load"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--bound", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=5000)
    args = parser.parse_args()
    configure_logging("console", "warning")
    result = asyncio.run(bench(args))
    print(report(result, args))


if __name__ == "__main__":
    main()
