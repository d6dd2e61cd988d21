"""What the people's views cost: the status record's rate ring on the hot path, and one `listenerd status`.

`.venv/bin/python bench/people_views.py [--listeners 300]`:
1. `ListenerStatus.committed()` per call (every committed batch of a listener pays it; the rate ring
   added a bucket update) and `as_json()` per call (every status route answer; now with `rate` and
   `history`);
2. one `listenerd status` snapshot (GET /1.0/tenants, the listener list, one status GET per
   listener over a kept-alive connection) against an in-process daemon whose listeners share one
   Pusher simulator connection, and the table's rendering.
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


async def snapshot_cost(listeners: int, directory: Path) -> tuple[float, float, float]:
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
            client = status_cli.Client(status_cli.Target(daemon.api_url, TOKEN))
            best_take = best_render = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                snapshot = await asyncio.to_thread(status_cli.take, client, None)
                best_take = min(best_take, time.perf_counter() - started)
                started = time.perf_counter()
                Console(file=io.StringIO(), width=120).print(status_cli.view(snapshot))
                best_render = min(best_render, time.perf_counter() - started)
            client.close()
            assert len(snapshot.rows) == listeners and snapshot.exit_code == status_cli.EXIT_OK
            return best_take, best_render, len(snapshot.rows)
        finally:
            await daemon.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listeners", type=int, default=300)
    args = parser.parse_args()
    committed, as_json = record_costs()
    with tempfile.TemporaryDirectory() as directory:
        take, render, rows = asyncio.run(snapshot_cost(args.listeners, Path(directory)))
    print(f"machine: {cpu_model()}, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| measure | result |\n|---|---|")
    print(f"| `ListenerStatus.committed()` (rate ring included) | {committed * 1e9:.0f} ns per call |")
    print(f"| `ListenerStatus.as_json()` (with `rate` and a full `history`) | {as_json * 1e6:.1f} µs per call |")
    print(f"| `listenerd status` snapshot, {rows} listeners (1 + 1 + {rows} GETs, kept alive; best of 3) "
          f"| {take * 1e3:.0f} ms |")
    print(f"| rendering its table (120 columns; best of 3) | {render * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
