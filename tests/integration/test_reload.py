"""Reload applies settings in place: a new engine URL takes over delivery, new outbox bounds apply at once."""

from listenerd.sim.engine import EngineSim
from tests.daemon import base_config, running_daemon
from tests.harness import wait_for
from tests.integration.test_api import COUNTERS, TENANT, ticking_source


async def test_reload_moves_delivery_to_a_new_engine_and_applies_outbox_bounds(tmp_path, scripted_source):
    scripted_source("pusher", ticking_source)
    COUNTERS.clear()
    first, second = EngineSim(), EngineSim()
    await first.start()
    await second.start()
    try:
        async with running_daemon(tmp_path, base_config(tmp_path, first.url, TENANT)) as (d, api):
            await wait_for(lambda: len(first.events()) > 10, what="delivery to the first engine")
            path = tmp_path / "listenerd.toml"
            path.write_text(base_config(tmp_path, second.url, TENANT).replace(
                "[store]\n", "[store]\noutbox-max-events = 12345\n"))
            assert await d.reload()
            assert d.forwarder.engine.url == second.url and d.outbox.max_events == 12345
            await wait_for(lambda: len(second.events()) > 10, what="delivery to the new engine")
            handed_over = len(first.events())
            await wait_for(lambda: len(second.events()) > 30)
            assert len(first.events()) == handed_over  # one sender: the old forwarder is gone
            ns = [e["event"]["n"] for e in first.events() + second.events()]
            assert sorted(set(ns)) == list(range(max(ns) + 1))  # nothing lost across the switch
    finally:
        await first.stop()
        await second.stop()


async def test_stop_stays_within_one_bound_while_the_engine_hangs(tmp_path, scripted_source, started):
    import time

    from listenerd import config as config_module
    from listenerd.daemon import Daemon
    from listenerd.systemd import Notifier

    scripted_source("pusher", ticking_source)
    engine = await started(EngineSim())
    engine.silence()  # answers nothing within any bound
    path = tmp_path / "listenerd.toml"
    path.write_text(base_config(tmp_path, engine.url, TENANT))  # stop-timeout = 3
    daemon = Daemon(config_module.load(path), str(path), notifier=Notifier(None))
    await daemon.start()
    try:
        await wait_for(lambda: daemon.outbox.depth > 20, what="a backlog behind the hung engine")
    finally:
        began = time.monotonic()
        await daemon.stop()
        took = time.monotonic() - began
    assert took < 3 + 1.5, took  # one shared deadline, not one per step
