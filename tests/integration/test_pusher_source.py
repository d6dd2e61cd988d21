"""The Pusher source against the simulator over loopback, under the real supervisor.

Each fault the simulator can inject is checked for the status it leads to, whether and when the
listener reconnects, and that every event it received is in the outbox.
"""

import asyncio
import json
import re
import socket

import pusher
import pytest
from structlog.testing import capture_logs

from listenerd.model import Config
from listenerd.sim.pusher import PusherSim, sign_channel
from tests.harness import Harness, desired, integration, listener, wait_for
from tests.tls import self_signed

APP_ID, KEY, SECRET = "4242", "app-key", "app-secret-value-1"
T = "t1"


def make_config(tmp_path, supervisor=None, **sources):
    sources = {"pusher-activity-timeout": 30, "pusher-pong-timeout": 5, "connect-timeout": 3, **sources}
    return Config.model_validate({
        "store": {"path": str(tmp_path / "t.db")},
        "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3, **(supervisor or {})},
        "sources": sources,
    })


def creds(sim, **extra):
    fields = {"key": KEY, "secret": SECRET, "app-id": APP_ID, "host": "127.0.0.1", "port": sim.port, "tls": False}
    return integration("pusher", **{**fields, **extra})


def spec(channel="orders", lid="L1", **options):
    return listener(id=lid, type="pusher", options={"channel": channel, **options},
                    mapping={"id": "id", "channel": "$channel", "event": "$event"})


@pytest.fixture
async def sim():
    async with PusherSim(APP_ID, KEY, SECRET) as server:
        yield server


class Run:
    """A supervisor running one Pusher listener against the simulator."""

    def __init__(self, h, sup, key):
        self.h, self.sup, self.key = h, sup, key

    @property
    def record(self):
        return self.sup.status(self.key)

    async def status(self, state, what=None, timeout=10.0):
        await wait_for(lambda: self.record.status == state, timeout=timeout, what=what or state)
        return self.record

    async def events(self):
        await self.h.outbox.flush()
        return [e["event"] for e in await self.h.events(T, self.key[1])]

    def errors(self, kind):
        return self.h.metrics.listener_errors.labels(T, self.key[1], kind)._value.get()


async def start(h, listener_spec, integration_creds):
    sup = h.supervisor()
    key = (T, listener_spec.id)
    await sup.start({key: desired(listener_spec, integration_creds)})
    return Run(h, sup, key)


async def running(h, listener_spec, integration_creds):
    """`start`, then wait until the listener is `started`."""
    run = await start(h, listener_spec, integration_creds)
    await run.status("started")
    return run


def next_attempt_in(message):
    return float(re.search(r"next attempt in ([0-9.]+)s", message).group(1))


# ---------------------------------------------------------------- the happy path


async def test_events_published_with_the_official_library_reach_the_outbox_in_order(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(event=["created", "paid"]), creds(sim))
        record = await run.status("started")
        assert record.message == "Subscribed to channel: orders"
        client = pusher.Pusher(app_id=APP_ID, key=KEY, secret=SECRET, host="127.0.0.1", port=sim.port, ssl=False)
        await asyncio.to_thread(client.trigger, "orders", "created", {"id": 1})
        await asyncio.to_thread(client.trigger, "orders", "ignored", {"id": 2})
        await asyncio.to_thread(client.trigger_batch, [{"channel": "orders", "name": "paid", "data": {"id": 3}},
                                                       {"channel": "other", "name": "paid", "data": {"id": 4}}])
        await sim.publish("orders", "paid", {"id": 5})
        await wait_for(lambda: record.received == 3, what="three events")
        assert await run.events() == [{"id": 1, "channel": "orders", "event": "created"},
                                      {"id": 3, "channel": "orders", "event": "paid"},
                                      {"id": 5, "channel": "orders", "event": "paid"}]
        assert sim.connections[0].protocol == 7
        assert sim.connections[0].query["client"] == "listenerd"
        assert run.sup.runners[run.key].ctx.heartbeat_bound == pytest.approx(30 + 5)  # the core's own bound
        await run.sup.stop()
        assert record.status == "stopped"
        await wait_for(lambda: not sim.connections, what="socket closed on stop")


