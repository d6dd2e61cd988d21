"""The DataSift source against the /multi simulator over loopback, driven by the real supervisor.

Covers: mapped events with stable ids, deletes with ids of their own, one shared socket for a
tenant's listeners (live subscribe and unsubscribe), bad credentials (frame and HTTP), connection
refused, an abrupt drop, `{"reconnect": true}`, silence, malformed and oversized frames, and a
failure naming a hash (by field, `hashes` list or text) or a warning that it does not exist versus
one about credentials; started on DataSift's confirmation or a first interaction, with a bounded
wait; the reconnect back-off of DataSift's own client. Secrets never reach a status or a log line.
"""

import asyncio
import contextlib
import logging
import socket
import time

import pytest
from structlog.testing import capture_logs
from websockets.protocol import State

from listenerd.delivery.ids import event_id
from listenerd.model import Config
from listenerd.sim.datasift import DataSiftSim
from tests.harness import Harness, desired, integration, listener, wait_for

SECRET = "key-s3cret-value"
H1 = "4f3af38ad1c31646561bc814c3e69af5"
H2 = "0123456789abcdef0123456789abcdef"
H3 = "fedcba9876543210fedcba9876543210"
MAPPING = {"username": "interaction.author.username", "sentiment": "salience.content.sentiment",
           "id": "twitter.user.screen_name", "hash": "$hash", "deleted": "$deleted"}


def creds(url, key=SECRET, username="user"):
    return integration("datasift", username=username, **{"api-key": key, "stream-url": url})


def on_sim(sim):
    return creds(sim.url)


def spec(lid, stream_hash, **extra):
    return listener(id=lid, type="datasift", options={"hash": stream_hash}, mapping=MAPPING, **extra)


def config(tmp_path, backoff=0.05, **sources):
    return Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                  "supervisor": {"backoff-initial": backoff, "backoff-max": max(backoff, 0.3),
                                                 "stop-timeout": 3},
                                  "sources": sources})


@contextlib.asynccontextmanager
async def running(tmp_path, listeners, cfg=None, **sim_args):
    """A simulator, a harness and a started supervisor; everything stopped afterwards."""
    sim_args.setdefault("users", {"user": SECRET})
    sim_args.setdefault("tick_interval", 0.2)
    async with DataSiftSim(**sim_args) as sim, Harness(tmp_path, cfg or config(tmp_path)) as h:
        sup = h.supervisor()
        want = {("t1", lid): desired(spec(lid, hh), c(sim) if callable(c) else c) for lid, hh, c in listeners}
        await sup.start(want)
        yield sim, h, sup  # the harness stops the supervisor, also when the test fails


async def streaming(sim, *pairs):
    """Each (status record, hash): the listener is `started` and an open simulator socket follows the hash.

    A listener is `started` once its subscribe is sent; the simulator applies it a moment later, and
    anything published before that would reach nobody.
    """
    def ready():
        live = [c for c in sim.connections if c.ws.state is State.OPEN]
        return all(r.status == "started" and any(h in c.hashes for c in live) for r, h in pairs)

    await wait_for(ready, what="listeners started and subscribed at the simulator")


def errors(h, lid, kind, tenant="t1"):
    return h.metrics.listener_errors.labels(tenant, lid, kind)._value.get()


