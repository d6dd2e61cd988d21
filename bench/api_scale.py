"""API at scale: 10,000 listeners over 100 tenants made through the API, one request at a time (issue 16).

    .venv/bin/python bench/api_scale.py [--sizes 100,1000,10000] [--tenants 100] [--probe 200] [--idle 10] [--write]

What runs: the Pusher, DataSift and Salesforce simulators each in its own process (bench/fleet.py's,
one integration per source and tenant, declared in the config), the engine in this process, and the
daemon as a real child process (`python -m listenerd run`). The config declares one listener, `t0/R1`,
for the reload step; every other listener is made with `POST /1.0/tenants/{tid}/listeners`, enabled,
the three sources dealt round-robin and the tenants in turn.

Measured, in one run:
- at each size (100, 1,000, 10,000 listeners), `--probe` of each request against that fleet, one at a
  time, as p50/p99 in ms: create (an enabled listener, which starts), update (a new channel, hash or
  topic: it restarts), retrieve, status, delete, a list page (`limit=100`) and the tenant summary;
- the time to create the whole fleet one request at a time (the probes left out), and from the last
  create until every listener is `started` (the tenant summaries, polled);
- RSS of the daemon with everything started (and its peak), and idle CPU over `--idle` seconds;
- a SIGHUP whose config changes only R1: until the daemon logs `config reloaded`, and what it restarted;
- a restart of the daemon on the same store: from spawn until every listener is `started`;
- a daemon whose config declares the same listeners (a new store): from spawn until all are `started`,
  and `listenerd check` of that config.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp  # noqa: E402

from bench.chaos.rig import header, loadavg, sample, write_section  # noqa: E402
from bench.common import pct  # noqa: E402
from bench.fleet import OPS_TOKEN, SOURCES, SimProcess, config_text, peak_rss_kb  # noqa: E402
from listenerd.sim.engine import EngineSim  # noqa: E402
from listenerd.testing import DaemonProcess, wait_for  # noqa: E402

OPS = ("create", "update", "retrieve", "status", "delete", "list page", "summary")
RELOAD_LISTENER = '[[tenants.listeners]]\nid = "R1"\ntype = "pusher"\noptions = {{ channel = "{}" }}\n'


def option(source: str, i: int, topics: int) -> dict[str, str]:
    """A listener's options: distinct channels and hashes, Salesforce topics the simulator has."""
    return {"pusher": {"channel": f"scale-{i}"}, "datasift": {"hash": f"{i:032x}"},
            "salesforce": {"topic": f"Fleet{i % topics}"}}[source]


def declared(size: int, tenants: int, topics: int) -> dict[str, str]:
    """`[[tenants.listeners]]` tables of `size` listeners, by tenant id: the API fleet, declared instead."""
    tables: dict[str, list[str]] = {}
    for i in range(size):
        source = SOURCES[i % 3]
        ((name, value),) = option(source, i, topics).items()
        tables.setdefault(f"t{i % tenants}", []).append(
            f'[[tenants.listeners]]\nid = "C{i}"\ntype = "{source}"\noptions = {{ {name} = "{value}" }}\n')
    return {tenant: "\n".join(parts) for tenant, parts in tables.items()}


def with_declared(text: str, size: int, tenants: int, topics: int) -> str:
    """`text` (a config of `tenants` tenants) with `size` listeners declared, dealt over its tenants."""
    for tenant, tables in sorted(declared(size, tenants, topics).items(), key=lambda kv: -int(kv[0][1:])):
        head, marker, rest = text.partition(f'[[tenants]]\nid = "{tenant}"\n')
        after = rest.find("[[tenants]]")
        rest = (rest + "\n" + tables) if after < 0 else (rest[:after] + tables + "\n" + rest[after:])
        text = head + marker + rest
    return text


def daemon_config(db: Path, engine_url: str, addresses: dict[str, Any], tenants: int, topics: int,
                  reload_channel: str) -> str:
    """The tenants and their integrations (no listeners: the API makes them), and t0/R1 for the reload."""
    text = config_text(db, engine_url, addresses, {**dict.fromkeys(SOURCES, 0), "salesforce": topics}, tenants,
                       False)
    head, marker, rest = text.partition('[[tenants]]\nid = "t1"\n')
    return head + RELOAD_LISTENER.format(reload_channel) + "\n" + marker + rest


