"""Mixed-fleet benchmark: 1,000 listeners over the three sources and 10 tenants, in one real daemon.

    .venv/bin/python bench/fleet.py [--listeners 1000] [--tenants 10] [--idle 10] [--write]

Issue 13's target: "1,000 listeners, mixed evenly over the three sources and 10 tenants: RSS under
100 MiB for the whole daemon, started in under 10 s, idle CPU under 1 %".

What runs: the Pusher, DataSift and Salesforce simulators, each in its own process (their sockets
and CPU are not the daemon's); the engine in this process (idle: no events flow); the daemon as a
real child process (`python -m listenerd run`, `listenerd.testing.DaemonProcess`). Each tenant has one
integration per source (its own Pusher key on one simulated app, its own DataSift user, its own
Salesforce user), and the listeners of each source are dealt round-robin over the tenants (1,000
over 3 sources: 334 Pusher, 333 DataSift, 333 Salesforce). Timings are the providers' own (Pusher
activity timeout 120 s, DataSift ticks every 10 s, Salesforce long polls held 110 s).

Measured:
- RSS of the daemon (VmRSS) once ready with the tenants and integrations but no listener, and with
  every listener `started` (after a 3 s settle); its peak (VmHWM);
- time from the reload that adds the listeners (SIGHUP after the config gained them) until all are
  `started`, polled on `/metrics` (`listenerd_listener_status`);
- idle CPU: the daemon's user+system time over `--idle` seconds with everything started and no
  events, as a percentage of one core;
- what each simulator saw: connections (live and ever accepted), logins, Bayeux clients, subscriptions.

Only the config, the API and the simulators' counters are used, so the script measures whatever the
sources do (one connection per listener, or one per tenant and integration).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from bench.chaos.rig import header, sample, write_section  # noqa: E402
from bench.common import serve_counts  # noqa: E402
from listenerd.sim.datasift import DataSiftSim  # noqa: E402
from listenerd.sim.engine import EngineSim  # noqa: E402
from listenerd.sim.pusher import PusherSim  # noqa: E402
from listenerd.sim.salesforce import SalesforceSim  # noqa: E402
from listenerd.testing import DaemonProcess, wait_for  # noqa: E402

SOURCES = ("pusher", "datasift", "salesforce")
APP_ID, PUSHER_KEY, PUSHER_SECRET = "4242", "fleet-key", "fleet-secret"
CONSUMER_KEY, CONSUMER_SECRET = "fleet-ck", "fleet-cs"
SF_PASSWORD, SF_TOKEN = "fleet-pw", "FLEETTOKEN"
OPS_TOKEN, ENGINE_TOKEN = "fleet-ops-token", "fleet-engine-token"
STATUS_LINE = re.compile(r'^listenerd_listener_status\{([^}]*)\} ([0-9.e+-]+)$', re.M)


def shares(total: int) -> dict[str, int]:
    """`total` listeners dealt over the three sources, the first ones getting the remainder."""
    base, extra = divmod(total, len(SOURCES))
    return {s: base + (1 if i < extra else 0) for i, s in enumerate(SOURCES)}


def tenant_of(i: int, tenants: int) -> str:
    return f"t{i % tenants}"


# ---------------------------------------------------------------- the simulators, one process each


def _counts(kind: str, sim: Any) -> dict[str, int]:
    """What a simulator saw, from its public counters (getattr: robust to simulators that grow)."""
    if kind == "pusher":
        live = list(sim.connections)
        return {"connections": len(live), "connects": getattr(sim, "connects", 0),
                "subscriptions": sum(len(c.channels) for c in live)}
    if kind == "datasift":
        live = list(sim.connections)
        return {"connections": len(live), "connects": sim.connects,
                "subscriptions": sum(len(c.hashes) for c in live)}
    handshakes = sum(1 for r in sim.requests if r.get("channel") == "/meta/handshake")
    return {"logins": sim.logins, "clients": len(sim.bayeux), "handshakes": handshakes,
            "subscriptions": sum(len(getattr(c, "subscriptions", ())) for c in sim.bayeux.values())}


def sim_main(kind: str, conn: Any, counts: dict[str, int], tenants: int) -> None:
    """Process entry: start the `kind` simulator, send its address, answer ("counts",) until ("stop",)."""

    async def serve() -> None:
        sim: Any
        if kind == "pusher":
            sim = PusherSim(APP_ID, PUSHER_KEY, PUSHER_SECRET, backlog=4096)
        elif kind == "datasift":
            sim = DataSiftSim(users={f"fleet{t}": f"fleet-ds-key-{t}" for t in range(tenants)}, tick_interval=10.0)
        else:
            sim = SalesforceSim(users={f"fleet{t}@example.com": SF_PASSWORD + SF_TOKEN for t in range(tenants)},
                                clients={CONSUMER_KEY: CONSUMER_SECRET}, long_poll=110.0,
                                max_clients=20 * tenants)  # one simulated org stands for one org per tenant
            for i in range(counts["salesforce"]):
                sim.create_topic(f"Fleet{i}", f"SELECT Id, Name FROM Fleet{i}__c")
        await sim.start()
        conn.send(sim.url if kind != "pusher" else sim.port)
        await serve_counts(conn, sim, "counts", lambda: _counts(kind, sim))

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


class SimProcess:
    def __init__(self, kind: str, counts: dict[str, int], tenants: int):
        self.kind = kind
        self.pipe, child = mp.Pipe()
        self.process = mp.get_context("spawn").Process(target=sim_main, args=(kind, child, counts, tenants),
                                                       daemon=True, name=f"sim-{kind}")

    async def start(self) -> Any:
        self.process.start()
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)

    async def ask(self, cmd: str) -> Any:
        self.pipe.send(cmd)
        return await asyncio.get_running_loop().run_in_executor(None, self.pipe.recv)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ask("stop"), 10)
        self.process.join(3)
        if self.process.is_alive():
            self.process.kill()


# ---------------------------------------------------------------- the daemon's config


def config_text(db: Path, engine_url: str, addresses: dict[str, Any], counts: dict[str, int], tenants: int,
                with_listeners: bool) -> str:
    tenant_ids = [f"t{t}" for t in range(tenants)]
    parts = [f"""
