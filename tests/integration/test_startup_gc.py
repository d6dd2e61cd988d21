"""`listenerd run` freezes the heap it made at start-up before any listener runs (`freeze_startup_heap`): the
cyclic GC's full collections then do not walk it again (bench/RESULTS.md, "api scale": those collections were the
slow requests). What a listener makes is made after, so it stays collectable."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# a fresh interpreter running `Daemon.run` as the CLI does (the suite's in-process daemons do not freeze its heap)
SCRIPT = '''
import asyncio, gc, tempfile
from pathlib import Path
from listenerd import config as config_module, sources
from listenerd.daemon import Daemon
from listenerd.systemd import Notifier
from listenerd.testing import wait_for
from tests.daemon import base_config

TENANT = """
[[tenants]]
id = "t1"

[tenants.integrations.pusher]
key = "app-key"
secret = "startup-gc-test-secret"

[[tenants.listeners]]
id = "CFG1"
type = "pusher"
options = { channel = "cfg" }
"""

async def waiting(ctx):
    ctx.started("scripted")
    await asyncio.Event().wait()

async def main():
    sources.register("pusher", waiting)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "listenerd.toml"
        path.write_text(base_config(Path(tmp), "http://127.0.0.1:9", TENANT))
        daemon = Daemon(config_module.load(path, {}), str(path), notifier=Notifier(None))
        run = asyncio.create_task(daemon.run())
        await wait_for(lambda: daemon.ready or run.done(), timeout=30, what="daemon ready")
        runner = daemon.supervisor.runners[("t1", "CFG1")]
        await wait_for(lambda: runner.record.status == "started", timeout=30, what="CFG1 started")
        collectable = {id(obj) for obj in gc.get_objects()}  # every tracked object but the frozen ones
        print("RESULT", gc.get_freeze_count(), id(daemon.config) in collectable, id(runner) in collectable,
              id(runner.ctx) in collectable)
        daemon._stopping.set()
        await run

asyncio.run(main())
'''


def test_the_daemon_freezes_its_start_up_heap_but_not_its_listeners():
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert result, done.stdout[-3000:]
    frozen, config_collectable, runner_collectable, ctx_collectable = result[0].split()[1:]
    assert int(frozen) > 10_000  # modules, classes, the config: tens of thousands of objects
    assert config_collectable == "False"  # made at start-up: frozen
    assert runner_collectable == "True" and ctx_collectable == "True"  # a listener's: collectable
