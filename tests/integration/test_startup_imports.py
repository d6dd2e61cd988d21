"""Start-up imports every source's module, so that no request waits while a first listener of a type imports its
own on the event loop (bench/RESULTS.md, "api scale": 15-40 ms stalls of the loop at the first listener of
each type, about 100 ms for salesforce-pubsub)."""

import subprocess
import sys
from pathlib import Path

from listenerd.sources import _MODULES

ROOT = Path(__file__).resolve().parents[2]

# a fresh interpreter: the suite's process has imported every source long ago
SCRIPT = """
import asyncio, sys, tempfile
from pathlib import Path
from tests.daemon import base_config, running_daemon

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        async with running_daemon(Path(tmp), base_config(Path(tmp), "http://127.0.0.1:9")) as (daemon, api):
            assert daemon.ready and not daemon.supervisor.records  # no listener: nothing ran a source
            print(" ".join(sorted(name for name in sys.modules if name.startswith("listenerd.sources."))))

asyncio.run(main())
"""


def test_a_started_daemon_has_imported_every_source_before_any_listener_runs():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = set(done.stdout.split())
    assert set(_MODULES.values()) <= imported, sorted(set(_MODULES.values()) - imported)
