"""The Pusher simulator against clients written by others: Pysher, pusher-js and the official
`pusher` HTTP library. Passing here means the simulator behaves as those clients expect Pusher to.

Pysher runs two threads per connection, so every wait on it is a threading primitive with a
timeout, run off the event loop (the simulator lives on the loop), and it is always disconnected.
"""

import asyncio
import json
import queue
import shutil
import threading
import time
from pathlib import Path

import aiohttp
import pusher
import pysher
import pytest

from listenerd.sim.pusher import PusherSim

APP_ID, KEY, SECRET = "4242", "peer-key", "peer-secret-value"
NODE_CLIENT = Path(__file__).parent / "pusher_js_client.js"


@pytest.fixture
async def sim():
    async with PusherSim(APP_ID, KEY, SECRET) as server:
        yield server


def official(sim, secret=SECRET):
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=secret, host="127.0.0.1", port=sim.port, ssl=False)


# ---------------------------------------------------------------- Pysher (protocol 6)


class PysherPeer:
    """A Pysher client whose callbacks only hand data to thread-safe queues and events."""

    def __init__(self, sim, channel, auth_for=None, event="order.updated"):
        self.socket_id: str | None = None
        self.subscribed = threading.Event()
        self.refused = threading.Event()
        self.events: queue.Queue = queue.Queue()
        self.client = pysher.Pusher(KEY, secure=False, custom_host="127.0.0.1", port=sim.port, reconnect_interval=1)

        def on_connect(data):
            self.socket_id = json.loads(data)["socket_id"]
            auth = auth_for(self.socket_id) if auth_for else None
            ch = self.client.subscribe(channel, auth=auth)
            ch.bind("pusher_internal:subscription_succeeded", lambda *a: self.subscribed.set())
            ch.bind("pusher:subscription_error", lambda *a: self.refused.set())
            ch.bind(event, self.events.put)

        self.client.connection.bind("pusher:connection_established", on_connect)

    async def __aenter__(self):
        self.client.connect()
        return self

    async def __aexit__(self, *exc):
        # Pysher's disconnect joins its thread; a daemon thread that lingers past 1 s is harmless.
        await asyncio.to_thread(self.client.disconnect, 1)


async def test_pysher_receives_an_event_published_with_the_official_library(sim):
    async with PysherPeer(sim, "orders") as peer:
        assert await asyncio.to_thread(peer.subscribed.wait, 10), "Pysher never saw subscription_succeeded"
        assert sim.connections[0].protocol == 6 and sim.connections[0].query["client"] == "Pysher"
        result = await asyncio.to_thread(official(sim).trigger, "orders", "order.updated", {"id": 42, "state": "paid"})
        assert result == {}
        data = await asyncio.to_thread(peer.events.get, True, 10)
        assert json.loads(data) == {"id": 42, "state": "paid"}  # the double encoding Pysher expects


async def test_pysher_private_channel_with_a_signature_from_the_official_library(sim):
    lib = official(sim)
    with_auth = lambda socket_id: lib.authenticate(channel="private-orders", socket_id=socket_id)["auth"]  # noqa: E731
    async with PysherPeer(sim, "private-orders", auth_for=with_auth) as peer:
        assert await asyncio.to_thread(peer.subscribed.wait, 10)
        [record] = sim.subscriptions
        assert record.ok and record.socket_id == peer.socket_id
        await asyncio.to_thread(lib.trigger, "private-orders", "order.updated", {"id": 1})
        assert json.loads(await asyncio.to_thread(peer.events.get, True, 10)) == {"id": 1}


async def test_pysher_private_channel_with_a_wrong_signature_is_refused(sim):
    wrong = official(sim, secret="not-the-secret")
    with_auth = lambda socket_id: wrong.authenticate(channel="private-orders", socket_id=socket_id)["auth"]  # noqa: E731
    async with PysherPeer(sim, "private-orders", auth_for=with_auth) as peer:
        assert await asyncio.to_thread(peer.refused.wait, 10), "Pysher never saw a subscription_error"
        assert not peer.subscribed.is_set()
        assert [s.ok for s in sim.subscriptions] == [False]


# ---------------------------------------------------------------- the official HTTP library