class Client:
    """The API, one request at a time, each timed."""

    def __init__(self, http: aiohttp.ClientSession, api: str):
        self.http = http
        self.api = api
        self.headers = {"Authorization": f"Bearer {OPS_TOKEN}"}
        self.trace: list[dict] | None = None  # every request's start (time.monotonic()) and duration, if kept


    async def call(self, method: str, path: str, body: Any = None, want: int = 200) -> tuple[float, Any]:
        t0, at = time.perf_counter(), time.monotonic()
        async with self.http.request(method, self.api + path, json=body, headers=self.headers) as response:
            text = await response.text()
            elapsed = time.perf_counter() - t0
        if self.trace is not None:
            self.trace.append({"at": at, "ms": elapsed * 1000, "method": method, "path": path})
            if response.status != want:
                raise AssertionError(f"{method} {path}: {response.status} {text[:300]}")
        return elapsed, json.loads(text) if text else None


async def probe(client: Client, tenants: int, topics: int, count: int, serial: itertools.count) -> dict[str, list]:
    """`count` of each request against the fleet as it is; the probe's listeners are deleted again."""
    times: dict[str, list[float]] = {op: [] for op in OPS}
    made: list[tuple[str, str, str]] = []
    for _ in range(count):
        i = next(serial)
        source, tenant = SOURCES[i % 3], f"t{i % tenants}"
        elapsed, body = await client.call("POST", f"/1.0/tenants/{tenant}/listeners",
                                          {"type": source, "options": option(source, i, topics)}, 201)
        times["create"].append(elapsed)
        made.append((tenant, body["id"], source))
    for n, (tenant, lid, source) in enumerate(made):
        path = f"/1.0/tenants/{tenant}/listeners/{lid}"
        times["update"].append((await client.call("PUT", path, {"options": option(source, 10**6 + n, topics)}))[0])
        times["retrieve"].append((await client.call("GET", path))[0])
        times["status"].append((await client.call("GET", path + "/status"))[0])
        times["list page"].append((await client.call("GET", f"/1.0/tenants/{tenant}/listeners?limit=100"))[0])
        times["summary"].append((await client.call("GET", f"/1.0/tenants/{tenant}/listeners/status"))[0])
    for tenant, lid, _ in made:
        times["delete"].append((await client.call("DELETE", f"/1.0/tenants/{tenant}/listeners/{lid}", want=204))[0])
    return times