async def test_interactions_and_deletes_are_mapped_with_stable_distinct_ids(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)  # websockets logs its request line (query included) at DEBUG
    with capture_logs() as logs:
        async with running(tmp_path, [("A", H1, on_sim)]) as (sim, h, sup):
            record = sup.status(("t1", "A"))
            await streaming(sim, (record, H1))
            assert record.message == f"Connected to stream: {H1}"
            data = await sim.interaction(H1, username="alice", sentiment=3)
            await sim.delete(H1, data["interaction"]["id"])
            await wait_for(lambda: record.received == 2, what="two events")
            first, second = await h.events("t1", "A")
            iid = data["interaction"]["id"]
            assert first["event"] == {"username": "alice", "sentiment": 3, "id": "alice", "hash": H1,
                                      "deleted": False}
            assert first["id"] == event_id("t1", "A", iid)
            assert first["source"] == "datasift"
            assert second["event"] == {"hash": H1, "deleted": True}
            assert second["id"] == event_id("t1", "A", f"deleted:{iid}") != first["id"]
            assert sim.actions == [{"username": "user", "action": "subscribe", "hash": H1}]
    assert logs, "the source logs its connection"
    assert SECRET not in repr(logs)
    assert SECRET not in caplog.text and SECRET not in repr([r.args for r in caplog.records])


async def test_listeners_share_one_socket_and_deleting_one_unsubscribes_it_live(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        await wait_for(lambda: sim.subscribed() == {H1, H2}, what="both hashes subscribed")
        assert sim.connects == 1 and len(sim.connections) == 1
        assert b.message == f"Connected to stream: {H2}"
        await sim.interaction(H1)
        await sim.interaction(H2)
        await wait_for(lambda: a.received == 1 and b.received == 1, what="one event each")

        # a third listener joins the live socket; one with other credentials gets its own socket
        c_spec, d_spec = spec("C", H3), spec("D", H1)
        sim.users["other"] = "other-key"
        want = {("t1", "A"): desired(spec("A", H1), creds(sim.url)),
                ("t1", "B"): desired(spec("B", H2), creds(sim.url)),
                ("t1", "C"): desired(c_spec, creds(sim.url)),
                ("t2", "D"): desired(d_spec, creds(sim.url, key="other-key", username="other"))}
        await sup.reconcile(want)
        c, d = sup.status(("t1", "C")), sup.status(("t2", "D"))
        await streaming(sim, (c, H3), (d, H1))
        await wait_for(lambda: sim.subscribed("user") == {H1, H2, H3} and sim.subscribed("other") == {H1})
        assert sim.connects == 2

        # deleting A: its hash is unsubscribed on the live socket; B and C keep streaming
        del want[("t1", "A")]
        await sup.reconcile(want)
        await wait_for(lambda: sim.actions_for(H1)[-1:] == ["unsubscribe"] and H1 not in sim.subscribed("user"),
                       what="unsubscribe of A's hash")
        assert sim.connects == 2
        await sim.interaction(H2)
        await sim.interaction(H3)
        await wait_for(lambda: b.received == 2 and c.received == 1, what="B and C still streaming")
        assert b.status == c.status == "started"

        # the last listener of a socket closes it
        await sup.reconcile({("t2", "D"): want[("t2", "D")]})
        await wait_for(lambda: sim.subscribed("user") == set() and len(sim.connections) == 1,
                       what="user's socket closed")


async def test_two_listeners_on_the_same_hash_both_receive_it_and_it_stays_subscribed(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H1, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H1))
        data = await sim.interaction(H1)
        await wait_for(lambda: a.received == b.received == 1)
        ea, eb = (await h.events("t1", "A"))[0], (await h.events("t1", "B"))[0]
        assert ea["id"] != eb["id"] and ea["event"]["username"] == data["interaction"]["author"]["username"]
        await sup.reconcile({("t1", "B"): desired(spec("B", H1), creds(sim.url))})
        await wait_for(lambda: sup.status(("t1", "A")) is None)
        assert sim.actions_for(H1) == ["subscribe"] and sim.subscribed() == {H1}
        await sim.interaction(H1)
        await wait_for(lambda: b.received == 2)