async def test_answers_the_servers_pings_and_stays_connected(tmp_path):
    server = PusherSim(APP_ID, KEY, SECRET, activity_timeout=0.1, pong_timeout=0.5)
    async with server, Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec(), creds(server))
        conn = server.connections[0]
        await wait_for(lambda: conn.pongs >= 3, what="three pongs to the server's pings")
        assert server.connects == 1 and run.record.status == "started"


async def test_presence_channel_is_signed_and_joins(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec("presence-room"), creds(sim))
        [sub] = [s for s in sim.subscriptions if s.channel == "presence-room"]
        assert sub.ok
        await sim.publish("presence-room", "said", {"id": 7})
        await wait_for(lambda: run.record.received == 1)
        assert await run.events() == [{"id": 7, "channel": "presence-room", "event": "said"}]


# ---------------------------------------------------------------- credentials and refusals


async def test_unknown_app_key_fails_with_4001_and_is_not_retried(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(), creds(sim, key="no-such-key"))
        record = await run.status("failed")
        assert record.message.startswith("Pusher refused the connection with close code 4001: the app does not "
                                         "exist - check the app key and cluster")
        assert "no-such-key not in this cluster" in record.message
        await asyncio.sleep(0.3)  # a retry would have come after the 0.05 s back-off
        assert record.status == "failed" and record.attempts == 0 and not sim.connections


async def test_wrong_signature_on_a_private_channel_fails_without_leaking_the_secret(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        with capture_logs() as logs:
            run = await start(h, spec("private-orders"), creds(sim, secret="wrong-secret-value"))
            record = await run.status("failed")
        assert logs and "wrong-secret-value" not in repr(logs)  # raw log events, before any redaction
        assert record.message.startswith("Pusher refused the subscription to channel private-orders: "
                                         "Invalid signature")
        assert "(status 401)" in record.message
        assert "wrong-secret-value" not in record.message and SECRET not in record.message
        assert [s.ok for s in sim.subscriptions] == [False]


async def test_rejected_subscription_fails_the_listener(tmp_path, sim):
    sim.reject_subscriptions("orders", status=403, error="Channel is forbidden")
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(), creds(sim))
        record = await run.status("failed")
        assert record.message == "Pusher refused the subscription to channel orders: Channel is forbidden (status 403)"


async def test_connection_refused_retries_with_back_off(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        fake = integration("pusher", key=KEY, secret=SECRET, host="127.0.0.1", port=port, tls=False)
        run = await start(h, spec(), fake)
        await wait_for(lambda: run.record.attempts >= 3, what="three attempts")
        assert run.record.status in ("retrying", "starting")
        assert run.record.last_error.startswith(f"Could not connect to ws://127.0.0.1:{port}/app/{KEY}?protocol=7")
        assert run.record.last_error.endswith("connection refused")


async def test_refused_handshake_retries_until_the_server_accepts(tmp_path, sim):
    sim.refuse_connections(503)
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(), creds(sim))
        await wait_for(lambda: run.record.attempts >= 2, what="two attempts")
        assert "refused the WebSocket handshake" in run.record.last_error and "HTTP 503" in run.record.last_error
        sim.refuse_connections(None)
        await run.status("started")


# ---------------------------------------------------------------- close codes and drops


@pytest.mark.parametrize("code", [4004, 4009, 4099])
async def test_close_codes_4001_to_4099_fail(tmp_path, sim, code):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec(), creds(sim))
        sim.close_all(code, "go away")
        record = await run.status("failed")
        assert record.message.startswith(f"Pusher refused the connection with close code {code}")
        assert record.message.endswith("(server said: go away)")


@pytest.mark.parametrize("code", [4100, 4150])
async def test_close_codes_4100_to_4199_back_off(tmp_path, sim, code):
    config = make_config(tmp_path, supervisor={"backoff-initial": 4, "backoff-max": 4})
    async with Harness(tmp_path, config) as h:
        run = await running(h, spec(), creds(sim))
        sim.close_all(code, "Over capacity")
        record = await run.status("retrying")
        assert record.message.startswith(f"Pusher closed the connection with close code {code}")
        assert next_attempt_in(record.message) >= 3  # the back-off, never at once


