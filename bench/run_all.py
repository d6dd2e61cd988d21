"""Run every benchmark, one after another: `make bench` (or `.venv/bin/python bench/run_all.py [--full]`).

Each benchmark prints its table; the figures in bench/RESULTS.md come from these runs (the Salesforce
and chaos scenarios replace their own sections with `--write`). Without `--full` the chaos scenarios
run their short versions (seconds each); `--full` runs them at the sizes the RESULTS.md tables name
(the engine outage takes 10 minutes and the soak 30).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THROUGHPUT = [
    ["bench/delivery.py", "--synchronous", "both"],
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
CHAOS = ["crash_loop", "engine_outage", "flaps", "bad_input", "soak", "security"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="full chaos scenarios, written to RESULTS.md")
    parser.add_argument("--only", help="run only the benchmarks whose name contains this")
    args = parser.parse_args()
    runs = [[sys.executable, *cmd] for cmd in THROUGHPUT]
    runs += [[sys.executable, "-m", f"bench.chaos.{name}", *(["--full", "--write"] if args.full else [])]
             for name in CHAOS]
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