async def test_http_api_verifies_the_official_librarys_signature(sim):
    assert await asyncio.to_thread(official(sim).trigger, ["a", "b"], "e", "raw") == {}
    assert await asyncio.to_thread(official(sim).trigger_batch, [{"channel": "a", "name": "e", "data": {"x": 1}}]) \
        == {"batch": [{}]}
    with pytest.raises(pusher.errors.PusherBadAuth):
        await asyncio.to_thread(official(sim, secret="wrong").trigger, "a", "e", {})
    assert sim.http_rejected[-1][0] == 401 and "Invalid signature" in sim.http_rejected[-1][1]
    with pytest.raises(pusher.errors.PusherBadStatus, match="413"):
        await asyncio.to_thread(official(sim).trigger, "a", "e", "x" * 10_241)  # over Pusher's 10 KiB
    assert sim.published == 3  # a, b and the batch; nothing from the refused calls


async def test_http_api_refuses_a_replayed_old_request(sim):
    lib = official(sim)
    request = pusher.http.Request(lib._pusher_client, "POST", f"/apps/{APP_ID}/events",
                                  {"name": "e", "channels": ["a"], "data": "{}"})
    async with aiohttp.ClientSession() as session:
        async with session.post(sim.url + request.signed_path, data=request.body,
                                headers={"Content-Type": "application/json"}) as fresh:
            assert fresh.status == 200
        request.query_params["auth_timestamp"] = str(int(time.time()) - 3600)
        async with session.post(sim.url + request.signed_path, data=request.body,
                                headers={"Content-Type": "application/json"}) as stale:
            assert stale.status == 401 and "Timestamp expired" in await stale.text()


async def test_channels_info_lists_occupied_channels(sim):
    async with PysherPeer(sim, "orders") as peer:
        assert await asyncio.to_thread(peer.subscribed.wait, 10)
        info = await asyncio.to_thread(official(sim).channels_info)
        assert info == {"channels": {"orders": {}}}


# ---------------------------------------------------------------- pusher-js (protocol 7, node)

needs_node = pytest.mark.skipif(shutil.which("node") is None
                                or not (NODE_CLIENT.parent / "node_modules" / "pusher-js").exists(),
                                reason="node or tests/peers/node_modules/pusher-js missing")