[server]
listen = "127.0.0.1:0"

[[server.tokens]]
name = "ops"
token = "{OPS_TOKEN}"
tenants = [{", ".join(f'"{t}"' for t in tenant_ids)}]

[engine]
url = "{engine_url}"
token = "{ENGINE_TOKEN}"

[store]
path = "{db}"
"""]
    for t in range(tenants):
        parts.append(f"""
[[tenants]]
id = "t{t}"

[tenants.integrations.pusher]
key = "{PUSHER_KEY}"
secret = "{PUSHER_SECRET}"
app-id = "{APP_ID}"
host = "127.0.0.1"
port = {addresses["pusher"]}
tls = false

[tenants.integrations.datasift]
username = "fleet{t}"
api-key = "fleet-ds-key-{t}"
stream-url = "{addresses["datasift"]}"

[tenants.integrations.salesforce]
consumer-key = "{CONSUMER_KEY}"
consumer-secret = "{CONSUMER_SECRET}"
username = "fleet{t}@example.com"
password = "{SF_PASSWORD}"
secret-token = "{SF_TOKEN}"
login-url = "{addresses["salesforce"]}"
""")
        if not with_listeners:
            continue
        for source, prefix, option in (("pusher", "P", "channel"), ("datasift", "D", "hash"),
                                       ("salesforce", "S", "topic")):
            for i in range(t, counts[source], tenants):
                value = {"pusher": f"fleet-{i}", "datasift": f"{i:032x}", "salesforce": f"Fleet{i}"}[source]
                parts.append(f'[[tenants.listeners]]\nid = "{prefix}{i}"\ntype = "{source}"\n'
                             f'options = {{ {option} = "{value}" }}\n')
    return "\n".join(parts)


# ---------------------------------------------------------------- measuring


async def statuses(http: aiohttp.ClientSession, api: str) -> dict[str, int]:
    """How many listeners are in each status, from `/metrics` (one request for the whole fleet)."""
    async with http.get(f"{api}/metrics") as response:
        text = await response.text()
    counts: dict[str, int] = {}
    for labels, value in STATUS_LINE.findall(text):  # per listener (1 or 0) or summed per tenant: add them up
        state = re.search(r'status="([^"]*)"', labels)
        if state and float(value) >= 1.0:
            counts[state.group(1)] = counts.get(state.group(1), 0) + int(float(value))
    return counts


def peak_rss_kb(pid: int) -> int:
    match = re.search(r"^VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


async def run(args: argparse.Namespace) -> dict[str, Any]:
    counts = shares(args.listeners)
    sims = {kind: SimProcess(kind, counts, args.tenants) for kind in SOURCES}
    engine = EngineSim(token=ENGINE_TOKEN, keep=False)
    result: dict[str, Any] = {"counts": counts}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        daemon: DaemonProcess | None = None
        try:
            addresses = {kind: await sim.start() for kind, sim in sims.items()}
            await engine.start()
            text = config_text(workdir / "fleet.db", engine.url, addresses, counts, args.tenants, False)
            daemon = DaemonProcess(workdir, text, name="fleet")
            api = await daemon.start(timeout=60)
            assert daemon.process is not None
            pid = daemon.process.pid
            async with aiohttp.ClientSession() as http:
                await asyncio.sleep(2)  # let start-up garbage settle
                result["rss_before"] = sample(pid).rss_kb
                daemon.config_path.write_text(config_text(workdir / "fleet.db", engine.url, addresses, counts,
                                                          args.tenants, True))
                t0 = time.monotonic()
                daemon.signal(signal.SIGHUP)
                last: dict[str, int] = {}

                async def all_started() -> bool:
                    nonlocal last
                    last = await statuses(http, api)
                    return last.get("started", 0) >= args.listeners

                try:
                    await wait_for(all_started, timeout=args.timeout, interval=0.1, what="every listener started")
                    result["started_in"] = time.monotonic() - t0
                except AssertionError:
                    result["started_in"] = None
                result["statuses"] = last
                await asyncio.sleep(3)
                result["rss_after"] = sample(pid).rss_kb
                result["sims"] = {kind: await sim.ask("counts") for kind, sim in sims.items()}
                cpu0, wall0 = sample(pid).cpu_s, time.monotonic()
                await asyncio.sleep(args.idle)
                result["idle_cpu"] = (sample(pid).cpu_s - cpu0) / (time.monotonic() - wall0) * 100
                result["rss_peak"] = peak_rss_kb(pid)
                result["statuses_after_idle"] = await statuses(http, api)
        finally:
            if daemon is not None:
                await daemon.stop()
            await engine.stop()
            for sim in sims.values():
                await sim.stop()
    return result


def table(args: argparse.Namespace, r: dict[str, Any]) -> str:
    counts, sims = r["counts"], r.get("sims", {})
    started_in = f"{r['started_in']:.2f} s" if r.get("started_in") is not None else \
        f"not all within {args.timeout:g} s ({r['statuses']})"
    pusher, datasift, salesforce = sims.get("pusher", {}), sims.get("datasift", {}), sims.get("salesforce", {})
    lines = [
        f"`.venv/bin/python bench/fleet.py --listeners {args.listeners} --tenants {args.tenants} "
        f"--idle {args.idle:g}`: {counts['pusher']} Pusher, {counts['datasift']} DataSift, "
        f"{counts['salesforce']} Salesforce listeners over {args.tenants} tenants (one integration per source "
        f"each); the simulators in their own processes.",
        "",
        "| listeners | all started in | daemon RSS before / after / peak | idle CPU "
        f"({args.idle:g} s) | Pusher: sockets (accepted) / channels | DataSift: sockets (accepted) / hashes | "
        "Salesforce: logins / Bayeux clients (handshakes) / subscriptions | still started after idle |",
        "|---|---|---|---|---|---|---|---|",
        f"| {args.listeners} | {started_in} | {r['rss_before'] / 1024:.1f} / {r['rss_after'] / 1024:.1f} / "
        f"{r['rss_peak'] / 1024:.1f} MiB | {r['idle_cpu']:.2f} % | "
        f"{pusher.get('connections')} ({pusher.get('connects')}) / {pusher.get('subscriptions')} | "
        f"{datasift.get('connections')} ({datasift.get('connects')}) / {datasift.get('subscriptions')} | "
        f"{salesforce.get('logins')} / {salesforce.get('clients')} ({salesforce.get('handshakes')}) / "
        f"{salesforce.get('subscriptions')} | {r['statuses_after_idle'].get('started', 0)} |",
        "",
        "Targets (issue 13): RSS under 100 MiB for the whole daemon, all started in under 10 s, idle CPU under 1 %.",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", type=int, default=1000)
    parser.add_argument("--tenants", type=int, default=10)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every listener started")
    parser.add_argument("--note", default="", help="a line written above the table (what code was measured)")
    parser.add_argument("--write", action="store_true", help="replace the `## fleet` section of bench/RESULTS.md")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    body = table(args, result)
    print(header(args.note))
    print()
    print(body)
    if args.write:
        write_section("fleet", f"{header(args.note)}\n\n{body}")
    return 0 if result.get("started_in") is not None else 1


if __name__ == "__main__":
    sys.exit(main())
