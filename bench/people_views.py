"""What the people's views cost: the status record's rate ring on the hot path, and one `listenerd status`.

`.venv/bin/python bench/people_views.py [--listeners 300]`:
1. `ListenerStatus.committed()` per call (every committed batch of a listener pays it; the rate ring
   added a bucket update) and `as_json()` per call (every status route answer; now with `rate` and
   `history`);
2. one `listenerd status` snapshot against an in-process daemon whose listeners share one Pusher
   simulator connection, over a kept-alive connection: as it runs by default (GET /1.0/tenants, the
   tenant summary, a page of started listeners, a status GET for each of the 100 rows shown) and with
   `--all` (every listener, a page of 1,000 at a time, one status GET each), with the requests each made;
   and the table's rendering.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import platform
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import cpu_model  # noqa: E402
from listenerd import config as config_module  # noqa: E402
from listenerd import status_cli  # noqa: E402
from listenerd.daemon import Daemon  # noqa: E402
from listenerd.sim.engine import EngineSim  # noqa: E402
from listenerd.sim.pusher import PusherSim  # noqa: E402
from listenerd.status import ListenerStatus  # noqa: E402
from listenerd.systemd import Notifier  # noqa: E402
from listenerd.testing import wait_for  # noqa: E402

TOKEN = "bench-token-0123456789"


def per_call(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def record_costs() -> tuple[float, float]:
    record = ListenerStatus("t", "L1")
    record.set("started", "Subscribed to channel: bench")
    for n in range(25):
        record.set("retrying" if n % 2 else "started", f"change {n}")
    committed = per_call(lambda: record.committed(1), 1_000_000)
    as_json = per_call(record.as_json, 100_000)
    return committed, as_json


class CountingClient(status_cli.Client):
    """The CLI's client, counting its GETs."""

    requests = 0

    def get(self, path):
        self.requests += 1
        return super().get(path)


def best_take(client: CountingClient, rows: int | None) -> tuple[float, int, status_cli.Snapshot]:
    best = float("inf")
    for _ in range(3):
        client.requests = 0
        started = time.perf_counter()
        snapshot = status_cli.take(client, None, rows)
        best = min(best, time.perf_counter() - started)
    return best, client.requests, snapshot


async def snapshot_cost(listeners: int, directory: Path) -> dict[str, tuple[float, int, int]]:
    async with EngineSim() as engine, PusherSim("1", "k", "s") as pusher:
        config = config_module.validate({
            "server": {"listen": "127.0.0.1:0", "tokens": [{"name": "ops", "token": TOKEN}]},
            "engine": {"url": engine.url}, "store": {"path": str(directory / "listenerd.db")},
            "tenants": [{"id": "bench", "integrations": {"pusher": {
                "key": "k", "secret": "s", "app-id": "1", "host": "127.0.0.1", "port": pusher.port, "tls": False}},
                "listeners": [{"id": f"L{n}", "type": "pusher", "options": {"channel": f"c{n}"}}
                              for n in range(listeners)]}]})
        daemon = Daemon(config, None, notifier=Notifier(None))
        await daemon.start()
        try:
            await wait_for(lambda: all(r.status == "started" for r in daemon.supervisor.records.values()),
                           timeout=60, what="every listener started")
            client = CountingClient(status_cli.Target(daemon.api_url, TOKEN))
            found = {}
            for name, rows in (("default", status_cli.DEFAULT_ROWS), ("--all", None)):
                took, requests, snapshot = await asyncio.to_thread(best_take, client, rows)
                assert snapshot.exit_code == status_cli.EXIT_OK
                assert len(snapshot.rows) == (listeners if rows is None else min(rows, listeners))
                render = float("inf")
                for _ in range(3):
                    started = time.perf_counter()
                    Console(file=io.StringIO(), width=120).print(status_cli.view(snapshot))
                    render = min(render, time.perf_counter() - started)
                found[name] = (took, requests, len(snapshot.rows), render)
            client.close()
            return found
        finally:
            await daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", type=int, default=300)
    args = parser.parse_args()
    committed, as_json = record_costs()
    with tempfile.TemporaryDirectory() as directory:
        found = asyncio.run(snapshot_cost(args.listeners, Path(directory)))
    print(f"machine: {cpu_model()}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| measure | result |\n|---|---|")
    print(f"| `ListenerStatus.committed()` (rate ring included) | {committed * 1e9:.0f} ns per call |")
    print(f"| `ListenerStatus.as_json()` (with `rate` and a full `history`) | {as_json * 1e6:.1f} µs per call |")
    for name, (take, requests, rows, render) in found.items():
        print(f"| `listenerd status` ({name}) snapshot of {args.listeners} listeners: {rows} rows, {requests} GETs "
              f"kept alive (best of 3) | {take * 1e3:.0f} ms |")
        print(f"| rendering its table ({rows} rows, 120 columns; best of 3) | {render * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