class NodePeer:
    def __init__(self, sim, *channels):
        self.sim, self.channels = sim, channels
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self):
        self.proc = await asyncio.create_subprocess_exec(
            "node", str(NODE_CLIENT), "127.0.0.1", str(self.sim.port), KEY, *self.channels,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return self

    async def __aexit__(self, *exc):
        assert self.proc and self.proc.stdin
        try:
            self.proc.stdin.write(b'{"quit": true}\n')
            await asyncio.wait_for(self.proc.wait(), 5)
        except (TimeoutError, ConnectionError):
            self.proc.kill()
            await self.proc.wait()

    async def expect(self, kind, timeout=10.0):
        """The next line of `kind`, skipping state changes and other lines."""
        assert self.proc and self.proc.stdout
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            line = await asyncio.wait_for(self.proc.stdout.readline(), deadline - asyncio.get_running_loop().time())
            assert line, f"pusher-js exited before {kind}"
            msg = json.loads(line)
            if msg["type"] == kind:
                return msg
            assert msg["type"] != "subscription_error", msg  # anything else (state, error) is skipped

    def send(self, obj):
        assert self.proc and self.proc.stdin
        self.proc.stdin.write(json.dumps(obj).encode() + b"\n")


@needs_node
async def test_pusher_js_receives_an_event_published_with_the_official_library(sim):
    async with NodePeer(sim, "orders") as peer:
        await peer.expect("subscribed")
        assert sim.connections[0].protocol == 7 and sim.connections[0].query["client"] == "js"
        await asyncio.to_thread(official(sim).trigger, "orders", "order.updated", {"id": 42})
        event = await peer.expect("event")
        assert event["event"] == "order.updated" and event["data"] == {"id": 42}


@needs_node
async def test_pusher_js_private_channel_is_reauthorized_after_a_4200_reconnect(sim):
    lib = official(sim)
    async with NodePeer(sim, "private-orders") as peer:
        first = await peer.expect("auth")
        peer.send(lib.authenticate(channel="private-orders", socket_id=first["socket_id"]))
        await peer.expect("subscribed")
        sim.close_all(4200)  # pusher-js reconnects at once and must authorize the new socket_id
        second = await peer.expect("auth")
        assert second["socket_id"] != first["socket_id"]
        peer.send(lib.authenticate(channel="private-orders", socket_id=second["socket_id"]))
        await peer.expect("subscribed")
        assert [s.ok for s in sim.subscriptions] == [True, True]
        await asyncio.to_thread(lib.trigger, "private-orders", "x", {"n": 1})
        assert (await peer.expect("event"))["data"] == {"n": 1}


@needs_node
async def test_pusher_js_presence_channel_with_the_official_librarys_channel_data(sim):
    lib = official(sim)
    async with NodePeer(sim, "presence-room") as peer:
        request = await peer.expect("auth")
        peer.send(lib.authenticate(channel="presence-room", socket_id=request["socket_id"],
                                   custom_data={"user_id": "u1", "user_info": {"name": "Ann"}}))
        await peer.expect("subscribed")
        [record] = sim.subscriptions
        assert record.ok and sim.connections[0].presence == {"presence-room": "u1"}


@needs_node
async def test_pusher_js_refused_subscription_surfaces_as_subscription_error(sim):
    wrong = official(sim, secret="nope")
    async with NodePeer(sim, "private-orders") as peer:
        request = await peer.expect("auth")
        peer.send(wrong.authenticate(channel="private-orders", socket_id=request["socket_id"]))
        error = await peer.expect("subscription_error")
        assert error["status"] == 401


# ---------------------------------------------------------------- several channels on one connection (issue 13)


@needs_node
async def test_pusher_js_carries_several_channels_on_one_connection_and_changes_them_live(sim):
    """What listenerd's shared connection copies: pusher-js subscribes every channel on its one socket,
    and subscribes or unsubscribes one without touching the others or reconnecting."""
    lib = official(sim)
    async with NodePeer(sim, "orders", "news") as peer:
        assert {(await peer.expect("subscribed"))["channel"] for _ in range(2)} == {"orders", "news"}
        peer.send({"subscribe": "private-extra"})
        request = await peer.expect("auth")
        peer.send(lib.authenticate(channel="private-extra", socket_id=request["socket_id"]))
        assert (await peer.expect("subscribed"))["channel"] == "private-extra"
        peer.send({"unsubscribe": "news"})
        await peer.expect("unsubscribed")
        await wait_unsubscribed(sim, "news")
        await asyncio.to_thread(lib.trigger, ["orders", "news", "private-extra"], "e", {"n": 1})
        got = [await peer.expect("event") for _ in range(2)]
        assert sorted(e["channel"] for e in got) == ["orders", "private-extra"]
        assert sim.connects == 1 and sim.open_connections == 1
        assert sim.connections[0].channels == {"orders", "private-extra"}


@needs_node
async def test_pusher_js_delivers_events_that_arrive_before_subscription_succeeded(sim):
    """The behaviour listenerd copies (pusher-js `channel.ts` handleEvent): an event for a channel
    whose confirmation has not arrived yet is delivered, not dropped."""
    sim.hold_subscriptions("orders")
    async with NodePeer(sim, "orders") as peer:
        await sim.wait_subscribed("orders")
        await sim.publish("orders", "early", {"n": 1})
        event = await peer.expect("event")
        assert event["event"] == "early" and event["data"] == {"n": 1}
        sim.release_subscriptions("orders")
        await peer.expect("subscribed")


@needs_node
async def test_pusher_js_over_the_connection_quota_sees_4004():
    async with PusherSim(APP_ID, KEY, SECRET, max_connections=1) as server, NodePeer(server, "orders") as first:
        await first.expect("subscribed")
        async with NodePeer(server, "orders") as second:
            error = await second.expect("error")
            assert "4004" in error["error"] and "Over connection quota" in error["error"]
            assert server.quota_refusals >= 1 and server.open_connections == 1


async def wait_unsubscribed(sim, channel, timeout=10.0):
    deadline = time.monotonic() + timeout
    while channel not in [ch for _, ch in sim.unsubscriptions]:
        assert time.monotonic() < deadline, f"no unsubscribe of {channel}"
        await asyncio.sleep(0.02)
