"""The Pusher simulator's own protocol behaviour, driven by a bare WebSocket client.

The peer tests prove real clients accept it; these pin down the parts no peer exercises: handshake
refusals, the server's own ping and 4201 close, presence membership, client events, unsubscribe,
and that a scripted close comes after the frames published before it.
"""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from listenerd.sim.pusher import PusherSim, sign_channel

APP_ID, KEY, SECRET = "4242", "sim-key", "sim-secret"


@pytest.fixture
async def sim():
    async with PusherSim(APP_ID, KEY, SECRET) as server:
        yield server


async def frames_until_close(ws):
    frames = []
    try:
        while True:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 5)))
    except ConnectionClosed as exc:
        return frames, exc.rcvd.code if exc.rcvd else None


async def open_socket(sim, channel=None, **kw):
    ws = await connect(sim.ws_url(), compression=None, **kw)
    hello = json.loads(await ws.recv())
    assert hello["event"] == "pusher:connection_established"
    socket_id = json.loads(hello["data"])["socket_id"]
    if channel:
        data = {"channel": channel}
        if channel.startswith("private-"):
            data["auth"] = sign_channel(KEY, SECRET, socket_id, channel)
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": data}))
        reply = json.loads(await ws.recv())
        assert reply["event"] == "pusher_internal:subscription_succeeded", reply
    return ws, socket_id


@pytest.mark.parametrize(("query", "code"), [("", 4008), ("?protocol=3", 4007), ("?protocol=8", 4007)])
async def test_protocol_version_is_required(sim, query, code):
    async with connect(f"ws://127.0.0.1:{sim.port}/app/{KEY}{query}", compression=None) as ws:
        frames, closed = await frames_until_close(ws)
    assert frames == [{"event": "pusher:error", "data": {"code": code, "message": frames[0]["data"]["message"]}}]
    assert closed == code


async def test_unknown_key_gets_an_error_then_4001(sim):
    async with connect(f"ws://127.0.0.1:{sim.port}/app/nope?protocol=7", compression=None) as ws:
        frames, closed = await frames_until_close(ws)
    assert frames[0]["event"] == "pusher:error" and frames[0]["data"]["code"] == 4001
    assert closed == 4001 and sim.connects == 0


async def test_handshake_advertises_activity_timeout_and_answers_ping(sim):
    ws = await connect(sim.ws_url(), compression=None)
    hello = json.loads(await ws.recv())
    assert json.loads(hello["data"])["activity_timeout"] == 120
    await ws.send(json.dumps({"event": "pusher:ping", "data": {}}))
    assert json.loads(await ws.recv()) == {"event": "pusher:pong", "data": {}}
    await ws.close()


async def test_silent_client_is_pinged_then_closed_with_4201():
    async with PusherSim(APP_ID, KEY, SECRET, activity_timeout=0.1, pong_timeout=0.2) as server:
        ws, _ = await open_socket(server)
        frames, closed = await frames_until_close(ws)
        assert frames == [{"event": "pusher:ping", "data": {}}] and closed == 4201


async def test_scripted_close_comes_after_everything_published_before_it(sim):
    ws, _ = await open_socket(sim, "orders")
    for n in range(50):
        await sim.publish("orders", "e", {"n": n})
    sim.close_all(4100, "Over capacity")
    await sim.publish("orders", "e", {"n": "late"})  # after the close: never sent
    frames, closed = await frames_until_close(ws)
    assert [json.loads(f["data"])["n"] for f in frames] == list(range(50)) and closed == 4100


