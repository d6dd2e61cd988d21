"""SIGHUP in-process: the reload it starts is kept, and the daemon stops only after it has finished."""

import asyncio
import os
import signal
import sqlite3

from listenerd import config as config_module
from listenerd.daemon import Daemon
from listenerd.sim.engine import EngineSim
from listenerd.systemd import Notifier
from tests.daemon import base_config
from tests.harness import wait_for
from tests.integration.test_api import TENANT, ticking_source

ADDED = """
[[tenants.listeners]]
id = "CFG2"
type = "pusher"
options = { channel = "added" }
"""


async def test_a_reload_under_way_finishes_before_the_daemon_stops(tmp_path, scripted_source):
    scripted_source("pusher", ticking_source)
    engine = EngineSim()
    await engine.start()
    path = tmp_path / "listenerd.toml"
    path.write_text(base_config(tmp_path, engine.url, TENANT))
    daemon = Daemon(config_module.load(path), str(path), notifier=Notifier(None))
    running = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: daemon.ready or running.done(), what="daemon ready")
        path.write_text(base_config(tmp_path, engine.url, TENANT + ADDED))
        async with daemon._reload_lock:  # the reload SIGHUP starts waits here, under way but not done
            os.kill(os.getpid(), signal.SIGHUP)
            reload = await wait_for(lambda: next(iter(daemon._reloads), None), what="the reload task")
            daemon._stopping.set()
            await asyncio.sleep(0.2)
            assert not running.done() and not reload.done()  # stop waits for the reload
        await asyncio.wait_for(running, 10)
    finally:
        if not running.done():
            running.cancel()
        await engine.stop()
    assert reload.result() is True and not daemon._reloads
    with sqlite3.connect(tmp_path / "listenerd.db") as db:  # the reload's objects were stored before the store closed
        assert {row[0] for row in db.execute("SELECT id FROM listeners")} == {"CFG1", "CFG2"}
