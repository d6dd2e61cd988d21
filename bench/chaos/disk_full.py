"""Chaos 7, disk full: the store's filesystem fills while Pusher streams in, stays full, then frees up.

Why: a full disk is the one fault where the outbox itself cannot do its job, and issue 20's probe
found the daemon around it misbehaving: with the engine accepting, every ack failed and the head batch
was re-sent in a tight loop (millions of duplicates, a traceback per failure); with the engine down,
commits failed silently (status `started`, `/readyz` 200) while events piled up in memory. Here
every one of those is measured, so a fix shows as numbers and a regression as a changed line.

The store lives on its own small tmpfs (`listenerd.testing.Tmpfs`, root only); the daemon's log stays
on the work directory's disk. After the daemon is streaming, the engine holds its answers until the
outbox has a backlog (`--backlog` events: with nothing waiting, a full disk has nothing to ack), a
filler file fills the tmpfs, the engine answers again, the disk stays full for `--seconds`, then the
filler is removed. Variant `accepting`: the engine accepts all along;
variant `unavailable`: the engine answers 503 while the disk is full and recovers with it. Publishing
stops when the filler goes, so the recovery time is the time to drain and restart alone.

    .venv/bin/python -m bench.chaos.disk_full                       # short: 5 s full, both variants
    .venv/bin/python -m bench.chaos.disk_full --full --write        # 120 s full at 500 events/s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.chaos.rig import Rig, header, loadavg, sample, write_section  # noqa: E402
from listenerd.testing import Tmpfs, wait_for  # noqa: E402

VARIANTS = ("accepting", "unavailable")
RETRY_INITIAL, RETRY_MAX, JITTER = 0.05, 0.5, 0.2  # the rig's [engine] retry settings, and backoff's jitter
ACK_FAILURE_LINE = "could not record an engine ack"  # the forwarder's log event for a failed ack (main at 8eb4b0a)


def policy_max_sends(window: float, initial: float = RETRY_INITIAL, cap: float = RETRY_MAX,
                     jitter: float = JITTER) -> int:
    """The most times one batch can go to the engine in `window` s under the retry policy (shortest jitter)."""
    sends, spent, attempt = 1, 0.0, 1
    while True:
        spent += min(cap, initial * 2 ** (attempt - 1)) * (1 - jitter)
        if spent > window:
            return sends
        sends, attempt = sends + 1, attempt + 1


def _copies(rig: Rig) -> dict[int, int]:
    return dict(rig.ledger.copies.get("pusher", {}))


def _labelled(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    """{label value: value} of one metric family (`name{...label="v"...}`)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if key.startswith(name + "{"):
            found = key.split(f'{label}="', 1)
            out[found[1].split('"', 1)[0] if len(found) == 2 else ""] = value
    return out


def _count_in_log(path: Path, start: int, size: int, text: str) -> int:
    """How often `text` occurs in `size` bytes of the log from `start` (the part written while full)."""
    with open(path, "rb") as log:
        log.seek(start)
        return log.read(size).decode(errors="replace").count(text)


def _committed(metrics: dict[str, float]) -> float:
    return sum(_labelled(metrics, "listenerd_events_received_total", "listener").values())


