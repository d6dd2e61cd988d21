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
