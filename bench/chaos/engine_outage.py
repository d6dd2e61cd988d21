"""Chaos 2, engine outage: the engine refuses connections for a long time while events keep coming.

Why: the outbox exists for exactly this. During the outage nothing may be lost or dropped, the daemon's
memory must not grow with the backlog (the backlog lives on disk, not in RAM), the outbox depth must
be visible in metrics, and after recovery the backlog must drain, in order, at a useful speed.

The engine's listening socket is closed (`EngineSim.refuse()`): every delivery attempt is a network
error, retried with capped back-off. Publishing continues at the target rate through the outage and
stops at recovery, so the drain time is the time to empty the backlog alone.

    .venv/bin/python -m bench.chaos.engine_outage                   # short: 10 s at 300 events/s
    .venv/bin/python -m bench.chaos.engine_outage --full --write    # 10 minutes at 1,000 events/s
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.chaos.rig import SOURCES, Rig, header, loadavg, sample, slope, write_section  # noqa: E402
from listenerd.testing import wait_for  # noqa: E402


async def run(workdir: Path, outage: float = 10.0, rate: float = 300.0, every: float = 1.0,
              say: Any = print) -> dict[str, Any]:
    rig = Rig(workdir, engine_toml="")
    series: list[dict[str, float]] = []
    try:
        await rig.begin(rate)
        await wait_for(lambda: rig.ledger.deliveries >= 50, timeout=30, what="deliveries before the outage")
        before = sample(rig.pid)
        await rig.engine.refuse()
        began = time.monotonic()
        delivered_at_outage = rig.ledger.deliveries
        while (elapsed := time.monotonic() - began) < outage:
            s = sample(rig.pid)
            depth = await rig.outbox_depth()
            series.append({"t": elapsed, "rss_kb": s.rss_kb, "depth": depth, "fds": s.fds, "cpu_s": s.cpu_s})
            if len(series) % max(1, int(30 / every)) == 0:
                say(f"outage {elapsed:.0f}/{outage:.0f} s: outbox {depth:,.0f} events, rss {s.rss_kb / 1024:.1f} MiB, "
                    f"load {loadavg()}")
            await asyncio.sleep(every)
        await rig.stop_pump()
        published_in_outage = rig.published_total()
        depth_at_recovery = await rig.outbox_depth()
        peak = sample(rig.pid)
        leaked = rig.ledger.deliveries - delivered_at_outage  # must be 0: the engine was down
        await rig.engine.accept()
        recovered = time.monotonic()
        await rig.wait_delivered(timeout=max(120.0, outage * 2))
        drain = time.monotonic() - recovered

        async def empty() -> bool:
            return await rig.outbox_depth() == 0

        await wait_for(empty, timeout=30, interval=0.1, what="outbox depth metric back to 0")
        after = sample(rig.pid)
        errors = await rig.errors_by_kind()
        await rig.stop()
        hits = rig.secret_hits()
    finally:
        await rig.stop()
    reports = {s: rig.ledger.report(s) for s in SOURCES}
    result = {"outage_s": outage, "rate": rate, "before": before, "peak": peak, "after": after,
              "depth_at_recovery": depth_at_recovery, "drain_s": drain, "series": series, "reports": reports,
              "published": published_in_outage, "leaked": leaked, "errors": errors,
              "rss_slope_kb_per_min": slope([(p["t"], p["rss_kb"]) for p in series]) * 60,
              "secret_hits": sum(hits.values())}
    check(result)
    return result


def check(result: dict[str, Any]) -> None:
    assert result["leaked"] == 0, "the engine accepted events while it was down?"
    for source, r in result["reports"].items():
        assert r["lost_committed"] == 0 and r["mixed_ids"] == 0 and r["invented"] == 0, (source, r)
        # the daemon never died: every event published to a subscribed socket must arrive
        assert r["not_received"] - r["not_received_no_subscriber"] == 0, (source, r)
        assert r["not_received_no_subscriber"] == 0, (source, r)
    assert result["depth_at_recovery"] > 0, "no backlog: the outage was not an outage"
    assert result["secret_hits"] == 0


def summary(result: dict[str, Any]) -> str:
    b, p, a = result["before"], result["peak"], result["after"]
    backlog = result["depth_at_recovery"]
    lines = [
        f"Engine down (connections refused) for {result['outage_s']:.0f} s at a target {result['rate']:.0f} events/s "
        f"({result['published']:,} events published in the run).", "",
        "| | value |", "|---|---|",
        f"| outbox depth at recovery | {backlog:,.0f} events |",
        f"| time to drain after recovery | {result['drain_s']:.1f} s ({backlog / max(result['drain_s'], 1e-9):,.0f} "
        f"events/s) |",
        f"| daemon RSS before / at recovery / after drain | {b.rss_kb / 1024:.1f} / {p.rss_kb / 1024:.1f} / "
        f"{a.rss_kb / 1024:.1f} MiB |",
        f"| RSS trend during the outage | {result['rss_slope_kb_per_min']:+.0f} kB per minute |",
        f"| open fds before / at recovery / after | {b.fds} / {p.fds} / {a.fds} |",
        f"| events lost | {sum(r['lost_committed'] + r['not_received'] for r in result['reports'].values())} |",
        f"| duplicates | {sum(r['duplicates'] for r in result['reports'].values())} |",
        f"| secrets found in logs and answers | {result['secret_hits']} |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="600 s at 1,000 events/s")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    outage = args.seconds or (600.0 if args.full else 10.0)
    rate = args.rate or (1000.0 if args.full else 300.0)
    start_load = loadavg()
    with tempfile.TemporaryDirectory(prefix="chaos-outage-") as tmp:
        result = asyncio.run(run(Path(tmp), outage, rate, every=max(1.0, outage / 300)))
    text = summary(result)
    print(text)
    if args.write:
        note = "" if outage >= 600 else \
            f" SHORTENED: the outage ran {outage:.0f} s, not the 600 s of the full scenario."
        write_section("Chaos: engine outage", f"`.venv/bin/python -m bench.chaos.engine_outage --seconds {outage:.0f} "
                      f"--rate {rate:.0f}`\n\n{header(f'Load at start {start_load}, at end {loadavg()}.{note}')}\n\n"
                      f"{text}")


if __name__ == "__main__":
    main()
