"""Chaos 1, crash loop: `kill -9` the daemon at random moments while three listeners stream to a slow engine.

Why: "at least once from receipt, across kill -9" is the contract's central promise, and only a real
kill of a real process under load tests it. After the last restart the ledger answers: were all
committed events delivered (lost must be 0), were duplicates bounded by what the outbox held at the
kills, and did every duplicate carry the same id.

Honest gap: Pusher and DataSift are live sockets without replay. What they sent while the daemon was
dead, or what sat in socket buffers unread at the kill, was never received and cannot be recovered
by any client; it is counted as `not received`, split into "no subscriber at all" and "in flight".
Salesforce keeps events for replay: there everything published must arrive.

Each restart recovers from the WAL exactly as the kill left it: the outbox is read from a copy of the
store files (`listenerd.testing.store_snapshot`; reading in place would checkpoint and delete the WAL),
and the WAL's size at each kill is reported. Every other restart goes without the `-shm` file (SQLite
rebuilds the WAL index from the WAL), the second WAL case of issue 20.

    .venv/bin/python -m bench.chaos.crash_loop            # short: 3 cycles, 300 events/s
    .venv/bin/python -m bench.chaos.crash_loop --full --write   # 20 cycles, 2,000 events/s; RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.chaos.rig import SOURCES, Rig, header, loadavg, write_section  # noqa: E402
from listenerd.testing import wait_for  # noqa: E402


async def run(workdir: Path, cycles: int = 3, rate: float = 300.0, engine_delay: float = 0.05,
              up: tuple[float, float] = (0.3, 1.5), down: tuple[float, float] = (0.0, 0.5),
              seed: int | None = None, say: Any = print) -> dict[str, Any]:
    rnd = random.Random(seed)
    rig = Rig(workdir, engine_delay=engine_delay)
    kills: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        await rig.begin(rate)
        for cycle in range(cycles):
            before = rig.ledger.deliveries
            # the kill comes after the restarted daemon has delivered something, then at a random moment
            await wait_for(lambda b=before: rig.ledger.deliveries > b, timeout=60, what="deliveries before a kill")
            await asyncio.sleep(rnd.uniform(*up))
            durable = rig.kill9()
            shm_removed = cycle % 2 == 1 and rig.remove_shm()
            kills.append({"cycle": cycle + 1, "durable_at_kill": durable, "wal_at_kill": rig.wal_at_kills[-1],
                          "shm_removed": shm_removed,
                          "delivered_so_far": rig.ledger.deliveries,
                          "published_so_far": rig.published_total(), "load": loadavg()})
            say(f"kill {cycle + 1}/{cycles}: {durable} events durable in the outbox, WAL {rig.wal_at_kills[-1]:,} "
                f"bytes, {rig.ledger.deliveries} deliveries so far, load {loadavg()}")
            await asyncio.sleep(rnd.uniform(*down))  # dead time: sockets publish to nobody
            await rig.start_daemon()
            await rig.wait_all_started()
            rig.mark_live()
        await asyncio.sleep(rnd.uniform(*up))
        await rig.stop_pump()
        rig.engine.ack_delay = 0.0
        drain = await rig.wait_delivered(timeout=180)
        await rig.stop()  # SIGTERM: must exit 0
        final_outbox = rig.ledger.remember_outbox(rig.db_path)
        hits = rig.secret_hits()
    finally:
        await rig.stop()
    reports = {s: rig.ledger.report(s) for s in SOURCES}
    elapsed = time.monotonic() - began
    result = {"cycles": cycles, "rate": rate, "engine_delay": engine_delay, "kills": kills, "reports": reports,
              "drain_s": drain, "final_outbox": final_outbox, "secret_hits": sum(hits.values()),
              "elapsed_s": elapsed, "achieved_rate": rig.published_total() / elapsed,
              "durable_at_kills": sum(k["durable_at_kill"] for k in kills)}
    check(result)
    return result


def check(result: dict[str, Any]) -> None:
    """The invariants; raise on any breach."""
    reports = result["reports"]
    for source, r in reports.items():
        assert r["lost_committed"] == 0, f"{source}: {r['lost_committed']} committed events lost"
        assert r["mixed_ids"] == 0, f"{source}: {r['mixed_ids']} events delivered under two ids"
        assert r["invented"] == 0, f"{source}: events delivered that were never published"
    assert reports["salesforce"]["not_received"] == 0, "Salesforce replays: nothing published may be missing"
    duplicates = sum(r["duplicates"] for r in reports.values())
    assert duplicates <= result["durable_at_kills"], "more duplicates than events in flight at the kills"
    assert result["secret_hits"] == 0, "a secret value appeared in a log or an answer"


def table(result: dict[str, Any]) -> str:
    rows = ["| source | published | delivered (unique) | lost (committed) | duplicates | ids per duplicate "
            "| not received: no subscriber | not received: in flight at a kill |", "|---|---|---|---|---|---|---|---|"]
    for source, r in result["reports"].items():
        in_flight = r["not_received"] - r["not_received_no_subscriber"]
        rows.append(f"| {source} | {r['published']:,} | {r['delivered_unique']:,} | {r['lost_committed']} | "
                    f"{r['duplicates']:,} | {'1' if not r['mixed_ids'] else 'MIXED'} | "
                    f"{r['not_received_no_subscriber']:,} | {in_flight:,} |")
    return "\n".join(rows)


def summary(result: dict[str, Any]) -> str:
    kills = result["kills"]
    durable = [k["durable_at_kill"] for k in kills]
    wal = [k["wal_at_kill"] for k in kills]
    return (f"{result['cycles']} kill -9 cycles in {result['elapsed_s']:.0f} s, target {result['rate']:.0f} events/s "
            f"(achieved {result['achieved_rate']:.0f}/s published), engine answers "
            f"{result['engine_delay'] * 1000:.0f} ms after accepting each batch. Outbox on disk at the kills: "
            f"min {min(durable)}, max {max(durable)}, total "
            f"{sum(durable):,} events (the duplicate bound); WAL left by the kills (each restart recovered from it): "
            f"{min(wal):,} to {max(wal):,} bytes; {sum(k['shm_removed'] for k in kills)} restarts without the -shm "
            f"file. Drain after the last restart: {result['drain_s']:.1f} s; "
            f"outbox after SIGTERM: {result['final_outbox']} rows; secrets found in logs and answers: "
            f"{result['secret_hits']}.\n\n{table(result)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="20 cycles at 2,000 events/s, 200 ms engine")
    parser.add_argument("--cycles", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--engine-delay", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--write", action="store_true", help="replace the `## Chaos: crash loop` section of RESULTS.md")
    args = parser.parse_args()
    cycles = args.cycles or (20 if args.full else 3)
    rate = args.rate or (2000.0 if args.full else 300.0)
    delay = args.engine_delay if args.engine_delay is not None else (0.2 if args.full else 0.05)
    up = (1.0, 6.0) if args.full else (0.3, 1.5)
    start_load = loadavg()
    with tempfile.TemporaryDirectory(prefix="chaos-crash-") as tmp:
        result = asyncio.run(run(Path(tmp), cycles, rate, delay, up=up, down=(0.0, 2.0), seed=args.seed))
    text = summary(result)
    print(text)
    if args.write:
        write_section("Chaos: crash loop", f"`.venv/bin/python -m bench.chaos.crash_loop "
                      f"{'--full' if args.full else ''} --cycles {cycles} --rate {rate:.0f}`\n\n"
                      f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text}\n\n"
                      "Pusher and DataSift are live sockets without replay: events they sent while the daemon was dead "
                      "had no subscriber, and events in socket buffers at the kill were never read; no client can "
                      "recover either, so they are counted apart, never as loss of committed events. Salesforce "
                      "replays from the committed replayId, so everything published arrived.")


if __name__ == "__main__":
    main()
