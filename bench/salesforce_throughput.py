"""Salesforce throughput benchmark: one PushTopic, listenerd against aiosfstream-ng on the same stream.

    .venv/bin/python bench/salesforce_throughput.py [--events 20000] [--rate 1000] [--seconds 5] [--write]

Four processes, so no side borrows another's event loop:
- the simulator (`SalesforceSim`, long poll 30 s, up to 1000 events per connect answer, as Salesforce
  batches) publishing through its in-process `publish()`; each sobject carries its publish time `t`;
- listenerd (this process): the real Salesforce source (login, PushTopic lookup, Bayeux long-polling)
  under the real supervisor, the durable outbox (SQLite) and the forwarder, posting to
- an engine (`EngineSim`) that records arrival - `t` for every envelope: publish -> engine latency;
- aiosfstream-ng subscribed to the same topic (its own login and CometD session), recording
  `receive()` - `t`.

In one invocation, first each consumer alone with the simulator, then both subscribed at once:
- burst: N events published while the server holds every connect (a backlog, as after an outage or a
  replay from -2), then released at once. events/s = N / (last arrival - release), listenerd at the
  engine, aiosfstream-ng at `receive()`; the ratio listenerd/aiosfstream-ng is reported. (Measured
  from the release, not the first publish, because the in-process simulator publishes at only about
  8,000 events/s and would otherwise cap both sides.) Latency in this run is from each event's publish.
- paced: `--rate` events/s for `--seconds`; p50/p99 publish -> engine (listenerd) and publish ->
  receive (aiosfstream-ng). aiosfstream-ng does less work (no durable write, no HTTP hop to an
  engine), so the comparison favours it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from bench.common import cpu_model, engine_main, pct, publish_paced, serve_simulator  # noqa: E402
from listenerd.delivery.forwarder import Forwarder  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.sim.salesforce import SalesforceSim  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener, wait_for  # noqa: E402

USER, PASSWORD, KEY, SECRET, TOPIC = "bench@example.com", "benchpassTOKEN", "bench-key", "bench-secret", "Bench"
PAD = "x" * 100  # a small realistic field beside the counters


# ---------------------------------------------------------------- simulator process


def sim_main(conn: Any) -> None:
    async def serve() -> None:
        sim = SalesforceSim(users={USER: PASSWORD}, clients={KEY: SECRET}, long_poll=30.0, batch=1000)
        sim.create_topic(TOPIC, "SELECT Id, Name FROM Invoice__c")
        await sim.start()
        conn.send(sim.url)
        channel = f"/topic/{TOPIC}"

        def invoice(n: int) -> dict[str, Any]:
            return {"Id": f"a0B{n:012d}", "Name": f"INV-{n}", "n": n, "t": time.time(), "pad": PAD}

        async def subscribers(count: int) -> None:
            await wait_for(lambda: sum(channel in c.subscriptions for c in sim.bayeux.values()) >= count,
                           timeout=60, interval=0.05, what="subscribers")

        async def publish_one(n: int) -> None:
            sim.publish(TOPIC, invoice(n))

        async def publish(count: int, rate: float | None) -> tuple[float, float]:
            if rate:
                return await publish_paced(publish_one, count, rate, yield_every=200)  # let held connects answer
            sim.silence(True)  # burst: the backlog builds up at the server, then both consumers drain it
            for n in range(count):
                sim.publish(TOPIC, invoice(n))
            first = time.time()
            sim.silence(False)
            return first, first

        await serve_simulator(conn, subscribers=subscribers, publish=publish, stop=sim.stop)

    asyncio.run(serve())


# ---------------------------------------------------------------- aiosfstream-ng process


def aiosfstream_main(conn: Any, url: str) -> None:
    from aiosfstream_ng import Client, PasswordAuthenticator

    class SimAuthenticator(PasswordAuthenticator):
        @property
        def _token_url(self) -> str:
            return f"{url}/services/oauth2/token"

    async def consume() -> None:
        auth = SimAuthenticator(consumer_key=KEY, consumer_secret=SECRET, username=USER, password=PASSWORD)
        loop = asyncio.get_running_loop()
        async with Client(auth) as client:
            await client.subscribe(f"/topic/{TOPIC}")
            conn.send(True)
            while True:
                cmd, *args = await loop.run_in_executor(None, conn.recv)
                if cmd == "stop":
                    return
                count, limit = args  # receive `count` events
                latencies: list[float] = []
                last = 0.0
                try:
                    async with asyncio.timeout(limit):
                        while len(latencies) < count:
                            message = await client.receive()
                            last = time.time()
                            latencies.append(last - message["data"]["sobject"]["t"])
                except TimeoutError:
                    pass
                conn.send({"count": len(latencies), "last": last, "p50": pct(latencies, 0.5),
                           "p99": pct(latencies, 0.99)})

    asyncio.run(consume())


# ---------------------------------------------------------------- listenerd (this process)


async def engine_stats(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(url.replace("/1.0/events", "/stats")) as response:
        return await response.json()


COMMITTED: list[Any] = []  # the running listenerd's status record (received = committed to the outbox)


async def one_run(sim: Any, peer: Any | None, http: aiohttp.ClientSession | None, url: str, count: int,
                  rate: float | None) -> dict[str, Any]:
    """Publish `count` events; measure the sides that are subscribed (peer: aiosfstream-ng, http: listenerd)."""
    loop = asyncio.get_running_loop()
    committed_at = 0.0
    if http is not None:
        await http.post(url.replace("/1.0/events", "/reset"))
        base = COMMITTED[0].received

        async def watch_commits() -> float:
            await wait_for(lambda: COMMITTED[0].received >= base + count, timeout=120, interval=0.002)
            return time.time()

        watcher = asyncio.create_task(watch_commits())
    if peer is not None:
        peer.send(("receive", count, 300))
    sim.send(("publish", count, rate))
    first, last_publish = await loop.run_in_executor(None, sim.recv)
    result: dict[str, Any] = {"events": count, "publish_seconds": last_publish - first}
    if http is not None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            ours = await engine_stats(http, url)
            if ours["accepted"] >= count:
                break
            await asyncio.sleep(0.02)
        committed_at = await asyncio.wait_for(watcher, 60)
        result["listenerd"] = {"delivered": ours["accepted"],
                               "events_per_s": count / max(ours["last"] - first, 1e-9),
                               "outbox_events_per_s": count / max(committed_at - first, 1e-9),
                               "p50_ms": ours["p50"] * 1000, "p99_ms": ours["p99"] * 1000}
    if peer is not None:
        theirs = await loop.run_in_executor(None, peer.recv)
        result["aiosfstream"] = {"received": theirs["count"],
                                 "events_per_s": count / max(theirs["last"] - first, 1e-9),
                                 "p50_ms": theirs["p50"] * 1000, "p99_ms": theirs["p99"] * 1000}
    return result


class Listenerd:
    """listenerd in this process: store, outbox, forwarder, supervisor, one Salesforce listener."""

    def __init__(self, sim_url: str, engine_url: str, batch_max: int):
        workdir = tempfile.mkdtemp(prefix="sf-bench-")
        self.config = Config.model_validate({"store": {"path": os.path.join(workdir, "bench.db")},
                                             "engine": {"url": engine_url, "batch-max": batch_max}})
        self.creds = integration("salesforce", **{"consumer-key": KEY, "consumer-secret": SECRET, "username": USER,
                                                  "password": PASSWORD, "login-url": sim_url})

    async def start(self) -> None:
        config = self.config
        self.store = Store(config.store.path, config.store.synchronous)
        metrics = Metrics()
        await self.store.open()
        self.outbox = Outbox(self.store, max_events=config.store.outbox_max_events,
                             max_bytes=config.store.outbox_max_bytes, metrics=metrics)
        await self.outbox.start()
        self.supervisor = Supervisor(config, self.outbox, metrics)
        self.forwarder = Forwarder(config.engine, self.outbox, metrics, self.supervisor.forwarded)
        await self.forwarder.start()
        spec = listener(id="LB", type="salesforce", options={"topic": TOPIC, "replay": "new"})
        await self.supervisor.start({("bench", "LB"): Desired(spec, self.creds)})
        record = self.supervisor.status(("bench", "LB"))
        COMMITTED[:] = [record]
        for _ in range(600):
            if record.status == "started":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError(f"listenerd did not subscribe: {record.status}: {record.message}")

    async def stop(self) -> None:
        await self.supervisor.stop()  # unsubscribes and disconnects
        await self.forwarder.stop(flush_timeout=5)
        await self.outbox.close()
        await self.store.close()


async def measure(sim: Any, peer: Any | None, http: aiohttp.ClientSession | None, url: str,
                  args: argparse.Namespace) -> dict[str, Any]:
    await one_run(sim, peer, http, url, 2000, None)  # warm-up
    bursts = [await one_run(sim, peer, http, url, args.events, None) for _ in range(args.repeat)]
    paced = await one_run(sim, peer, http, url, int(args.rate * args.seconds), args.rate)
    return {"bursts": bursts, "paced": paced}


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    sim_conn, sim_child = ctx.Pipe()
    engine_conn, engine_child = ctx.Pipe()
    procs = [ctx.Process(target=sim_main, args=(sim_child,), daemon=True),
             ctx.Process(target=engine_main, args=(engine_child,), daemon=True)]
    for proc in procs:
        proc.start()
    sim_url = sim_conn.recv()
    engine_url = engine_conn.recv()
    peers: list[Any] = []

    def start_peer() -> Any:
        peer_conn, peer_child = ctx.Pipe()
        proc = ctx.Process(target=aiosfstream_main, args=(peer_child, sim_url), daemon=True)
        proc.start()
        procs.append(proc)
        peers.append(peer_conn)
        peer_conn.recv()
        return peer_conn

    def subscribers(n: int) -> None:
        sim_conn.send(("subscribers", n))
        sim_conn.recv()

    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as http:
            # 1. one at a time: each consumer alone with the simulator (listenerd also with its engine)
            ours = Listenerd(sim_url, engine_url, args.batch_max)
            await ours.start()
            subscribers(1)
            alone_ours = await measure(sim_conn, None, http, engine_url, args)
            await ours.stop()
            peer = start_peer()
            subscribers(1)
            alone_theirs = await measure(sim_conn, peer, None, engine_url, args)
            results["alone"] = merge(alone_ours, alone_theirs)
            # 2. concurrently: both subscribed to the same topic, sharing the machine
            ours = Listenerd(sim_url, engine_url, args.batch_max)
            await ours.start()
            subscribers(2)
            results["concurrent"] = await measure(sim_conn, peer, http, engine_url, args)
            await ours.stop()
    finally:
        for conn in (sim_conn, *peers):
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        for proc in procs:
            proc.join(3)
            if proc.is_alive():
                proc.kill()
    for mode in results.values():
        mode["burst"] = median_run(mode["bursts"])
        mode["paced"].update(rate=args.rate, seconds=args.seconds)
    return results


def merge(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    bursts = [{**a, **b} for a, b in zip(ours["bursts"], theirs["bursts"], strict=True)]
    return {"bursts": bursts, "paced": {**ours["paced"], **theirs["paced"]}}


def median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per side, the run with the median events/s (the machine is shared: single runs are noisy)."""
    out: dict[str, Any] = {"events": runs[0]["events"], "runs": len(runs)}
    for side in ("listenerd", "aiosfstream"):
        ordered = sorted(runs, key=lambda r: r[side]["events_per_s"])
        out[side] = ordered[len(ordered) // 2][side]
        out[side + "_all"] = [round(r[side]["events_per_s"]) for r in runs]
    by_outbox = sorted(runs, key=lambda r: r["listenerd"]["outbox_events_per_s"])
    out["outbox"] = by_outbox[len(by_outbox) // 2]["listenerd"]["outbox_events_per_s"]
    out["outbox_all"] = [round(r["listenerd"]["outbox_events_per_s"]) for r in runs]
    out["outbox_ratio"] = out["outbox"] / out["aiosfstream"]["events_per_s"]
    out["ratio"] = out["listenerd"]["events_per_s"] / out["aiosfstream"]["events_per_s"]
    out["ratios"] = [round(r["listenerd"]["events_per_s"] / r["aiosfstream"]["events_per_s"], 2) for r in runs]
    return out


def machine() -> str:
    return f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}"


def rows(mode: dict[str, Any], label: str) -> list[str]:
    b, p = mode["burst"], mode["paced"]
    ours, theirs = b["listenerd"], b["aiosfstream"]
    po, pt = p["listenerd"], p["aiosfstream"]
    return [
        f"| {label}: burst of {b['events']}, events/s, median of {b['runs']} (all runs) "
        f"| **{ours['events_per_s']:,.0f}** ({', '.join(f'{v:,}' for v in b['listenerd_all'])}) "
        f"| {theirs['events_per_s']:,.0f} ({', '.join(f'{v:,}' for v in b['aiosfstream_all'])}) "
        f"| **{b['ratio']:.2f}x** ({', '.join(f'{r}x' for r in b['ratios'])}) |",
        f"| {label}: the same bursts, sim -> listenerd's durable outbox (committed), events/s "
        f"| **{b['outbox']:,.0f}** ({', '.join(f'{v:,}' for v in b['outbox_all'])}) | (as above) "
        f"| **{b['outbox_ratio']:.2f}x** |",
        f"| {label}: burst p50 / p99 latency | {ours['p50_ms']:,.0f} / {ours['p99_ms']:,.0f} ms "
        f"| {theirs['p50_ms']:,.0f} / {theirs['p99_ms']:,.0f} ms | |",
        f"| {label}: paced {p['rate']:g}/s for {p['seconds']:g} s, p50 / p99 latency "
        f"| {po['p50_ms']:.1f} / {po['p99_ms']:.1f} ms | {pt['p50_ms']:.1f} / {pt['p99_ms']:.1f} ms | |",
    ]


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join([".venv/bin/python", "bench/salesforce_throughput.py", *sys.argv[1:]])
    table = "\n".join([
        "| run | listenerd (sim -> source -> SQLite outbox -> forwarder -> engine) "
        "| aiosfstream-ng 0.7.5 (sim -> `receive()`) | ratio |",
        "|---|---|---|---|",
        *rows(result["alone"], "one at a time"),
        *rows(result["concurrent"], "both at once"),
    ])
    return f"""
## salesforce

`{command}` on {machine()}, {date}
(the machine is shared with other builds running at the same time: single runs vary by up to 2x, hence
medians of several runs). Simulator, engine, aiosfstream-ng and listenerd each run in their own process.
"one at a time": each consumer alone with the simulator (listenerd with its engine process too); "both at
once": both subscribed to the same PushTopic in the same run, competing for the 2 cores.
Burst: {args.events} events held at the server, then released (as after an outage or a replay);
events/s from the release to the last arrival. The sim answers each long poll with up to 1000 events.
engine.batch-max = {args.batch_max}.

{table}

listenerd's latency includes a durable SQLite commit and an HTTP POST to the engine; aiosfstream-ng's
ends when its `receive()` returns (nothing durable, no engine). listenerd sends the next long poll
while the previous answer's events go to the outbox (Salesforce's advice: reconnect at once, process
off the poll loop); aiosfstream-ng does too, through its queue.
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3, help="burst runs; the median per side is reported")
    parser.add_argument("--batch-max", type=int, default=500, help="engine.batch-max (default: the config's 500)")
    parser.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    parser.add_argument("--profile", action="store_true", help="cProfile listenerd's process; top 30 by tottime")
    args = parser.parse_args()
    configure_logging("console", "warning")
    if args.profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile()
        result = profiler.runcall(asyncio.run, bench(args))
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    else:
        result = asyncio.run(bench(args))
    print(json.dumps(result, indent=2))
    text = report(result, args)
    print(text)
    if args.write:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