@pytest.mark.parametrize("reject_http", [False, True], ids=["failure-frame", "http-401"])
async def test_bad_credentials_fail_every_listener_of_the_socket_without_retrying(tmp_path, reject_http):
    async with running(tmp_path, [("A", H1, lambda s: creds(s.url, key="wrong-" + SECRET)),
                                  ("B", H2, lambda s: creds(s.url, key="wrong-" + SECRET))],
                       reject_http=reject_http) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await wait_for(lambda: a.status == b.status == "failed", what="both failed")
        assert "credentials" in a.message and "credentials" in b.message
        assert SECRET not in a.message + str(a.last_error)
        rejected = sim.rejected
        assert rejected == 1  # one shared socket
        await asyncio.sleep(0.3)  # a retry would have happened by now at a 0.05 s back-off
        assert sim.rejected == rejected and a.status == "failed"


async def test_connection_refused_is_retried_with_back_off(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/multi"
    async with running(tmp_path, [("A", H1, creds(url))]) as (sim, h, sup):
        a = sup.status(("t1", "A"))
        await wait_for(lambda: a.attempts >= 3, what="three attempts")
        assert a.status in ("retrying", "starting")
        assert f"Cannot connect to DataSift at {url}" in a.last_error
        assert SECRET not in a.message + a.last_error and "api_key" not in a.last_error


async def test_abrupt_drop_reconnects_and_resubscribes_every_hash(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        await sim.interaction(H1)
        await wait_for(lambda: a.received == 1)
        await sim.drop()
        await wait_for(lambda: sim.connects >= 2 and sim.subscribed() == {H1, H2}, what="resubscribed")
        await streaming(sim, (a, H1), (b, H2))
        assert "Connection to DataSift lost" in a.last_error
        assert sim.actions_for(H1) == ["subscribe", "subscribe"] and sim.actions_for(H2) == ["subscribe", "subscribe"]
        await sim.interaction(H1)
        await sim.interaction(H2)
        await wait_for(lambda: a.received == 2 and b.received == 1, what="events after reconnect")


async def test_reconnect_message_reconnects_at_once_despite_a_long_back_off(tmp_path):
    cfg = config(tmp_path, backoff=20)
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)], cfg=cfg) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        sent_at = time.monotonic()
        await sim.send_reconnect()
        await wait_for(lambda: sim.connects == 2 and sim.subscribed() == {H1, H2}, timeout=5, what="reconnect")
        assert time.monotonic() - sent_at < 5  # the back-off (20 s) was not applied
        await streaming(sim, (a, H1), (b, H2))
        assert a.last_error == "DataSift asked for a reconnect"
        await wait_for(lambda: len(sim.connections) == 1, what="the old socket closed")


async def test_silence_past_the_bound_means_a_reconnect_at_once(tmp_path):
    cfg = config(tmp_path, backoff=20, **{"datasift-silence-timeout": 1.0})
    async with running(tmp_path, [("A", H1, on_sim)], cfg=cfg, tick_interval=0.1) as (sim, h, sup):
        a = sup.status(("t1", "A"))
        await streaming(sim, (a, H1))
        assert sup.runners[("t1", "A")].ctx.heartbeat_bound == 1.0  # the supervisor's watchdog uses it too
        await asyncio.sleep(1.3)  # ticks every 0.1 s keep the 1 s bound satisfied
        assert sim.connects == 1 and a.status == "started"
        sim.silence()
        silent_at = time.monotonic()
        await wait_for(lambda: sim.connects >= 2, what="reconnect after silence")
        assert time.monotonic() - silent_at < 5  # at once: the 20 s back-off was not applied
        assert a.last_error == "No data or tick from DataSift for 1s; reconnecting"
        sim.silence(False)
        await streaming(sim, (a, H1))
        await sim.interaction(H1)
        await wait_for(lambda: a.received == 1)


