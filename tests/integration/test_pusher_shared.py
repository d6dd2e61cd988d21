"""Pusher listeners of one tenant share one WebSocket (issue 13), under the real supervisor against the
simulator: listeners join and leave the live connection, statuses stay per listener, a channel's error
ends only its listener, a close ends them all, the app's connection quota, and what pusher-js does
beyond the bare protocol: early events, `private-encrypted-` channels (published encrypted by the
official `pusher` library), presence members and `$user_id`."""

import asyncio
import base64
import json

import pusher
import pytest
from websockets.asyncio.client import connect

from listenerd.model import Config
from listenerd.sim.pusher import PusherSim, sign_channel
from tests.harness import Harness, desired, integration, listener, wait_for

APP_ID, KEY, SECRET = "4242", "app-key", "app-secret-value-1"
MASTER = base64.b64encode(bytes(range(32))).decode()
T = "t1"


def make_config(tmp_path, supervisor=None):
    return Config.model_validate({
        "store": {"path": str(tmp_path / "t.db")},
        "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3, **(supervisor or {})},
        "sources": {"pusher-activity-timeout": 30, "pusher-pong-timeout": 5, "connect-timeout": 3},
    })


def creds(sim, **extra):
    fields = {"key": KEY, "secret": SECRET, "app-id": APP_ID, "host": "127.0.0.1", "port": sim.port, "tls": False,
              "encryption-master-key": MASTER}
    return integration("pusher", **{**fields, **extra})


def spec(lid, channel, **options):
    return listener(id=lid, type="pusher", options={"channel": channel, **options},
                    mapping={"id": "id", "channel": "$channel", "event": "$event", "user": "$user_id",
                             "member": "user_id"})


def official(sim):
    return pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=sim.port, ssl=False,
                         encryption_master_key_base64=MASTER)


@pytest.fixture
async def sim():
    async with PusherSim(APP_ID, KEY, SECRET) as server:
        yield server


async def events(h, lid):
    await h.outbox.flush()
    return [e["event"] for e in await h.events(T, lid)]


def started(sup, *lids):
    return all(sup.status((T, lid)) is not None and sup.status((T, lid)).status == "started" for lid in lids)


