"""The four simulators share one shape, so tests, bench and `listenerd dev` drive them alike.

`async start() -> self`, `async stop()`, `async with`, `url` and `port`, `silence(on)` and
`async send_raw(...)`; what silence and a raw frame mean is each protocol's own (tested with it).
"""

import asyncio
import inspect

import aiohttp
import pytest

from listenerd.sim.datasift import DataSiftSim
from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.sim.salesforce import SalesforceSim

SIMULATORS = [EngineSim, PusherSim, DataSiftSim, SalesforceSim]
ENVELOPE = {"id": "i", "tenant-id": "t", "listener-id": "L", "source": "pusher", "received-at": "x", "event": {}}


@pytest.mark.parametrize("make", SIMULATORS, ids=lambda cls: cls.__name__)
async def test_every_simulator_has_the_same_shape(make):
    sim = make()
    assert inspect.iscoroutinefunction(sim.send_raw) and inspect.iscoroutinefunction(sim.stop)
    assert await sim.start() is sim
    try:
        assert sim.port > 0 and f":{sim.port}" in sim.url
        sim.silence()
        sim.silence(False)
    finally:
        await sim.stop()
    async with make() as again:
        assert again is not sim and again.port > 0


async def test_engine_silence_holds_answers_and_send_raw_answers_the_next_request_exactly():
    async with EngineSim() as engine, aiohttp.ClientSession() as http:
        async def post() -> tuple[int, str]:
            async with http.post(engine.url, json=[ENVELOPE]) as response:
                return response.status, await response.text()

        await engine.send_raw(b"not json at all")
        engine.silence()
        held = asyncio.create_task(post())
        await asyncio.sleep(0.2)
        assert not held.done() and len(engine.requests) == 0
        engine.silence(False)
        assert await asyncio.wait_for(held, 5) == (200, "not json at all")
        assert (await post())[0] == 200 and engine.accepted == 2