async def test_malformed_and_oversized_frames_are_counted_and_not_fatal(tmp_path):
    cfg = config(tmp_path, **{"max-frame-bytes": 4096})
    async with running(tmp_path, [("A", H1, on_sim)], cfg=cfg) as (sim, h, sup):
        a = sup.status(("t1", "A"))
        await streaming(sim, (a, H1))
        await sim.warn("You are close to your stream limit", H1)
        await sim.send_malformed()
        await sim.send_oversized(20_000, H1)
        await sim.publish(H1, ["not", "an", "object"])
        data = await sim.interaction(H1)
        await wait_for(lambda: a.received == 1, what="the good event")
        assert errors(h, "A", "malformed") == 3
        assert errors(h, "A", "oversized") == 1
        assert (await h.events("t1", "A"))[0]["id"] == event_id("t1", "A", data["interaction"]["id"])
        assert sim.connects == 1 and a.status == "started"


async def test_failure_naming_a_hash_fails_that_listener_only(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        await sim.fail_hash(H1)
        await wait_for(lambda: a.status == "failed", what="A failed")
        assert a.message == f"DataSift refused stream {H1}: The hash {H1} does not exist"
        await sim.interaction(H2)
        await wait_for(lambda: b.received == 1)
        assert b.status == "started" and sim.connects == 1
        assert "unsubscribe" not in sim.actions_for(H1)


async def test_unknown_hash_at_subscribe_fails_that_listener_only(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)], hashes={H2}) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await wait_for(lambda: a.status == "failed" and b.status == "started")
        assert H1 in a.message and "does not exist" in a.message


async def test_failure_about_credentials_on_a_live_socket_fails_all_its_listeners(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        await sim.fail_credentials()
        await wait_for(lambda: a.status == b.status == "failed", what="both failed")
        assert a.message.startswith("DataSift refused the credentials: ")
        assert sim.connects == 1


async def test_a_failure_about_neither_credentials_nor_a_stream_is_retried(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        await sim.send_raw('{"status": "failure", "message": "Internal error, please try again"}')
        await wait_for(lambda: a.attempts >= 1 and b.attempts >= 1, what="both retried")
        assert a.last_error.startswith("DataSift reported a failure: Internal error")
        await wait_for(lambda: a.status == b.status == "started" and sim.connects == 2, what="back on a new socket")


async def test_a_changed_definition_restarts_one_listener_on_the_live_shared_socket(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        c = creds(sim.url)
        changed = listener(id="A", type="datasift", options={"hash": H3},
                           mapping={"who": "interaction.author.username"})
        changes = await sup.reconcile({("t1", "A"): desired(changed, c), ("t1", "B"): desired(spec("B", H2), c)})
        assert changes["restarted"] == [("t1", "A")] and changes["unchanged"] == [("t1", "B")]
        await wait_for(lambda: a.message == f"Connected to stream: {H3}" and sim.subscribed() == {H2, H3},
                       what="A moved to its new hash")
        assert sim.actions_for(H1) == ["subscribe", "unsubscribe"] and sim.connects == 1
        await sim.interaction(H3, username="zoe")
        await wait_for(lambda: a.received == 1)
        assert (await h.events("t1", "A"))[0]["event"] == {"who": "zoe"}


async def test_a_frame_beyond_the_transport_cap_ends_the_connection_and_is_retried(tmp_path):
    cfg = config(tmp_path, **{"max-frame-bytes": 1024})  # counted-and-skipped up to 1 KiB x 16, closed beyond
    async with running(tmp_path, [("A", H1, on_sim)], cfg=cfg) as (sim, h, sup):
        a = sup.status(("t1", "A"))
        await streaming(sim, (a, H1))
        await sim.send_oversized(8_000, H1)
        await wait_for(lambda: errors(h, "A", "oversized") == 1, what="skipped, counted")
        await sim.send_oversized(40_000, H1)
        await wait_for(lambda: sim.connects == 2 and a.status == "started", what="reconnected")
        assert errors(h, "A", "oversized") == 1
        assert "closed by listenerd (code 1009" in a.last_error


# ---------------------------------------------------------------- issue 13: scoping, confirmation, back-off


async def test_a_failure_naming_hashes_in_a_list_fails_those_listeners_and_keeps_the_socket(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim), ("C", H3, on_sim)]) as (sim, h, sup):
        a, b, c = (sup.status(("t1", x)) for x in "ABC")
        await streaming(sim, (a, H1), (b, H2), (c, H3))
        await sim.fail_hashes([H1, H3], "These streams were stopped")
        await wait_for(lambda: a.status == c.status == "failed", what="A and C failed")
        assert a.message == f"DataSift refused stream {H1}: These streams were stopped"
        assert c.message == f"DataSift refused stream {H3}: These streams were stopped"
        await sim.interaction(H2)
        await wait_for(lambda: b.received == 1, what="B still streaming")
        assert b.status == "started" and sim.connects == 1 and len(sim.connections) == 1
        assert "unsubscribe" not in sim.actions_for(H1) + sim.actions_for(H3)


async def test_a_warning_that_a_hash_does_not_exist_fails_that_listener_only(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim), ("C", H3, on_sim)],
                       hashes={H2, H3}, missing="warning") as (sim, h, sup):
        a, b, c = (sup.status(("t1", x)) for x in "ABC")
        await wait_for(lambda: a.status == "failed" and b.status == c.status == "started",
                       what="A failed at its subscribe, B and C started")
        assert a.message == f"DataSift refused stream {H1}: The hash {H1} doesn't exist"
        await sim.warn_missing(H3)  # a stream deleted while it runs
        await wait_for(lambda: c.status == "failed", what="C failed")
        await sim.interaction(H2)
        await wait_for(lambda: b.received == 1)
        assert b.status == "started" and sim.connects == 1