async def test_listeners_share_one_socket_and_join_and_leave_it_live(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        c = creds(sim)
        want = {(T, "A"): desired(spec("A", "orders"), c), (T, "B"): desired(spec("B", "private-news"), c)}
        await sup.start(want)
        await wait_for(lambda: started(sup, "A", "B"), what="both started")
        assert sim.connects == 1 and sim.open_connections == 1
        assert sup.status((T, "B")).message == "Subscribed to channel: private-news"
        await sim.publish("orders", "e", {"id": 1})
        await sim.publish("private-news", "e", {"id": 2})
        await wait_for(lambda: sup.status((T, "A")).received == 1 and sup.status((T, "B")).received == 1)

        # C joins the live socket; another tenant gets a socket of its own
        want[(T, "C")] = desired(spec("C", "orders"), c)
        want[("t2", "D")] = desired(spec("D", "orders"), c)
        await sup.reconcile(want)
        await wait_for(lambda: started(sup, "C") and sup.status(("t2", "D")).status == "started", what="C and D")
        assert sim.connects == 2 and [s.channel for s in sim.subscriptions].count("orders") == 2  # once a socket

        # A leaves: orders stays subscribed for C; B leaves: private-news is unsubscribed live
        del want[(T, "A")]
        del want[(T, "B")]
        await sup.reconcile(want)
        await wait_for(lambda: [ch for _, ch in sim.unsubscriptions] == ["private-news"], what="live unsubscribe")
        await sim.publish("orders", "e", {"id": 3})
        await wait_for(lambda: sup.status((T, "C")).received == 1)
        assert sim.connects == 2 and sim.open_connections == 2 and started(sup, "C")
        assert await events(h, "C") == [{"id": 3, "channel": "orders", "event": "e"}]

        # the last listener of a socket closes it
        await sup.reconcile({("t2", "D"): want[("t2", "D")]})
        await wait_for(lambda: sim.open_connections == 1, what="t1's socket closed")
        await sup.stop()


async def test_a_listener_added_and_one_removed_while_another_streams_never_reconnect_it(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        c = creds(sim)
        want = {(T, "A"): desired(spec("A", "orders"), c)}
        await sup.start(want)
        await wait_for(lambda: started(sup, "A"))
        sent = 0

        async def publish(n):
            nonlocal sent
            for _ in range(n):
                sent += 1
                await sim.publish("orders", "n", {"id": sent})

        await publish(50)
        want[(T, "B")] = desired(spec("B", "news"), c)
        await sup.reconcile(want)  # added while A streams
        await publish(50)
        await wait_for(lambda: started(sup, "B"))
        del want[(T, "B")]
        await sup.reconcile(want)  # removed while A streams
        await publish(50)
        await wait_for(lambda: sup.status((T, "A")).received == 150, what="A's 150 events")
        assert [e["id"] for e in await events(h, "A")] == list(range(1, 151))
        assert sim.connects == 1 and sim.peak_connections == 1 and sup.status((T, "A")).attempts == 0
        await sup.stop()


async def test_a_refused_channel_fails_only_its_listener(tmp_path, sim):
    sim.reject_subscriptions("private-secret", status=403, error="Channel is forbidden")
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        c = creds(sim)
        await sup.start({(T, "A"): desired(spec("A", "orders"), c), (T, "B"): desired(spec("B", "private-secret"), c)})
        await wait_for(lambda: sup.status((T, "B")).status == "failed", what="B failed")
        assert sup.status((T, "B")).message == ("Pusher refused the subscription to channel private-secret: "
                                                 "Channel is forbidden (status 403)")
        await wait_for(lambda: started(sup, "A"))
        await sim.publish("orders", "e", {"id": 1})
        await wait_for(lambda: sup.status((T, "A")).received == 1)
        assert sim.connects == 1 and sup.status((T, "A")).attempts == 0
        await sup.stop()


@pytest.mark.parametrize(("code", "status"), [(4009, "failed"), (4100, "retrying"), (4200, "started")])
async def test_a_close_of_the_connection_concerns_every_listener_on_it(tmp_path, sim, code, status):
    config = make_config(tmp_path, supervisor={"backoff-initial": 20, "backoff-max": 20})
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        c = creds(sim)
        await sup.start({(T, "A"): desired(spec("A", "orders"), c), (T, "B"): desired(spec("B", "news"), c)})
        await wait_for(lambda: started(sup, "A", "B"))
        sim.close_all(code, "closing")
        await wait_for(lambda: all(sup.status((T, x)).attempts >= (0 if status == "failed" else 1) and
                                   sup.status((T, x)).status == status for x in "AB"), what=f"both {status}")
        for lid in "AB":
            record = sup.status((T, lid))
            assert f"close code {code}" in (record.message if status != "started" else record.last_error)
        if status == "started":  # 4200: at once, both back on ONE new socket
            assert sim.connects == 2 and sim.open_connections == 1
        await sup.stop()


async def test_the_apps_connection_quota_is_hit_and_named(tmp_path):
    server = PusherSim(APP_ID, KEY, SECRET, max_connections=1)
    async with server, Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        other = integration("pusher", key=KEY, secret=SECRET, host="127.0.0.1", port=server.port, tls=False)
        # one tenant's ten listeners use one connection: well inside the quota of one
        want = {(T, f"L{n}"): desired(spec(f"L{n}", f"ch{n}"), creds(server)) for n in range(10)}
        await sup.start(want)
        await wait_for(lambda: started(sup, *[f"L{n}" for n in range(10)]), what="ten started")
        assert server.connects == 1 and server.peak_connections == 1
        # another tenant on the same app: a second connection, over the quota
        want[("t2", "X")] = desired(spec("X", "orders"), other)
        await sup.reconcile(want)
        await wait_for(lambda: sup.status(("t2", "X")).status == "failed", what="X failed over quota")
        assert sup.status(("t2", "X")).message == (
            "Pusher refused the connection with close code 4004: the app is over its connection quota (its "
            "plan's limit of concurrent connections) (server said: Over connection quota)")
        assert server.quota_refusals == 1 and started(sup, "L0", "L9")
        await sup.stop()


async def test_events_before_subscription_succeeded_are_delivered(tmp_path, sim):
    sim.hold_subscriptions("orders")
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({(T, "A"): desired(spec("A", "orders"), creds(sim))})
        await sim.wait_subscribed("orders")
        await sim.publish("orders", "early", {"id": 1})
        await wait_for(lambda: sup.status((T, "A")).received == 1, what="the early event")
        assert sup.status((T, "A")).status == "starting"  # started only on its own confirmation
        sim.release_subscriptions("orders")
        await wait_for(lambda: started(sup, "A"))
        assert await events(h, "A") == [{"id": 1, "channel": "orders", "event": "early"}]
        await sup.stop()


async def test_encrypted_channel_round_trip_with_the_official_library(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        await sup.start({(T, "A"): desired(spec("A", "private-encrypted-orders"), creds(sim))})
        await wait_for(lambda: started(sup, "A"))
        lib = official(sim)
        await asyncio.to_thread(lib.trigger, "private-encrypted-orders", "paid", {"id": 42})
        await wait_for(lambda: sup.status((T, "A")).received == 1)
        assert await events(h, "A") == [{"id": 42, "channel": "private-encrypted-orders", "event": "paid"}]

        # published with another master key: counted, not forwarded; the stream goes on
        stranger = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=sim.port, ssl=False,
                                 encryption_master_key_base64=base64.b64encode(b"k" * 32).decode())
        await asyncio.to_thread(stranger.trigger, "private-encrypted-orders", "paid", {"id": 43})
        await asyncio.to_thread(lib.trigger, "private-encrypted-orders", "paid", {"id": 44})
        await wait_for(lambda: sup.status((T, "A")).received == 2)
        errors = h.metrics.listener_errors.labels(T, "A", "decrypt")._value.get()
        assert errors == 1 and [e["id"] for e in await events(h, "A")] == [42, 44]
        await sup.stop()


async def test_presence_members_and_user_id(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        sup = h.supervisor()
        c = creds(sim)
        await sup.start({(T, "M"): desired(spec("M", "presence-room", members=True), c),
                         (T, "P"): desired(spec("P", "presence-room"), c)})
        await wait_for(lambda: started(sup, "M", "P"))
        async with connect(sim.ws_url(), compression=None) as ws:
            socket_id = json.loads(json.loads(await ws.recv())["data"])["socket_id"]
            channel_data = json.dumps({"user_id": "ann"})
            await ws.send(json.dumps({"event": "pusher:subscribe", "data": {
                "channel": "presence-room", "channel_data": channel_data,
                "auth": sign_channel(KEY, SECRET, socket_id, "presence-room", channel_data)}}))
            await sim.wait_subscribed("presence-room", count=2)
            await ws.send(json.dumps({"event": "client-typing", "channel": "presence-room", "data": {"id": 5}}))
            await wait_for(lambda: sup.status((T, "P")).received == 1)
        await wait_for(lambda: sup.status((T, "M")).received == 3, what="added, typing, removed")
        assert await events(h, "M") == [
            {"channel": "presence-room", "event": "pusher:member_added", "member": "ann"},
            {"id": 5, "channel": "presence-room", "event": "client-typing", "user": "ann"},
            {"channel": "presence-room", "event": "pusher:member_removed", "member": "ann"}]
        assert await events(h, "P") == [{"id": 5, "channel": "presence-room", "event": "client-typing", "user": "ann"}]
        await sup.stop()
