"""Salesforce listeners sharing one login and one CometD client per integration, against simulated orgs.

    .venv/bin/python bench/salesforce_shared.py [--write]

Three scenarios, each with the real Salesforce source under the real supervisor and the durable
SQLite outbox, and `SalesforceSim` orgs that enforce Salesforce's limits (20 concurrent CometD clients
per org, as a Developer or Professional edition; 3,600 logins per user per hour):

1. 30 listeners of one tenant on one Developer org: all `started`, with how many logins and clients.
2. 300 listeners across 10 orgs (10 tenants, one integration each, 30 PushTopics per org): logins,
   clients, and the time from the supervisor's start to every listener `started`.
3. 1,000 listeners of one org, then every session expires (the org revokes the token): how many new
   logins, and the time until the new client carries all 1,000 channels again and every listener is
   `started` (an event published afterwards on the last topic reaches its listener).

The simulators run in this process (their counters are read directly); times include their work.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import cpu_model  # noqa: E402
from listenerd.delivery.outbox import Outbox  # noqa: E402
from listenerd.model import Config  # noqa: E402
from listenerd.observability import Metrics, configure_logging  # noqa: E402
from listenerd.sim.salesforce import SalesforceSim  # noqa: E402
from listenerd.store import Store  # noqa: E402
from listenerd.supervisor import Desired, Supervisor  # noqa: E402
from listenerd.testing import integration, listener, wait_for  # noqa: E402

USER, PASSWORD, KEY, SECRET = "bench@example.com", "benchpassTOKEN", "bench-key", "bench-secret"


async def org(topics: int, prefix: str) -> SalesforceSim:
    sim = SalesforceSim(users={USER: PASSWORD}, clients={KEY: SECRET}, long_poll=30.0, max_clients=20,
                        org_id=f"00D{prefix}000000SimAAA"[:18])
    for i in range(topics):
        sim.create_topic(f"{prefix}{i:04d}", "SELECT Id, Name FROM Invoice__c")
    return await sim.start()


def wanted(sim: SalesforceSim, tenant: str, prefix: str, count: int) -> dict[tuple[str, str], Desired]:
    creds = integration("salesforce", **{"consumer-key": KEY, "consumer-secret": SECRET, "username": USER,
                                         "password": PASSWORD, "login-url": sim.url})
    return {(tenant, f"L{prefix}{i:04d}"): Desired(listener(id=f"L{prefix}{i:04d}", type="salesforce",
                                                            options={"topic": f"{prefix}{i:04d}", "replay": "new"},
                                                            mapping={"name": "Name"}), creds)
            for i in range(count)}


class Daemon:
    """Store, outbox and supervisor, as the daemon wires them (no engine: events stay in the outbox)."""

    async def __aenter__(self) -> Daemon:
        workdir = tempfile.mkdtemp(prefix="sf-shared-bench-")
        self.config = Config.model_validate({"store": {"path": os.path.join(workdir, "bench.db")}})
        self.store = Store(self.config.store.path, self.config.store.synchronous)
        await self.store.open()
        metrics = Metrics()
        self.outbox = Outbox(self.store, max_events=1_000_000, max_bytes=1 << 30, metrics=metrics)
        await self.outbox.start()
        self.supervisor = Supervisor(self.config, self.outbox, metrics)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.supervisor.stop()
        await self.outbox.close()
        await self.store.close()

    def all_started(self, keys: Any) -> bool:
        return all((r := self.supervisor.status(k)) is not None and r.status == "started" for k in keys)

    async def start(self, desired: dict[tuple[str, str], Desired], timeout: float) -> float:
        began = time.monotonic()
        await self.supervisor.start(desired)
        await wait_for(lambda: self.all_started(desired), timeout=timeout, interval=0.05,
                       what=f"{len(desired)} listeners started")
        return time.monotonic() - began


async def one_developer_org(count: int) -> dict[str, Any]:
    sim = await org(count, "D")
    try:
        async with Daemon() as daemon:
            desired = wanted(sim, "t", "D", count)
            seconds = await daemon.start(desired, 120)
            return {"listeners": count, "org_client_limit": sim.max_clients, "started": len(desired),
                    "logins": sim.logins, "clients": sim.live_clients, "seconds_to_started": seconds}
    finally:
        await sim.stop()


async def ten_orgs(orgs: int, per_org: int) -> dict[str, Any]:
    sims = [await org(per_org, f"O{n}x") for n in range(orgs)]
    try:
        async with Daemon() as daemon:
            desired: dict[tuple[str, str], Desired] = {}
            for n, sim in enumerate(sims):
                desired.update(wanted(sim, f"t{n}", f"O{n}x", per_org))
            seconds = await daemon.start(desired, 300)
            return {"listeners": len(desired), "orgs": orgs, "logins": sum(s.logins for s in sims),
                    "clients": sum(s.live_clients for s in sims), "seconds_to_started": seconds}
    finally:
        for sim in sims:
            await sim.stop()


async def expiry(count: int) -> dict[str, Any]:
    sim = await org(count, "E")
    try:
        async with Daemon() as daemon:
            desired = wanted(sim, "t", "E", count)
            seconds = await daemon.start(desired, 600)
            logins_before, handshakes_before = sim.logins, sim.handshakes
            began = time.monotonic()
            sim.expire_sessions()
            await wait_for(lambda: sim.handshakes > handshakes_before
                           and sum(len(c.subscriptions) for c in sim.bayeux.values()) == count
                           and daemon.all_started(desired), timeout=300, interval=0.02,
                           what="every channel on a new client")
            again = time.monotonic() - began
            last = (next(iter(desired))[0], f"LE{count - 1:04d}")
            sim.publish(f"E{count - 1:04d}", {"Id": "x", "Name": "after"})
            await wait_for(lambda: daemon.supervisor.status(last).received == 1, timeout=60, what="event after")
            return {"listeners": count, "seconds_to_started": seconds, "logins_before": logins_before,
                    "new_logins": sim.logins - logins_before, "clients": sim.live_clients,
                    "seconds_to_all_resubscribed": again,
                    "retries": sum(daemon.supervisor.status(k).attempts for k in desired)}
    finally:
        await sim.stop()


def machine() -> str:
    return f"{os.cpu_count()} cores ({cpu_model()}), Python {platform.python_version()}"


def report(result: dict[str, Any]) -> str:
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    one, ten, exp = result["developer_org"], result["ten_orgs"], result["expiry"]
    rows = [
        f"| {one['listeners']} listeners, one tenant, one Developer org (limit {one['org_client_limit']} clients) "
        f"| {one['started']} `started` in {one['seconds_to_started']:.2f} s; "
        f"**{one['logins']} login, {one['clients']} client** |",
        f"| {ten['listeners']} listeners across {ten['orgs']} orgs (a tenant and integration each) "
        f"| all `started` in {ten['seconds_to_started']:.2f} s; **{ten['logins']} logins, {ten['clients']} clients** |",
        f"| {exp['listeners']} listeners of one org (started in {exp['seconds_to_started']:.2f} s), then every "
        f"session expires | **{exp['new_logins']} new login**; all {exp['listeners']} channels on a new client and "
        f"`started` again after {exp['seconds_to_all_resubscribed']:.2f} s; {exp['retries']} listener retries; "
        f"{exp['clients']} client |",
    ]
    table = "\n".join(rows)
    return f"""
## salesforce shared client

`.venv/bin/python bench/salesforce_shared.py` on {machine()}, {date} (the machine is shared with other
builds; the simulators run in the benchmark's process, so times include their work).
Each org is a `SalesforceSim` that refuses a 21st concurrent CometD client, as a Developer org does.

| scenario | result |
|---|---|
{table}
"""


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    return {"developer_org": await one_developer_org(30), "ten_orgs": await ten_orgs(10, 30),
            "expiry": await expiry(args.expiry_listeners)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expiry-listeners", type=int, default=1000)
    parser.add_argument("--write", action="store_true", help="append the section to bench/RESULTS.md")
    args = parser.parse_args()
    configure_logging("console", "warning")
    result = asyncio.run(bench(args))
    text = report(result)
    print(result)
    print(text)
    if args.write:
        with open(Path(__file__).parent / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