async def run(workdir: Path, variant: str = "accepting", full_for: float = 5.0, rate: float = 500.0,
              size_mb: int = 30, backlog: int = 500, every: float = 0.25, recover_timeout: float = 60.0,
              say: Any = print) -> dict[str, Any]:
    """One disk-full episode; returns the figures (never raises on the daemon's misbehaviour, only on the rig's)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    reason = Tmpfs.available()
    if reason:
        raise RuntimeError(f"the disk-full scenario mounts a tmpfs: {reason}")
    workdir = Path(workdir)
    result: dict[str, Any] = {"variant": variant, "full_s": full_for, "rate": rate, "size_mb": size_mb}
    with Tmpfs(workdir / "store", size_mb) as disk:
        rig = Rig(workdir, {"pusher": 1}, store_dir=disk.path)
        try:
            await rig.begin(rate)
            await wait_for(lambda: rig.ledger.deliveries >= 100, timeout=30, what="deliveries before the disk fills")
            await _episode(rig, disk, variant, full_for, backlog, every, recover_timeout, result, say)
            result["exit_code"] = await rig.stop(strict=False)
            result["left_in_outbox"] = rig.ledger.remember_outbox(rig.db_path)  # committed, never delivered
        finally:
            await rig.stop(strict=False)  # before the unmount: the daemon holds its store files open
    result["unmounted"] = not disk.mounted
    report = rig.ledger.report("pusher")
    result.update(report=report, secret_hits=sum(rig.secret_hits().values()))
    # committed and never delivered: left on disk, or counted committed by the daemon yet never at the engine
    unseen = max(0, int(result["committed_total"]) - report["delivered_unique"])
    result["lost_committed"] = report["lost_committed"] + unseen
    return result


async def _episode(rig: Rig, disk: Tmpfs, variant: str, full_for: float, backlog: int, every: float,
                   recover_timeout: float, result: dict[str, Any], say: Any) -> None:
    assert rig.daemon is not None
    log_path = rig.daemon.log_path
    baseline = sample(rig.pid)
    rig.engine.silence()  # answers held: the outbox fills up to the backlog, a batch is in flight at the fill

    async def backlogged() -> bool:
        return await rig.outbox_depth() >= backlog

    await wait_for(backlogged, timeout=30, interval=0.05, what=f"{backlog} events waiting in the outbox")
    result["filler_bytes"] = disk.fill()
    before_metrics = await rig.metrics()
    result["backlog_at_fill"] = before_metrics.get("listenerd_outbox_depth", 0.0)
    copies_before = _copies(rig)
    published_before = rig.published_total()
    log_at_fill = log_path.stat().st_size
    requests_at_fill = len(rig.engine.requests) + rig.engine.unavailable_answers
    if variant == "unavailable":
        rig.engine.unavailable = True
    rig.engine.silence(False)  # the held batch is accepted; what comes after depends on the variant
    filled = time.monotonic()
    statuses: Counter[str] = Counter()
    messages: set[str] = set()
    readyz: Counter[int] = Counter()
    readyz_bodies: list[Any] = []
    peak = baseline
    while time.monotonic() - filled < full_for:
        now = sample(rig.pid)
        peak = now if now.rss_kb > peak.rss_kb else peak
        code, body = await rig.readyz()
        readyz[code] += 1
        if code != 200 and len(readyz_bodies) < 3:
            readyz_bodies.append(body)
        for detail in (await rig.status_details()).values():
            statuses[str(detail.get("status"))] += 1
            for key in ("message", "last-error"):
                if detail.get(key):
                    messages.add(str(detail[key])[:160])
        await asyncio.sleep(every)
    full_metrics = await rig.metrics()
    copies_full = _copies(rig)
    log_while_full = log_path.stat().st_size - log_at_fill
    ack_failure_lines = _count_in_log(log_path, log_at_fill, log_while_full, ACK_FAILURE_LINE)
    published_full = rig.published_total() - published_before
    await rig.stop_pump()
    published_at_unfill = rig.published_total()
    committed_at_unfill = _committed(full_metrics)
    disk.unfill()
    rig.engine.unavailable = False
    freed = time.monotonic()
    say(f"{variant}: full for {full_for:.0f} s, {published_full} published meanwhile; recovering")

    new = [n for n, c in copies_full.items() if n not in copies_before]
    deliveries_full = sum(copies_full.values()) - sum(copies_before.values())
    errors_before = _labelled(before_metrics, "listenerd_store_errors_total", "op")
    errors_full = _labelled(full_metrics, "listenerd_store_errors_total", "op")
    result.update(
        baseline_rss_kb=baseline.rss_kb, peak_rss_kb=peak.rss_kb,
        published_while_full=published_full,
        committed_while_full=committed_at_unfill - _committed(before_metrics),
        held_at_unfill=published_at_unfill - committed_at_unfill,  # in the provider's socket or the daemon's memory
        backpressure_waits=(full_metrics.get("listenerd_backpressure_waits_total", 0.0)
                            - before_metrics.get("listenerd_backpressure_waits_total", 0.0)),
        engine_requests_while_full=len(rig.engine.requests) + rig.engine.unavailable_answers - requests_at_fill,
        deliveries_while_full=deliveries_full,
        duplicates_while_full=deliveries_full - len(new),
        max_copies_while_full=max((c - copies_before.get(n, 0) for n, c in copies_full.items()), default=0),
        policy_max_sends=policy_max_sends(full_for),
        store_errors={op: v - errors_before.get(op, 0.0) for op, v in errors_full.items()},
        failed_acks=(errors_full.get("ack", 0.0) - errors_before.get("ack", 0.0)) if errors_full else ack_failure_lines,
        ack_failure_log_lines=ack_failure_lines,
        log_bytes_while_full=log_while_full,
        statuses_while_full=dict(statuses), messages_while_full=sorted(messages)[:6],
        readyz_while_full=dict(readyz), readyz_bodies=readyz_bodies,
    )

    async def recovered() -> bool:
        metrics = await rig.metrics()
        code, _ = await rig.readyz()
        statuses_now = await rig.statuses()
        return (metrics.get("listenerd_outbox_depth", 1.0) == 0 and code == 200
                and all(v == "started" for v in statuses_now.values()))

    try:
        await rig.wait_delivered(timeout=recover_timeout)
        await wait_for(recovered, timeout=recover_timeout, interval=0.1, what="outbox drained, ready, all started")
        result["recover_s"] = time.monotonic() - freed
        fresh_from = rig.published_total()
        for _ in range(5):
            await rig.publish("pusher", 0)
        await wait_for(lambda: all(n in rig.ledger.delivered.get("pusher", {})
                                   for n in range(fresh_from, fresh_from + 5)), timeout=30, what="streaming again")
        result["streaming_after"] = True
    except AssertionError as exc:
        result.setdefault("recover_s", None)
        result["streaming_after"] = False
        result["recovery_error"] = str(exc)[:300]
    after = sample(rig.pid)
    result["after_rss_kb"] = after.rss_kb
    result["committed_total"] = _committed(await rig.metrics())


def breaches(result: dict[str, Any]) -> dict[str, str]:
    """Every invariant of issue 20 the run broke, by name (the short CI test names which must hold today)."""
    out: dict[str, str] = {}
    r = result["report"]

    def need(name: str, ok: bool, what: str) -> None:
        if not ok:
            out[name] = what

    need("no_committed_event_lost", result["lost_committed"] == 0 and r["mixed_ids"] == 0 and r["invented"] == 0,
         f"lost {result['lost_committed']}, mixed ids {r['mixed_ids']}, invented {r['invented']}")
    need("recovers_by_itself", result.get("recover_s") is not None and result["streaming_after"],
         result.get("recovery_error", "did not stream again"))
    need("clean_exit", result["exit_code"] == 0 and result["left_in_outbox"] == 0 and result["unmounted"],
         f"exit {result['exit_code']}, {result['left_in_outbox']} left in the outbox, unmounted {result['unmounted']}")
    need("nothing_unread_after_recovery", r["not_received"] == 0, f"{r['not_received']} published, never delivered")
    need("memory_bounded_while_full", result["peak_rss_kb"] - result["baseline_rss_kb"] < 64 * 1024,
         f"RSS {result['baseline_rss_kb'] // 1024} -> {result['peak_rss_kb'] // 1024} MiB")
    need("no_secret_leaked", result["secret_hits"] == 0, f"{result['secret_hits']} secret values in logs/answers")
    need("no_duplicates_while_full", result["duplicates_while_full"] == 0,
         f"{result['duplicates_while_full']:,} duplicate deliveries while full")
    need("resends_within_retry_policy", result["max_copies_while_full"] <= result["policy_max_sends"],
         f"one event sent {result['max_copies_while_full']:,} times, the policy allows {result['policy_max_sends']}")
    need("failed_acks_back_off", result["failed_acks"] <= result["policy_max_sends"],
         f"{result['failed_acks']:,.0f} failed acks in {result['full_s']:.0f} s")
    need("log_bounded_while_full", result["log_bytes_while_full"] <= 16_384 + 2_048 * result["full_s"],
         f"{result['log_bytes_while_full']:,} log bytes while full")
    need("readyz_503_while_full", result["readyz_while_full"].get(503, 0) > 0, f"/readyz {result['readyz_while_full']}")
    need("status_truthful_while_full", set(result["statuses_while_full"]) != {"started"}
         or any("disk" in m.lower() or "store" in m.lower() for m in result["messages_while_full"]),
         f"statuses {result['statuses_while_full']}, messages {result['messages_while_full']}")
    need("store_errors_counted", sum(result["store_errors"].values()) > 0, "no listenerd_store_errors_total{op}")
    return out


def summary(results: list[dict[str, Any]]) -> str:
    rows = ["| | " + " | ".join(f"engine {r['variant']}" for r in results) + " |",
            "|---|" + "---|" * len(results)]

    def row(label: str, fn: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(str(fn(r)) for r in results) + " |")

    row("outbox backlog when the disk filled", lambda r: f"{r['backlog_at_fill']:,.0f}")
    row("events published (in the run / while full)", lambda r: f"{r['report']['published']:,} / "
        f"{r['published_while_full']:,}")
    row("committed (daemon's count) / while full", lambda r: f"{r['committed_total']:,.0f} / "
        f"{r['committed_while_full']:,.0f}")
    row("delivered (unique)", lambda r: f"{r['report']['delivered_unique']:,}")
    row("lost (committed, never delivered)", lambda r: r["lost_committed"])
    row("not committed when space returned (held in the socket or memory)", lambda r: f"{r['held_at_unfill']:,.0f}")
    row("back-pressure waits while full", lambda r: f"{r['backpressure_waits']:,.0f}")
    row("published, never delivered", lambda r: r["report"]["not_received"])
    row("engine requests while full", lambda r: f"{r['engine_requests_while_full']:,}")
    row("duplicate deliveries while full", lambda r: f"{r['duplicates_while_full']:,}")
    row("most copies of one event while full (policy allows)", lambda r: f"{r['max_copies_while_full']:,} "
        f"({r['policy_max_sends']})")
    row("failed acks (log lines)", lambda r: f"{r['failed_acks']:,.0f} ({r['ack_failure_log_lines']:,})")
    row("`listenerd_store_errors_total` by op", lambda r: ", ".join(f"{k} {v:,.0f}" for k, v in
                                                                     r["store_errors"].items()) or "absent")
    row("log bytes written while full", lambda r: f"{r['log_bytes_while_full']:,}")
    row("RSS before / peak while full / after", lambda r: f"{r['baseline_rss_kb'] / 1024:.0f} / "
        f"{r['peak_rss_kb'] / 1024:.0f} / {r['after_rss_kb'] / 1024:.0f} MiB")
    row("statuses seen while full", lambda r: ", ".join(f"{k} x{v}" for k, v in r["statuses_while_full"].items()))
    row("`/readyz` while full", lambda r: ", ".join(f"{k} x{v}" for k, v in r["readyz_while_full"].items()))
    row("time to recover (filler removed -> drained, ready, all started)",
        lambda r: f"{r['recover_s']:.1f} s" if r["recover_s"] is not None else "NOT RECOVERED")
    row("SIGTERM exit code", lambda r: r["exit_code"])
    row("invariants broken", lambda r: ", ".join(breaches(r)) or "none")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="120 s full at 500 events/s")
    parser.add_argument("--seconds", type=float, help="how long the disk stays full")
    parser.add_argument("--rate", type=float, default=500.0)
    parser.add_argument("--size-mb", type=int, default=30)
    parser.add_argument("--backlog", type=int, default=500, help="events waiting in the outbox when the disk fills")
    parser.add_argument("--variant", choices=VARIANTS, action="append", help="default: both")
    parser.add_argument("--write", action="store_true", help="replace the `## Chaos: disk full` section of RESULTS.md")
    args = parser.parse_args()
    full_for = args.seconds or (120.0 if args.full else 5.0)
    start_load = loadavg()
    results = []
    for variant in args.variant or VARIANTS:
        with tempfile.TemporaryDirectory(prefix="chaos-diskfull-") as tmp:
            results.append(asyncio.run(run(Path(tmp), variant, full_for, args.rate, args.size_mb, args.backlog,
                                           every=max(0.25, full_for / 200))))
    text = summary(results)
    print(text)
    for r in results:
        for name, what in breaches(r).items():
            print(f"engine {r['variant']}: {name}: {what}")
        with contextlib.suppress(KeyError):
            print(f"engine {r['variant']}: /readyz while full said {r['readyz_bodies'][:1]}; "
                  f"messages {r['messages_while_full']}")
    if args.write:
        note = "" if full_for >= 120 else f" SHORTENED: the disk stayed full {full_for:.0f} s, not 120 s."
        write_section("Chaos: disk full", f"`.venv/bin/python -m bench.chaos.disk_full --seconds {full_for:.0f} "
                      f"--rate {args.rate:.0f}`\n\n{header(f'Load at start {start_load}, at end {loadavg()}.{note}')}"
                      f"\n\nThe store on a {args.size_mb} MiB tmpfs, filled by a filler file while one Pusher "
                      f"listener streams at {args.rate:.0f} events/s with {args.backlog} events waiting in the "
                      f"outbox, held full, then freed.\n\n{text}")


if __name__ == "__main__":
    main()