async def started_counts(client: Client, tenants: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in range(tenants):
        _, summary = await client.call("GET", f"/1.0/tenants/t{t}/listeners/status")
        for state, n in summary["counts"].items():
            counts[state] = counts.get(state, 0) + n
    return counts


async def until_all_started(client: Client, tenants: int, total: int, timeout: float) -> tuple[float | None, dict]:
    t0 = time.monotonic()
    last: dict[str, int] = {}

    async def done() -> bool:
        nonlocal last
        last = await started_counts(client, tenants)
        return last.get("started", 0) >= total

    try:
        await wait_for(done, timeout=timeout, interval=0.5, what="every listener started")
        return time.monotonic() - t0, last
    except AssertionError:
        for t in range(tenants):  # say why, with a few of the listeners not started
            _, summary = await client.call("GET", f"/1.0/tenants/t{t}/listeners/status")
            if summary["not-started"]:
                last["e.g."] = [(f"t{t}/{e['id']}", e["status"], e["message"][:120])
                                for e in summary["not-started"][:3]]
                break
        return None, last


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(s) for s in args.sizes.split(",")]
    topics = max(1, min(sizes[-1] // 3, 2000))
    sims = {kind: SimProcess(kind, {"salesforce": topics}, args.tenants) for kind in SOURCES}
    engine = EngineSim(keep=False)
    result: dict[str, Any] = {"sizes": {}, "load_start": loadavg()}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        workdir = Path(tmp)
        daemon: DaemonProcess | None = None
        try:
            addresses = {kind: await sim.start() for kind, sim in sims.items()}
            await engine.start()
            db = workdir / "scale.db"
            daemon = DaemonProcess(workdir, daemon_config(db, engine.url, addresses, args.tenants, topics, "r-a"),
                                   name="scale")
            api = await daemon.start(timeout=60)
            assert daemon.process is not None
            gc.collect()  # this process's own full collections (~20 ms, loopdiag) are not the daemon's latency
            gc.freeze()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:
                client = Client(http, api)
                if args.trace:
                    client.trace = result["trace"] = []
                serial = itertools.count(sizes[-1] * 10)  # probe listeners' option values, apart from the fleet's
                fleet, fill_seconds = 1, 0.0  # R1 is the first
                for size in sizes:
                    t0 = time.monotonic()
                    while fleet < size:
                        source, tenant = SOURCES[fleet % 3], f"t{fleet % args.tenants}"
                        await client.call("POST", f"/1.0/tenants/{tenant}/listeners",
                                          {"type": source, "options": option(source, fleet, topics)}, 201)
                        fleet += 1
                    fill_seconds += time.monotonic() - t0
                    print(f"  {size} listeners made ({fill_seconds:.1f} s); probing", flush=True)
                    times = await probe(client, args.tenants, topics, args.probe, serial)
                    result["sizes"][size] = {op: (pct(v, 0.5) * 1000, pct(v, 0.99) * 1000) for op, v in times.items()}
                result["fill_seconds"] = fill_seconds
                result["started_after_fill"], result["statuses"] = await until_all_started(
                    client, args.tenants, fleet, args.timeout)
                pid = daemon.process.pid
                await asyncio.sleep(3)
                result["rss"] = sample(pid).rss_kb
                cpu0, wall0 = sample(pid).cpu_s, time.monotonic()
                await asyncio.sleep(args.idle)
                result["idle_cpu"] = (sample(pid).cpu_s - cpu0) / (time.monotonic() - wall0) * 100
                result["rss_peak"] = peak_rss_kb(pid)

                # a reload that changes one listener
                daemon.config_path.write_text(daemon_config(db, engine.url, addresses, args.tenants, topics, "r-b"))
                seen = len(daemon.lines())
                t0 = time.monotonic()
                daemon.signal(signal.SIGHUP)
                reloaded: list[dict] = []

                def logged() -> bool:
                    reloaded[:] = [line for line in daemon.lines()[seen:] if line.get("event") == "config reloaded"]
                    return bool(reloaded)

                await wait_for(logged, timeout=60, interval=0.01, what="config reloaded")
                result["reload_seconds"] = time.monotonic() - t0
                result["reload_changes"] = {k: v for k, v in reloaded[0].items() if k in ("started", "restarted",
                                                                                          "stopped", "removed")}
                result["statuses_after_reload"] = await started_counts(client, args.tenants)

            # a restart on the same store
            assert await daemon.stop() == 0
            t0 = time.monotonic()
            api = await daemon.start(timeout=args.timeout)
            result["api_up_after_restart"] = time.monotonic() - t0
            async with aiohttp.ClientSession() as http:
                client = Client(http, api)
                took, last = await until_all_started(client, args.tenants, fleet, args.timeout)
                result["restart_all_started"] = None if took is None else took + result["api_up_after_restart"]
                result["statuses_after_restart"] = last
                result["rss_after_restart"] = sample(daemon.process.pid).rss_kb
            # the same number of listeners declared in the config, on a new store: from spawn until all started
            assert await daemon.stop() == 0
            declared_text = with_declared(daemon_config(workdir / "declared.db", engine.url, addresses, args.tenants,
                                                        topics, "r-a"), sizes[-1] - 1, args.tenants, topics)
            daemon = DaemonProcess(workdir, declared_text, name="declared")
            t0 = time.monotonic()
            api = await daemon.start(timeout=args.timeout)
            result["declared_api_up"] = time.monotonic() - t0
            async with aiohttp.ClientSession() as http:
                took, last = await until_all_started(Client(http, api), args.tenants, fleet, args.timeout)
                result["declared_all_started"] = None if took is None else took + result["declared_api_up"]
                result["statuses_declared"] = last
                assert daemon.process is not None
                result["rss_declared"] = sample(daemon.process.pid).rss_kb
        finally:
            if daemon is not None:
                await daemon.stop()
            await engine.stop()
            for sim in sims.values():
                await sim.stop()
        check_config = workdir / "check.toml"
        check_config.write_text(declared_text)
        t0 = time.monotonic()
        check = await asyncio.create_subprocess_exec(sys.executable, "-m", "listenerd", "check", "--config",
                                                     str(check_config), stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.DEVNULL)
        result["check_exit"] = await asyncio.wait_for(check.wait(), 300)
        result["check_seconds"] = time.monotonic() - t0
    result["fleet"] = fleet
    result["load_end"] = loadavg()
    return result


def table(args: argparse.Namespace, r: dict[str, Any]) -> str:
    sizes = list(r["sizes"])
    lines = [f"`.venv/bin/python bench/api_scale.py --sizes {args.sizes} --tenants {args.tenants} --probe "
             f"{args.probe} --idle {args.idle:g}`: listeners made through the API one request at a time, the three "
             f"sources in turn over {args.tenants} tenants, over the simulators. Load average at start "
             f"{r['load_start']}, at end {r['load_end']}.", "",
             "p50 / p99 in ms of each request, at each fleet size (`--probe` requests of each, one at a time):", "",
             "| request | " + " | ".join(f"{s:,} listeners" for s in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for op in OPS:
        lines.append(f"| {op} | " + " | ".join(f"{r['sizes'][s][op][0]:.1f} / {r['sizes'][s][op][1]:.1f}"
                                                for s in sizes) + " |")

    def secs(value: float | None) -> str:
        return f"{value:.1f} s" if value is not None else f"not within {args.timeout:g} s"

    lines += ["",
              "| measure | figure | target |", "|---|---|---|",
              f"| create {r['fleet'] - 1:,} listeners, one request at a time (probes left out) | "
              f"{r['fill_seconds']:.1f} s | < 60 s |",
              f"| from the last create until all {r['fleet']:,} `started` | {secs(r['started_after_fill'])} "
              f"({r['statuses']}) | |",
              f"| daemon RSS, all started (peak) | {r['rss'] / 1024:.0f} MiB ({r['rss_peak'] / 1024:.0f} MiB) "
              f"| < 500 MiB |",
              f"| idle CPU over {args.idle:g} s | {r['idle_cpu']:.2f} % of a core | < 2 % |",
              f"| SIGHUP changing one listener: until `config reloaded` | {r['reload_seconds'] * 1000:.0f} ms, "
              f"changes {r['reload_changes']} | < 1 s, only it |",
              f"| restart on the same store: API up / all `started` | {r['api_up_after_restart']:.1f} s / "
              f"{secs(r['restart_all_started'])} ({r['statuses_after_restart']}) | < 60 s |",
              f"| RSS after the restart, all started | {r['rss_after_restart'] / 1024:.0f} MiB | < 500 MiB |",
              f"| start with the {r['fleet']:,} declared in the config (new store): API up / all `started` | "
              f"{r['declared_api_up']:.1f} s / {secs(r['declared_all_started'])} ({r['statuses_declared']}) | "
              f"< 60 s |",
              f"| RSS then, all started | {r['rss_declared'] / 1024:.0f} MiB | < 500 MiB |",
              f"| `listenerd check` of that config | {r['check_seconds']:.2f} s "
              f"(exit {r['check_exit']}) | |"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,1000,10000", help="fleet sizes to probe at, growing")
    parser.add_argument("--tenants", type=int, default=100)
    parser.add_argument("--probe", type=int, default=200, help="requests of each kind at each size")
    parser.add_argument("--idle", type=float, default=10.0, help="seconds of idle CPU measurement")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for every listener started")
    parser.add_argument("--trace", help="write every request of the fill and probes (start, ms) here, as JSON lines")
    parser.add_argument("--note", default="", help="a line written above the table (what code was measured)")
    parser.add_argument("--write", action="store_true", help="replace the `## api scale` section of bench/RESULTS.md")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    if args.trace:
        with open(args.trace, "w") as out:
            out.writelines(json.dumps(entry) + "\n" for entry in result.pop("trace"))
    body = table(args, result)
    print(header(args.note))
    print()
    print(body)
    if args.write:
        write_section("api scale (issue 16)", f"{header(args.note)}\n\n{body}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