@pytest.mark.parametrize("code", [4200, 4201, 4299])
async def test_close_codes_4200_to_4299_reconnect_at_once(tmp_path, sim, code):
    config = make_config(tmp_path, supervisor={"backoff-initial": 20, "backoff-max": 20})
    async with Harness(tmp_path, config) as h:
        run = await running(h, spec(), creds(sim))
        sim.close_all(code)
        await wait_for(lambda: sim.connects == 2, timeout=5, what="an immediate reconnect (back-off is 20 s)")
        await run.status("started")
        assert f"Pusher asked to reconnect now with close code {code}" in run.record.last_error


async def test_close_code_4000_is_failed_and_says_to_use_tls(tmp_path, sim):
    sim.close_on_connect(4000, "Application only accepts SSL connections, reconnect using wss://")
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(), creds(sim))
        await run.status("failed")
        assert "close code 4000" in run.record.message and "set tls = true" in run.record.message
        assert run.record.attempts == 0  # failed at once: no retry, and never switched to wss behind the operator


async def test_abrupt_drop_backs_off_and_reconnects(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec(), creds(sim))
        sim.drop_all()
        await wait_for(lambda: run.record.attempts >= 1, what="a retry")
        assert run.record.last_error == "Connection to Pusher dropped without a close frame"
        await wait_for(lambda: sim.connects == 2 and run.record.status == "started", what="back and subscribed")
        await sim.publish("orders", "x", {"id": 1})
        await wait_for(lambda: run.record.received == 1)


async def test_silent_server_is_detected_by_missing_pong_and_reconnected_at_once(tmp_path, sim):
    config = make_config(tmp_path, supervisor={"backoff-initial": 20, "backoff-max": 20},
                         **{"pusher-activity-timeout": 0.3, "pusher-pong-timeout": 0.4})
    async with Harness(tmp_path, config) as h:
        run = await running(h, spec(), creds(sim))
        sim.silence()
        await wait_for(lambda: run.record.last_error and "No pong" in run.record.last_error, what="pong timeout")
        assert run.record.last_error == "No pong from Pusher within 0.4s of a ping; reconnecting"
        await wait_for(lambda: sim.connects >= 2 and run.record.status == "started", what="reconnected at once")


async def test_a_server_that_keeps_asking_to_reconnect_gets_back_off_not_a_storm(tmp_path, sim):
    sim.close_on_connect(4200, "Generic reconnect")
    config = make_config(tmp_path, supervisor={"backoff-initial": 20, "backoff-max": 20})
    async with Harness(tmp_path, config) as h:
        run = await start(h, spec(), creds(sim))
        await wait_for(lambda: run.record.status == "retrying" and next_attempt_in(run.record.message) > 10,
                       what="back-off after repeated 4200s")
        assert run.record.attempts == 4  # three immediate reconnects, then the back-off
        assert "close code 4200" in run.record.message


async def test_server_gone_then_back_on_the_same_port(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec("private-orders"), creds(sim))
        await sim.stop_listening()
        sim.drop_all()
        await wait_for(lambda: (run.record.last_error or "").endswith("connection refused"), what="refused")
        assert run.record.status in ("retrying", "starting")
        await sim.resume_listening()
        await wait_for(lambda: run.record.status == "started" and sim.connects == 2, what="back on the same port")
        assert [s.ok for s in sim.subscriptions] == [True, True]


# ---------------------------------------------------------------- bad frames


async def test_malformed_frames_are_counted_and_the_stream_goes_on(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec(), creds(sim))
        await sim.send_raw("{not json")
        await sim.send_raw('{"no":"event"}')
        await sim.send_raw(b"\x01\x02")
        await sim.publish("orders", "x", {"id": 1})
        await wait_for(lambda: run.record.received == 1)
        assert run.errors("malformed") == 3
        assert run.record.status == "started" and sim.connects == 1


async def test_oversized_frame_is_counted_and_the_listener_reconnects(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path, **{"max-frame-bytes": 4096})) as h:
        run = await running(h, spec(), creds(sim))
        await sim.send_oversized(10_000)
        await wait_for(lambda: run.errors("oversized") == 1, what="oversized counted")
        await wait_for(lambda: sim.connects == 2 and run.record.status == "started", what="reconnected")
        assert "frame over the size limit" in run.record.last_error


# ---------------------------------------------------------------- resubscription and loss


