"""The four simulators share one shape, so tests, bench and `listenerd dev` drive them alike.

`async start() -> self`, `async stop()`, `async with`, `url` and `port`, `silence(on)` and
`async send_raw(frame: str | bytes) -> int`, which puts exactly those bytes on the wire; what silence
and a raw frame mean is each protocol's own (tested with it).
"""

import asyncio
import inspect
import json

import aiohttp
import pytest
from websockets.asyncio.client import connect

from listenerd.sim.datasift import DataSiftSim
from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.sim.salesforce import SalesforceSim

SIMULATORS = [EngineSim, PusherSim, DataSiftSim, SalesforceSim]
ENVELOPE = {"id": "i", "tenant-id": "t", "listener-id": "L", "source": "pusher", "received-at": "x", "event": {}}
FRAMES = [b"\x00not json\xff{", "[1, 2, \u00e9"]  # binary and text, neither JSON nor the protocol's


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


def test_every_send_raw_has_one_signature():
    signatures = {cls.__name__: inspect.signature(cls.send_raw) for cls in SIMULATORS}
    assert str(signatures["EngineSim"]) == "(self, frame: 'str | bytes') -> 'int'"
    assert all(s == signatures["EngineSim"] for s in signatures.values()), signatures


async def engine_answer(sim, http, frame):
    assert await sim.send_raw(frame) == 1
    async with http.post(sim.url, json=[ENVELOPE]) as response:
        assert response.status == 200
        return await response.read()


async def pusher_frame(sim, http, frame):
    async with http.ws_connect(sim.ws_url()) as ws:
        assert "pusher:connection_established" in (await ws.receive_str())
        assert await sim.send_raw(frame) == 1
        message = await ws.receive(timeout=5)
        assert message.type == (aiohttp.WSMsgType.BINARY if isinstance(frame, bytes) else aiohttp.WSMsgType.TEXT)
        return message.data


async def datasift_frame(sim, http, frame):
    async with connect(f"{sim.url}?username=user&api_key=key") as ws:
        assert '"tick"' in await ws.recv()  # sent once the simulator counts the socket as live
        assert await sim.send_raw(frame) == 1
        return await asyncio.wait_for(ws.recv(), 5)


async def salesforce_answer(sim, http, frame):
    sim.create_topic("Raw", "SELECT Id FROM Raw__c")
    form = {"grant_type": "password", "client_id": "consumer-key", "client_secret": "consumer-secret",
            "username": "user@example.com", "password": "passwordTOKEN"}
    async with http.post(sim.token_url, data=form) as response:
        token = (await response.json())["access_token"]
    headers = {"Authorization": f"Bearer {token}"}

    async def bayeux(message):
        async with http.post(f"{sim.url}/cometd/58.0", json=[message], headers=headers) as response:
            assert response.status == 200
            return await response.read()

    [shook] = json.loads(await bayeux({"channel": "/meta/handshake", "version": "1.0",
                                                       "supportedConnectionTypes": ["long-polling"]}))
    client = shook["clientId"]
    await bayeux({"channel": "/meta/subscribe", "clientId": client, "subscription": "/topic/Raw"})
    assert await sim.send_raw(frame) == 1
    answer = await bayeux({"channel": "/meta/connect", "clientId": client, "connectionType": "long-polling"})
    assert not sim.raw_pending
    return answer


RECEIVERS = {EngineSim: engine_answer, PusherSim: pusher_frame, DataSiftSim: datasift_frame,
             SalesforceSim: salesforce_answer}


@pytest.mark.parametrize("frame", FRAMES, ids=["bytes", "str"])
@pytest.mark.parametrize("make", SIMULATORS, ids=lambda cls: cls.__name__)
async def test_send_raw_delivers_exactly_the_bytes_given(make, frame):
    """A WebSocket simulator keeps the frame's type (bytes: binary, str: text); an HTTP one answers the bytes."""
    async with make() as sim, aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http:
        got = await RECEIVERS[make](sim, http, frame)
    http_answer = make in (EngineSim, SalesforceSim)
    assert got == (frame.encode() if http_answer and isinstance(frame, str) else frame)


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
