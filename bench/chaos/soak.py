"""Chaos 5, soak: 1,000 listeners across the three sources for a long time at a low rate.

Why: leaks and slow drifts (a per-event allocation never freed, a timer per frame, a growing dict of
sessions) do not show in minutes-long tests. The daemon's RSS and CPU are sampled from /proc for the
whole run and plotted to a PNG kept with the results; the RSS trend over the second half is given as a
number, so "no growth" is a figure, not an impression of a picture.

Listeners: 400 Pusher (a socket each), 300 DataSift (one shared socket, a hash each), 300 Salesforce
(a session and a long poll each). All must be `started` at the start and at the end, and every event
published to a subscribed socket must reach the engine.

    .venv/bin/python -m bench.chaos.soak                        # quick look: 150 listeners, 1 minute
    .venv/bin/python -m bench.chaos.soak --full --write         # 30 minutes; RESULTS.md and soak.png
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

PNG = Path(__file__).with_name("soak.png")


async def run(workdir: Path, minutes: float = 2.0, counts: dict[str, int] | None = None, rate: float = 50.0,
              every: float = 5.0, say: Any = print) -> dict[str, Any]:
    counts = counts or {"pusher": 400, "datasift": 300, "salesforce": 300}
    rig = Rig(workdir, counts, long_poll=20.0)
    series: list[dict[str, float]] = []
    try:
        await rig.start()
        t0 = time.monotonic()
        await rig.start_daemon(timeout=120)
        startup = await rig.wait_all_started(timeout=600)
        started_in = time.monotonic() - t0
        rig.mark_live()
        await rig.prime(timeout=300)
        say(f"{sum(counts.values())} listeners started in {started_in:.0f} s; load {loadavg()}")
        rig.start_pump(rate)
        began = time.monotonic()
        last = sample(rig.pid)
        while (elapsed := time.monotonic() - began) < minutes * 60:
            await asyncio.sleep(every)
            s = sample(rig.pid)
            cpu = 100.0 * (s.cpu_s - last.cpu_s) / max(s.at - last.at, 1e-9)
            series.append({"t": time.monotonic() - began, "rss_mib": s.rss_kb / 1024, "cpu_pct": cpu, "fds": s.fds,
                           "threads": s.threads, "load1": float(loadavg().split()[0])})
            last = s
            if len(series) % max(1, int(60 / every)) == 0:
                say(f"{elapsed / 60:.1f}/{minutes:.0f} min: rss {s.rss_kb / 1024:.1f} MiB, cpu {cpu:.1f} %, "
                    f"fds {s.fds}, load {loadavg()}")
        await rig.stop_pump()
        await rig.wait_delivered(timeout=120)
        await rig.wait_all_started(timeout=120)
        await rig.stop()
        hits = rig.secret_hits()
    finally:
        await rig.stop()
    half = [(p["t"] / 60, p["rss_mib"] * 1024) for p in series if p["t"] >= series[-1]["t"] / 2]
    result = {"minutes": minutes, "counts": counts, "rate": rate, "series": series, "startup_s": startup,
              "rss_slope_kb_per_min": slope(half), "reports": {s: rig.ledger.report(s) for s in SOURCES},
              "secret_hits": sum(hits.values())}
    check(result)
    return result


def check(result: dict[str, Any]) -> None:
    for source, r in result["reports"].items():
        assert r["lost_committed"] == 0 and r["mixed_ids"] == 0, (source, r)
        assert r["not_received"] - r["not_received_no_subscriber"] == 0, (source, r)
    assert result["secret_hits"] == 0


def plot(result: dict[str, Any], path: Path = PNG) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = result["series"]
    minutes = [p["t"] / 60 for p in series]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(minutes, [p["rss_mib"] for p in series], color="tab:blue")
    top.set_ylabel("daemon RSS (MiB)")
    top.set_ylim(0, max(p["rss_mib"] for p in series) * 1.15)
    top.grid(alpha=0.3)
    bottom.plot(minutes, [p["cpu_pct"] for p in series], color="tab:red", label="daemon CPU (% of one core)")
    bottom.plot(minutes, [p["load1"] * 100 / 2 for p in series], color="tab:gray", alpha=0.5,
                label="machine load (1-min average, % of 2 cores)")
    bottom.set_ylabel("%")
    bottom.set_xlabel("minutes")
    bottom.set_ylim(bottom=0)
    bottom.grid(alpha=0.3)
    bottom.legend(loc="upper right", fontsize=8)
    total = sum(result["counts"].values())
    fig.suptitle(f"listenerd soak: {total} listeners, {result['rate']:.0f} events/s, {result['minutes']:.0f} min")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def summary(result: dict[str, Any]) -> str:
    series = result["series"]
    rss = [p["rss_mib"] for p in series]
    cpu = [p["cpu_pct"] for p in series]
    fds = [p["fds"] for p in series]
    counts = result["counts"]
    reports = result["reports"]
    return (f"{sum(counts.values())} listeners ({', '.join(f'{v} {k}' for k, v in counts.items())}) for "
            f"{result['minutes']:g} minutes at {result['rate']:.0f} events/s in total. All `started` "
            f"{result['startup_s']:.0f} s after launch, and again at the end.\n\n"
            "| | first sample | last sample | min | max |\n|---|---|---|---|---|\n"
            f"| RSS (MiB) | {rss[0]:.1f} | {rss[-1]:.1f} | {min(rss):.1f} | {max(rss):.1f} |\n"
            f"| CPU (% of one core) | {cpu[0]:.1f} | {cpu[-1]:.1f} | {min(cpu):.1f} | {max(cpu):.1f} |\n"
            f"| open fds | {fds[0]} | {fds[-1]} | {min(fds)} | {max(fds)} |\n\n"
            f"RSS trend over the second half: {result['rss_slope_kb_per_min']:+.0f} kB per minute. "
            f"Events: {sum(r['published'] for r in reports.values()):,} published, "
            f"{sum(r['delivered_unique'] for r in reports.values()):,} delivered, "
            f"{sum(r['lost_committed'] + r['not_received'] for r in reports.values())} lost. Secrets found in logs "
            f"and answers: {result['secret_hits']}.\n\n![soak: RSS and CPU over time](chaos/soak.png)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="30 minutes")
    parser.add_argument("--minutes", type=float)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--listeners", type=int, help="total, split 40/30/30 (default 1,000 with --full, else 150)")
    parser.add_argument("--write", action="store_true", help="RESULTS.md section and bench/chaos/soak.png")
    args = parser.parse_args()
    minutes = args.minutes or (30.0 if args.full else 1.0)
    total = args.listeners or (1000 if args.full or args.minutes else 150)
    counts = {"pusher": total * 4 // 10, "datasift": total * 3 // 10}
    counts["salesforce"] = total - sum(counts.values())
    start_load = loadavg()
    with tempfile.TemporaryDirectory(prefix="chaos-soak-") as tmp:
        result = asyncio.run(run(Path(tmp), minutes, counts, rate=args.rate, every=10.0 if minutes >= 10 else 2.0))
    text = summary(result)
    print(text)
    if args.write:
        plot(result)
        note = "" if minutes >= 30 else f" SHORTENED: ran {minutes:.0f} minutes, not the 30 of the full scenario."
        write_section("Chaos: soak", f"`.venv/bin/python -m bench.chaos.soak --minutes {minutes:.0f}`\n\n"
                      f"{header(f'Load at start {start_load}, at end {loadavg()}.{note}')}\n\n{text}")
    else:
        print(f"plot: {plot(result, Path(tempfile.gettempdir()) / 'listenerd-soak.png')}")


if __name__ == "__main__":
    main()
