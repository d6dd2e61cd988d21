"""Salesforce login flows and channel kinds: what each costs.

    .venv/bin/python bench/salesforce_kinds.py [--logins 30] [--events 10000] [--write]

Two processes: the simulator (`SalesforceSim`, its own event loop, so its JWT verification and
publishing do not borrow listenerd's CPU) and listenerd (this process: the real Salesforce source under
the real supervisor, writing to the durable outbox; no engine, so the figure is source + outbox).

- logins: `--logins` sequential logins per flow with `salesforce_auth.login` (aiohttp, loopback), median
  and p95 wall time; the JWT flow signs a fresh RS256 assertion each time (also timed alone).
- channel kinds: per kind (PushTopic, filtered PushTopic where half the records match, Platform Event,
  CDC), `--events` events published while the server holds every connect, then released: events/s
  from the release until the last one is committed to the outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from bench.common import cpu_model, pct  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.net import client_tls  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.sim.salesforce import SalesforceSim, throwaway_certificate  # noqa: E402
from listenerd.sources.salesforce_auth import jwt_assertion, login  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener, wait_for  # noqa: E402

USER, PASSWORD, KEY, SECRET = "bench@example.com", "benchpassTOKEN", "bench-key", "bench-secret"
KINDS = {"pushtopic": "/topic/Bench", "filtered": "/topic/Bench?Status__c=Open",
         "platform-event": "/event/Bench__e", "cdc": "/data/AccountChangeEvent"}


def sim_main(conn: Any, certificate: str) -> None:
    async def serve() -> None:
        sim = SalesforceSim(users={USER: PASSWORD, "run-as@example.com": "x"}, clients={KEY: SECRET},
                            certificates={KEY: certificate}, run_as={KEY: "run-as@example.com"},
                            long_poll=30.0, batch=1000, max_logins_per_hour=10**6)
        sim.create_topic("Bench", "SELECT Id, Name, Status__c FROM Invoice__c")
        sim.define_platform_event("Bench__e")
        sim.enable_change_events("Account")
        await sim.start()
        conn.send(sim.url)
        loop = asyncio.get_running_loop()
        while True:
            cmd, *args = await loop.run_in_executor(None, conn.recv)
            if cmd == "stop":
                await sim.stop()
                return
            kind, count = args
            await wait_for(lambda: any(c.subscriptions for c in sim.bayeux.values()), timeout=30, what="subscriber")
            sim.silence(True)
            for n in range(count):
                if kind in ("pushtopic", "filtered"):
                    sim.publish("Bench", {"Id": f"a0B{n:012d}", "Name": f"INV-{n}",
                                          "Status__c": "Open" if n % 2 == 0 else "Closed"})
                elif kind == "platform-event":
                    sim.publish_event("Bench__e", {"Order_Number__c": f"O-{n}", "Amount__c": n})
                else:
                    sim.publish_change("Account", "UPDATE", [f"001{n:015d}"], {"Name": f"Acme {n}"})
            released = time.time()
            sim.silence(False)
            conn.send(released)

    asyncio.run(serve())


async def time_logins(url: str, key_pem: str, count: int) -> dict[str, Any]:
    flows = {"password": {"consumer-key": KEY, "consumer-secret": SECRET, "username": USER, "password": PASSWORD},
             "jwt": {"auth": "jwt", "consumer-key": KEY, "username": USER, "private-key": key_pem},
             "client-credentials": {"auth": "client-credentials", "consumer-key": KEY, "consumer-secret": SECRET}}
    out: dict[str, Any] = {}
    sslctx = client_tls(None)
    async with aiohttp.ClientSession() as http:
        for name, fields in flows.items():
            creds = integration("salesforce", **{**fields, "login-url": url})
            times = []
            for _ in range(count):
                start = time.perf_counter()
                await login(http, creds, sslctx, 10.0)
                times.append(time.perf_counter() - start)
            out[name] = {"median_ms": statistics.median(times) * 1000, "p95_ms": pct(times, 0.95) * 1000}
        creds = integration("salesforce", **{**flows["jwt"], "login-url": url})
        start = time.perf_counter()
        for _ in range(count):
            jwt_assertion(creds)
        out["jwt_sign_only_ms"] = (time.perf_counter() - start) / count * 1000
    return out


async def time_kind(sim: Any, url: str, kind: str, count: int) -> dict[str, Any]:
    workdir = tempfile.mkdtemp(prefix="sf-kinds-")
    config = Config.model_validate({"store": {"path": os.path.join(workdir, "bench.db")}})
    store = Store(config.store.path, config.store.synchronous)
    await store.open()
    metrics = Metrics()
    outbox = Outbox(store, max_events=10**7, max_bytes=10**10, metrics=metrics)
    await outbox.start()
    supervisor = Supervisor(config, outbox, metrics)
    creds = integration("salesforce", **{"consumer-key": KEY, "consumer-secret": SECRET, "username": USER,
                                         "password": PASSWORD, "login-url": url})
    spec = listener(id="LK", type="salesforce", options={"topic": KINDS[kind], "replay": "new"},
                    mapping={"name": "Name", "replay": "$event.replayId"})
    await supervisor.start({("bench", "LK"): Desired(spec, creds)})
    record = supervisor.status(("bench", "LK"))
    loop = asyncio.get_running_loop()
    try:
        await wait_for(lambda: record.status == "started", timeout=30, what="started")
        expected = count // 2 if kind == "filtered" else count
        sim.send(("publish", kind, count))
        released = await loop.run_in_executor(None, sim.recv)
        await wait_for(lambda: record.received >= expected, timeout=120, interval=0.002, what="all committed")
        elapsed = time.time() - released
        return {"published": count, "committed": record.received, "events_per_s": record.received / elapsed}
    finally:
        await supervisor.stop()
        await outbox.close()
        await store.close()


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    key_pem, certificate = throwaway_certificate("bench")
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=sim_main, args=(child, certificate), daemon=True)
    proc.start()
    url = conn.recv()
    try:
        logins = await time_logins(url, key_pem, args.logins)
        kinds = {kind: await time_kind(conn, url, kind, args.events) for kind in KINDS}
    finally:
        conn.send(("stop",))
        proc.join(10)
    return {"logins": logins, "kinds": kinds}


def report(result: dict[str, Any], args: argparse.Namespace) -> str:
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"`.venv/bin/python bench/salesforce_kinds.py --logins {args.logins} --events {args.events}` on "
             f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}, {when}; load average "
             f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine is shared).", "",
             "| login flow | median | p95 |", "|---|---|---|"]
    for flow in ("password", "jwt", "client-credentials"):
        figures = result["logins"][flow]
        lines.append(f"| {flow} | {figures['median_ms']:.1f} ms | {figures['p95_ms']:.1f} ms |")
    lines += ["", f"RS256 assertion signing alone: {result['logins']['jwt_sign_only_ms']:.2f} ms per login.", "",
              "| channel kind | topic | events committed | events/s to the outbox |", "|---|---|---|---|"]
    for kind, figures in result["kinds"].items():
        lines.append(f"| {kind} | `{KINDS[kind]}` | {figures['committed']} of {figures['published']} published | "
                     f"{figures['events_per_s']:,.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=30)
    parser.add_argument("--events", type=int, default=10000)
    parser.add_argument("--write", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()
    configure_logging("json", "warning")
    text = report(asyncio.run(bench(args)), args)
    print(text)
    if args.write:
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as out:
            out.write("\n## salesforce login flows and channel kinds\n\n" + text + "\n")


if __name__ == "__main__":
    main()
