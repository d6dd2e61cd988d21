"""The DataSift simulator speaks the documented message shapes to a plain WebSocket client."""

import asyncio

import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from listenerd.sim.datasift import CREDENTIALS_REQUIRED, DataSiftSim
from tests.harness import wait_for

H = "4f3af38ad1c31646561bc814c3e69af5"


async def recv(ws):
    return orjson.loads(await ws.recv())


async def test_tick_subscribe_interaction_delete_unsubscribe_shapes():
    async with DataSiftSim(users={"u": "k"}, tick_interval=60) as sim:
        async with connect(f"{sim.url}?username=u&api_key=k") as ws:
            tick = await recv(ws)
            assert tick["status"] == "connected" and isinstance(tick["tick"], int) and tick["message"]
            await ws.send(orjson.dumps({"action": "subscribe", "hash": H}).decode())
            assert await recv(ws) == {"status": "success", "hash": H,
                                      "message": f"Successfully subscribed to hash {H}"}  # DataSift's own text
            await wait_for(lambda: sim.subscribed() == {H})
            data = await sim.interaction(H, username="johndoe", sentiment=-2)
            message = await recv(ws)
            assert message == {"hash": H, "data": data}
            interaction = message["data"]["interaction"]
            assert interaction["author"]["username"] == message["data"]["twitter"]["user"]["screen_name"] == "johndoe"
            assert message["data"]["salience"]["content"]["sentiment"] == -2
            assert len(interaction["id"]) == 32 and interaction["type"] == "twitter"
            await sim.delete(H, interaction["id"])
            assert await recv(ws) == {"hash": H, "data": {"interaction": {"id": interaction["id"]}, "deleted": True}}
            await sim.send_reconnect()
            assert await recv(ws) == {"reconnect": True}
            await ws.send(orjson.dumps({"action": "unsubscribe", "hash": H}).decode())
            assert (await recv(ws))["status"] == "success"
            await wait_for(lambda: sim.subscribed() == set())
        assert [a["action"] for a in sim.actions] == ["subscribe", "unsubscribe"]


@pytest.mark.parametrize("query", ["", "?username=u", "?username=u&api_key=wrong"])
async def test_bad_credentials_get_a_failure_then_a_close(query):
    async with DataSiftSim(users={"u": "k"}) as sim, connect(sim.url + query) as ws:
        failure = await recv(ws)
        assert failure["status"] == "failure"
        if query != "?username=u&api_key=wrong":
            assert failure["message"] == CREDENTIALS_REQUIRED
        with pytest.raises(ConnectionClosed):
            await ws.recv()
        assert sim.rejected == 1 and sim.connects == 0


async def test_http_rejection_mode_and_unknown_path():
    async with DataSiftSim(users={"u": "k"}, reject_http=True) as sim:
        with pytest.raises(InvalidStatus) as info:
            await connect(f"{sim.url}?username=u&api_key=bad")
        assert info.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as info:
            await connect(f"ws://127.0.0.1:{sim.port}/other?username=u&api_key=k")
        assert info.value.response.status_code == 404


async def test_unknown_hash_fails_naming_it_and_silence_stops_ticks():
    async with DataSiftSim(users={"u": "k"}, hashes={H}, tick_interval=0.05) as sim, \
            connect(f"{sim.url}?username=u&api_key=k") as ws:
        await recv(ws)
        await ws.send(orjson.dumps({"action": "subscribe", "hash": "nope"}).decode())
        while (message := await recv(ws)).get("tick"):
            pass
        assert message == {"status": "failure", "hash": "nope", "message": "The hash nope does not exist"}
        sim.silence()
        with pytest.raises(TimeoutError):
            for _ in range(5):  # at most one tick already in flight; then nothing for 0.3 s
                async with asyncio.timeout(0.3):
                    await ws.recv()


H2 = "0123456789abcdef0123456789abcdef"


async def test_failure_naming_hashes_in_a_list_a_missing_hash_warning_and_unconfirmed_subscribes():
    async with DataSiftSim(users={"u": "k"}, hashes={H, H2}, tick_interval=60, missing="warning") as sim, \
            connect(f"{sim.url}?username=u&api_key=k") as ws:
        await recv(ws)
        for h in (H, H2, "nope"):
            await ws.send(orjson.dumps({"action": "subscribe", "hash": h}).decode())
        assert [(await recv(ws))["message"] for _ in range(3)] == [
            f"Successfully subscribed to hash {H}", f"Successfully subscribed to hash {H2}",
            "The hash nope doesn't exist"]
        await wait_for(lambda: sim.subscribed() == {H, H2})
        await sim.fail_hashes([H, H2], "Streams stopped")
        assert await recv(ws) == {"status": "failure", "message": "Streams stopped", "hashes": [H, H2]}
        assert sim.subscribed() == set()
        await ws.send(orjson.dumps({"action": "subscribe", "hash": H}).decode())
        assert (await recv(ws))["status"] == "success"
        await wait_for(lambda: sim.subscribed() == {H})
        await sim.warn_missing(H)
        assert await recv(ws) == {"status": "warning", "message": f"The hash {H} doesn't exist"}
        assert sim.subscribed() == set()
        sim.confirm = False  # subscribes applied, never confirmed
        await ws.send(orjson.dumps({"action": "subscribe", "hash": H2}).decode())
        await wait_for(lambda: sim.subscribed() == {H2})
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await ws.recv()