async def test_presence_membership_and_client_events(sim):
    a, a_id = await open_socket(sim)
    b, b_id = await open_socket(sim)
    channel = "presence-room"
    for ws, sid, user in ((a, a_id, "ann"), (b, b_id, "bob")):
        data = json.dumps({"user_id": user, "user_info": {}})
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {
            "channel": channel, "channel_data": data, "auth": sign_channel(KEY, SECRET, sid, channel, data)}}))
        joined = json.loads(await ws.recv())
        assert joined["event"] == "pusher_internal:subscription_succeeded"
    assert json.loads(joined["data"])["presence"]["count"] == 2
    added = json.loads(await a.recv())
    assert added["event"] == "pusher_internal:member_added" and json.loads(added["data"])["user_id"] == "bob"
    await b.send(json.dumps({"event": "client-typing", "channel": channel, "data": {"on": True}}))
    typed = json.loads(await a.recv())
    assert typed["event"] == "client-typing" and json.loads(typed["data"]) == {"on": True}
    await b.send(json.dumps({"event": "pusher:unsubscribe", "data": {"channel": channel}}))
    removed = json.loads(await a.recv())
    assert removed["event"] == "pusher_internal:member_removed"
    assert await sim.publish(channel, "e", {}) == 1  # only ann is left
    await a.close()
    await b.close()


async def test_client_event_on_a_public_channel_is_rejected(sim):
    ws, _ = await open_socket(sim, "orders")
    await ws.send(json.dumps({"event": "client-x", "channel": "orders", "data": {}}))
    error = json.loads(await ws.recv())
    assert error["event"] == "pusher:error" and error["data"]["code"] == 4301
    await ws.close()


async def test_silence_black_holes_current_sockets_only(sim):
    old, _ = await open_socket(sim, "orders")
    sim.silence()
    new, _ = await open_socket(sim, "orders")
    assert await sim.publish("orders", "e", {"n": 1}) == 2
    assert json.loads(json.loads(await new.recv())["data"]) == {"n": 1}
    await old.send(json.dumps({"event": "pusher:ping", "data": {}}))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(old.recv(), 0.3)  # neither the event nor a pong arrives
    await old.close()
    await new.close()


# ---------------------------------------------------------------- limits and what issue 13 needs


async def test_connections_over_the_apps_quota_are_closed_4004():
    async with PusherSim(APP_ID, KEY, SECRET, max_connections=2) as server:
        first, _ = await open_socket(server)
        second, _ = await open_socket(server)
        async with connect(server.ws_url(), compression=None) as third:
            frames, closed = await frames_until_close(third)
        assert frames == [{"event": "pusher:error", "data": {"code": 4004, "message": "Over connection quota"}}]
        assert closed == 4004 and server.quota_refusals == 1
        assert server.open_connections == 2 and server.peak_connections == 2 and server.connects == 2
        await first.close()
        await asyncio.sleep(0.1)
        fourth, _ = await open_socket(server)  # room again once one left
        assert server.connects == 3
        await second.close()
        await fourth.close()


async def test_held_confirmations_let_events_arrive_before_subscription_succeeded(sim):
    sim.hold_subscriptions("orders")
    async with connect(sim.ws_url(), compression=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {"channel": "orders"}}))
        await sim.wait_subscribed("orders")
        await sim.publish("orders", "early", {"n": 1})
        sim.release_subscriptions("orders")
        first, second = json.loads(await ws.recv()), json.loads(await ws.recv())
        assert first["event"] == "early" and second["event"] == "pusher_internal:subscription_succeeded"


async def test_client_events_on_presence_channels_carry_the_senders_user_id(sim):
    async def presence(user):
        ws = await connect(sim.ws_url(), compression=None)
        socket_id = json.loads(json.loads(await ws.recv())["data"])["socket_id"]
        channel_data = json.dumps({"user_id": user})
        await ws.send(json.dumps({"event": "pusher:subscribe", "data": {
            "channel": "presence-room", "channel_data": channel_data,
            "auth": sign_channel(KEY, SECRET, socket_id, "presence-room", channel_data)}}))
        assert json.loads(await ws.recv())["event"] == "pusher_internal:subscription_succeeded"
        return ws

    ann, bob = await presence("ann"), await presence("bob")
    assert json.loads(await ann.recv())["event"] == "pusher_internal:member_added"
    await bob.send(json.dumps({"event": "client-typing", "channel": "presence-room", "data": {"x": 1}}))
    got = json.loads(await ann.recv())
    assert got["event"] == "client-typing" and got["user_id"] == "bob"
    await ann.close()
    await bob.close()