async def test_private_channel_is_resubscribed_with_a_fresh_signature_after_reconnect(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await running(h, spec("private-orders"), creds(sim))
        sim.close_all(4200)
        await sim.wait_subscribed("private-orders", count=2)
        sim.drop_all()
        await sim.wait_subscribed("private-orders", count=3)
        subs = [s for s in sim.subscriptions if s.channel == "private-orders"]
        assert all(s.ok for s in subs)
        assert len({s.socket_id for s in subs}) == 3 and len({s.auth for s in subs}) == 3
        for s in subs:
            assert s.auth == sign_channel(KEY, SECRET, s.socket_id, "private-orders")
        await run.status("started")
        await sim.publish("private-orders", "x", {"id": 9})
        await wait_for(lambda: run.record.received == 1)


async def test_loses_nothing_it_received_across_closes_drops_and_stop(tmp_path, sim):
    async with Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(), creds(sim))
        published = 0

        async def burst(n):
            nonlocal published
            await sim.wait_subscribed("orders", count=sim.connects)
            await wait_for(lambda: sim.subscribers("orders"), what="a subscriber")
            for _ in range(n):
                published += 1
                await sim.publish("orders", "n", {"id": published})

        await burst(200)
        sim.close_all(4200)  # queued behind the 200 events: they all arrive first
        await wait_for(lambda: sim.connects == 2)
        await burst(200)
        sim.close_all(4100)
        await wait_for(lambda: sim.connects == 3)
        await burst(200)
        await wait_for(lambda: run.record.received == 600, what="600 events")
        await burst(100)
        await wait_for(lambda: run.record.received > 600, what="more events")
        await run.sup.stop()  # cancelled mid-stream: what it received is committed
        ids = [e["id"] for e in await run.events()]  # flushes the outbox first
        received = run.record.received  # counts commits: every event the source took off the socket
        assert len(ids) == received and ids == list(range(1, received + 1))
        assert received >= 601
        assert json.dumps(ids[:3]) == "[1, 2, 3]"


async def test_back_pressure_is_not_mistaken_for_a_silent_server(tmp_path, sim):
    config = make_config(tmp_path, **{"pusher-activity-timeout": 0.2, "pusher-pong-timeout": 0.2})
    async with Harness(tmp_path, config, max_events=5) as h:
        run = await running(h, spec(), creds(sim))
        for n in range(1, 21):
            await sim.publish("orders", "n", {"id": n})
        await wait_for(lambda: "paused: outbox full" in run.record.message, what="paused by back-pressure")
        # Proving an absence: well past the 0.9 s heartbeat bound, the paused connection is kept.
        await asyncio.sleep(1.5)
        assert sim.connects == 1 and run.record.status == "started"
        assert run.record.last_error is None
        delivered = []
        while len(delivered) < 20:
            rows = await h.outbox.lease(100)
            delivered += [json.loads(r.body)["event"]["id"] for r in rows]
            await h.outbox.ack(rows)
            done = len(delivered)
            await wait_for(lambda n=done: run.record.received > n or n == 20, what="more events")
        assert delivered == list(range(1, 21))
        assert sim.connects == 1


# ---------------------------------------------------------------- TLS


async def test_tls_is_verified_against_the_configured_ca_bundle(tmp_path):
    server_ctx, ca_bundle = self_signed(tmp_path)
    server = PusherSim(APP_ID, KEY, SECRET, ssl_context=server_ctx)
    async with server, Harness(tmp_path, make_config(tmp_path, **{"ca-bundle": ca_bundle})) as h:
        run = await running(h, spec("private-orders"), creds(server, tls=True))
        await server.publish("private-orders", "x", {"id": 1})
        await wait_for(lambda: run.record.received == 1)


async def test_tls_without_the_ca_bundle_is_refused_by_default(tmp_path):
    server_ctx, _ = self_signed(tmp_path)
    server = PusherSim(APP_ID, KEY, SECRET, ssl_context=server_ctx)
    async with server, Harness(tmp_path, make_config(tmp_path)) as h:
        run = await start(h, spec(), creds(server, tls=True))
        await wait_for(lambda: run.record.attempts >= 1, what="a failed attempt")
        assert run.record.last_error.startswith(f"Could not connect to wss://127.0.0.1:{server.port}/")
        assert "CERTIFICATE_VERIFY_FAILED" in run.record.last_error
        assert server.connects == 0