async def test_started_waits_for_datasift_to_confirm_or_for_a_first_interaction(tmp_path, monkeypatch):
    monkeypatch.setattr("listenerd.sources.datasift_protocol.CONFIRM_WAIT", 0.5)
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)], confirm=False) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await wait_for(lambda: sim.subscribed() == {H1, H2}, what="both subscribed, unconfirmed")
        assert a.status == b.status == "starting"  # ticks flow, but nothing says the subscriptions hold
        waited = f"Subscribed to stream {H1}; DataSift has not confirmed it after 0.5s"
        await wait_for(lambda: a.message == b.message.replace(H2, H1) == waited, what="the wait's message")
        assert a.status == b.status == "starting"
        await sim.interaction(H1)  # the first interaction proves A's subscription
        await wait_for(lambda: a.status == "started" and a.received == 1, what="A started by its first event")
        assert b.status == "starting"
        sim.confirm = True
        await sup.reconcile({("t1", "A"): desired(spec("A", H1), creds(sim.url)),
                             ("t1", "C"): desired(spec("C", H3), creds(sim.url))})  # B leaves, C joins
        c = sup.status(("t1", "C"))
        await wait_for(lambda: c.status == "started", what="C started on DataSift's confirmation")
        assert c.message == f"Connected to stream: {H3}" and sim.connects == 1


async def test_a_dropped_socket_comes_back_after_datasifts_linear_back_off_for_every_listener(tmp_path):
    async with running(tmp_path, [("A", H1, on_sim), ("B", H2, on_sim)]) as (sim, h, sup):
        a, b = sup.status(("t1", "A")), sup.status(("t1", "B"))
        await streaming(sim, (a, H1), (b, H2))
        await sim.drop()
        await wait_for(lambda: a.status == b.status == "retrying", what="both retrying")
        # the supervisor's 0.05 s back-off is not used: DataSift's client waits 1 s after a network error
        assert "; next attempt in 1.0s" in a.message and "; next attempt in 1.0s" in b.message
        dropped_at = time.monotonic()
        await wait_for(lambda: sim.connects == 2, what="one new socket")
        assert time.monotonic() - dropped_at > 0.8
        await streaming(sim, (a, H1), (b, H2))
        assert sim.connects == 2  # both listeners came back onto one socket
