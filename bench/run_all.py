"""Run every benchmark, one after another: `make bench` (or `.venv/bin/python bench/run_all.py [--full]`).

Each benchmark prints its table; the figures in bench/RESULTS.md come from these runs (the Salesforce
and chaos scenarios replace their own sections with `--write`). `THROUGHPUT` and `CHAOS` below are
the list: every script in bench/ and bench/chaos/ (bench/common.py and bench/chaos/rig.py are their
shared code). Without `--full` the chaos scenarios run their short versions (seconds each; the cluster
one 40-45 s, as bench/chaos/test_short.py runs it); `--full` runs them at the sizes the
RESULTS.md tables name (the engine outage takes 10 minutes, the soak 30, the cluster about 90 s) and
writes their sections where the scenario has one to write (the cluster's figures are copied by hand).
The disk-full scenario mounts a tmpfs, so it needs root; run as another user it fails and says so.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = [
    ["bench/delivery.py", "--synchronous", "both", "--backend", "both"],  # SQLite and PostgreSQL, same run
    ["bench/pg_driver.py"],
    ["bench/pusher_throughput.py"],
    ["bench/pusher_fanout.py"],
    ["bench/salesforce_throughput.py", "--repeat", "3", "--write"],
    ["bench/salesforce_shared.py"],
    ["bench/salesforce_kinds.py"],
    ["bench/salesforce_pubsub.py"],
    ["bench/datasift_throughput.py"],
    ["bench/fleet.py"],
    ["bench/people_views.py"],
    ["bench/api_scale.py"],
]
# each chaos scenario: (its arguments for the short run, for the full run)
FULL_AND_WRITE = ([], ["--full", "--write"])
CHAOS = {
    "crash_loop": FULL_AND_WRITE,
    "engine_outage": FULL_AND_WRITE,
    "flaps": FULL_AND_WRITE,
    "bad_input": FULL_AND_WRITE,
    "soak": FULL_AND_WRITE,
    "security": FULL_AND_WRITE,
    "disk_full": FULL_AND_WRITE,
    # the cluster scenario is full by default and writes no section; its short run is test_cluster_short's size
    "cluster": (["--short", "--tenants", "6", "--per-tenant", "10", "--rate", "200", "--ttl", "3"], []),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full chaos scenarios, written to RESULTS.md")
    parser.add_argument("--only", help="run only the benchmarks whose name contains this")
    args = parser.parse_args()
    runs = [[sys.executable, *cmd] for cmd in THROUGHPUT]
    runs += [[sys.executable, "-m", f"bench.chaos.{name}", *(full if args.full else short)]
             for name, (short, full) in CHAOS.items()]
    failed = []
    for cmd in runs:
        name = " ".join(cmd[1:])
        if args.only and args.only not in name:
            continue
        print(f"\n=== {name}", flush=True)
        started = time.monotonic()
        code = subprocess.call(cmd, cwd=ROOT)
        print(f"=== {name}: exit {code} after {time.monotonic() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
