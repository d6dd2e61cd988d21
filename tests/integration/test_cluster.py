"""Cluster mode, for real: daemon processes sharing one PostgreSQL database, a Pusher simulator and an
engine simulator. The short versions of the chaos scenarios (bench/chaos/cluster.py): a node killed,
a node stopped with SIGTERM (hand-over), a node paused past its lease; every route on every node."""

import asyncio
import json
import os
import signal
import time

import pytest

from listenerd.sim.engine import EngineSim
from listenerd.sim.pusher import PusherSim
from listenerd.testing import wait_for
from tests.daemon import Api, DaemonProcess, base_config

KEY, SECRET = "cl-key", "cl-secret-value-123"
TENANTS = ("t1", "t2", "t3", "t4")
TTL = 2.0


def tenants(pusher_port: int) -> str:
    out = []
    for tenant in TENANTS:
        out.append(f"""
[[tenants]]
id = "{tenant}"
[tenants.integrations.pusher]
key = "{KEY}"
secret = "{SECRET}"
app-id = "1"
host = "127.0.0.1"
port = {pusher_port}
tls = false
[[tenants.listeners]]
id = "P1"
type = "pusher"
options = {{ channel = "{tenant}-a" }}
[[tenants.listeners]]
id = "P2"
type = "pusher"
options = {{ channel = "{tenant}-b" }}
""")
    return "".join(out)


def node_config(tmp_path, node, pg_url, engine, pusher):
    text = base_config(tmp_path, engine.url, tenants(pusher.port))
    store = f'[store]\npath = "{tmp_path / "listenerd.db"}"\n'
    assert store in text
    key = tmp_path / "secrets.key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
    text = text.replace(store, f'[store]\nurl = "{pg_url}"\nsecrets-key-file = "{key}"\n\n'
                               f'[cluster]\nnode-id = "{node}"\nlease-ttl = "{TTL}s"\n')
    return text


@pytest.fixture
async def cluster(tmp_path, pg_url, started):
    engine = await started(EngineSim())
    pusher = await started(PusherSim("1", KEY, SECRET))
    nodes = {}

    async def start(name):
        workdir = tmp_path / name
        workdir.mkdir(exist_ok=True)
        node = DaemonProcess(workdir, node_config(tmp_path, name, pg_url, engine, pusher), name=name)
        await node.start()
        nodes[name] = node
        return node

    yield engine, pusher, start, nodes, started
    for node in nodes.values():
        if node.process and node.process.poll() is None:
            node.signal(signal.SIGCONT)
        await node.stop()


async def placement(api):
    """(tenant, listener) -> (status, node) as one node's API answers for every listener."""
    out = {}
    for tenant in TENANTS:
        for listener in ("P1", "P2"):
            code, body = await api.call("GET", f"/1.0/tenants/{tenant}/listeners/{listener}/status")
            out[(tenant, listener)] = (body.get("status"), body.get("node")) if code == 200 else (code, None)
    return out


async def settled(api, nodes):
    """Every listener started, on `nodes` (each running some: the groups are spread), both listeners of a
    tenant (one group) on the same node."""
    async def check():
        seen = await placement(api)
        if all(s == "started" for s, _ in seen.values()) and {n for _, n in seen.values()} == set(nodes) and \
                all(seen[(t, "P1")][1] == seen[(t, "P2")][1] for t in TENANTS):
            return seen
        return None
    return await wait_for(check, timeout=30, interval=0.2, what=f"every listener started on {nodes}")


async def first_tapped(api, tenant, listener):
    """The first event the tap of this listener streams through `api`'s node."""
    async with api.session.get(f"{api.base_url}/1.0/tenants/{tenant}/listeners/{listener}/tap",
                               headers={"Authorization": f"Bearer {api.token}"}) as response:
        assert response.status == 200, await response.text()
        async for line in response.content:
            if line.startswith(b"data: "):
                return json.loads(line[6:])


async def publish_all(pusher, label, count=3):
    for tenant in TENANTS:
        for channel in ("a", "b"):
            for i in range(count):
                await pusher.publish(f"{tenant}-{channel}", "ev", {"label": label, "i": i})


def delivered(engine, label):
    return sorted((e["tenant-id"], e["listener-id"], e["event"]["i"]) for e in engine.received
                  if isinstance(e["event"], dict) and e["event"].get("label") == label)


def expected(count=3):
    return sorted((t, lid, i) for t in TENANTS for lid in ("P1", "P2") for i in range(count))


async def wait_delivered(engine, label, count=3):
    await wait_for(lambda: set(delivered(engine, label)) >= set(expected(count)), timeout=30,
                   what=f"events {label} delivered")


async def test_two_nodes_share_the_groups_answer_for_every_listener_and_a_killed_node_moves_in_seconds(cluster):
    engine, pusher, start, nodes, started = cluster
    a, b = await start("a"), await start("b")
    api_a, api_b = await started(Api(a.api_url)), await started(Api(b.api_url))
    seen = await settled(api_a, {"a", "b"})
    assert sorted(n for _, n in seen.values()) == ["a"] * 4 + ["b"] * 4, "four groups of two: two on each node"
    assert await placement(api_b) == seen, "every node answers for every listener, with its owner's node"
    # the provider sees each group's connection come from its owner: the User-Agent names the node
    live = {s.name: r.user_agent for r in pusher.connection_log if r.closed_at is None for s in r.subscriptions}
    for (tenant, listener), (_, node) in seen.items():
        channel = f"{tenant}-{'a' if listener == 'P1' else 'b'}"
        assert live[channel].endswith(f" (node {node})") and live[channel].startswith("listenerd/"), live
    code, ready = await api_a.call("GET", "/readyz", token=None)
    assert code == 200 and ready["cluster"] is True
    _, metrics = await api_a.call("GET", "/metrics", token=False)
    assert "listenerd_cluster_nodes 2.0" in metrics and "listenerd_cluster_groups_owned 2.0" in metrics
    assert "listenerd_cluster_lease_age_seconds" in metrics
    elsewhere = next(k for k, (_, node) in seen.items() if node == "b")
    tapping = asyncio.create_task(first_tapped(api_a, *elsewhere))  # a tap on a, of a listener that runs on b
    await asyncio.sleep(0.5)
    await publish_all(pusher, "before")
    assert (await asyncio.wait_for(tapping, 10))["event"]["label"] == "before"
    await wait_delivered(engine, "before")

    killed = time.monotonic()
    b.kill9()
    moved = await settled(api_a, {"a"})
    took = time.monotonic() - killed
    assert took < TTL + 5, f"the killed node's groups started on the survivor {took:.1f}s after the kill"
    assert all(n == "a" for _, n in moved.values())
    await publish_all(pusher, "after")
    await wait_delivered(engine, "after")


async def test_sigterm_hands_the_groups_over_at_once(cluster):
    engine, pusher, start, nodes, started = cluster
    a, b = await start("a"), await start("b")
    api_a = await started(Api(a.api_url))
    await settled(api_a, {"a", "b"})
    stopped = time.monotonic()
    assert await b.stop() == 0
    await settled(api_a, {"a"})
    assert time.monotonic() - stopped < TTL, "handed over at once, not after the lease TTL"
    await publish_all(pusher, "handed")
    await wait_delivered(engine, "handed")


async def test_a_paused_node_commits_nothing_after_its_lease_lapsed_and_stands_down(cluster):
    engine, pusher, start, nodes, started = cluster
    a, b = await start("a"), await start("b")
    api_a = await started(Api(a.api_url))
    await settled(api_a, {"a", "b"})
    b.signal(signal.SIGSTOP)
    await settled(api_a, {"a"})  # after the TTL: a took b's groups
    await publish_all(pusher, "paused")  # b's sockets still hold its subscriptions: it reads these on resume
    await wait_delivered(engine, "paused")
    b.signal(signal.SIGCONT)
    await wait_for(lambda: any(line.get("event", "").startswith(("standing down", "lease lost"))
                               for line in b.lines()), timeout=15, what="the resumed node standing down")
    await asyncio.sleep(1.0)
    # each event once: what b read after its lease lapsed was refused by the fence, never committed
    got = delivered(engine, "paused")
    assert sorted(set(got)) == expected() and len(got) == len(expected()), got
    await publish_all(pusher, "rejoined")
    await wait_delivered(engine, "rejoined")


async def test_an_api_write_on_one_node_is_applied_by_the_owner_at_once(cluster):
    engine, pusher, start, nodes, started = cluster
    a, b = await start("a"), await start("b")
    api_a, api_b = await started(Api(a.api_url)), await started(Api(b.api_url))
    seen = await settled(api_a, {"a", "b"})
    tenant = next(t for (t, _), (_, node) in seen.items() if node == "b")
    written = time.monotonic()
    code, created = await api_a.call("POST", f"/1.0/tenants/{tenant}/listeners",
                                     {"id": "P3", "type": "pusher", "options": {"channel": f"{tenant}-c"}})
    assert code == 201, created

    async def running_on_b():
        code, body = await api_b.call("GET", f"/1.0/tenants/{tenant}/listeners/P3/status")
        return code == 200 and body["status"] == "started" and body.get("node") == "b"
    await wait_for(running_on_b, timeout=10, interval=0.05, what="P3 started by its group's owner")
    assert time.monotonic() - written < 2.0, "applied by the owner through NOTIFY, not a poll"

    async def answered_on_a():  # a reads b's status record, written within a second
        code, body = await api_a.call("GET", f"/1.0/tenants/{tenant}/listeners/P3/status")
        return code == 200 and body["status"] == "started" and body.get("node") == "b"
    await wait_for(answered_on_a, timeout=5, interval=0.1, what="a answering for P3 from b's record")
    await pusher.publish(f"{tenant}-c", "ev", {"label": "new", "i": 0})
    await wait_for(lambda: any(e["listener-id"] == "P3" for e in engine.received), what="P3's event delivered")

    code, _ = await api_a.call("POST", f"/1.0/tenants/{tenant}/listeners/P3/restart")
    assert code == 202

    async def restarted_on_b():
        code, body = await api_b.call("GET", f"/1.0/tenants/{tenant}/listeners/P3/status")
        return code == 200 and body["status"] == "started" and sum(
            1 for h in body["history"] if h["status"] == "started") >= 2
    await wait_for(restarted_on_b, timeout=10, interval=0.1, what="P3 restarted by its owner, asked through a")

    assert (await api_a.call("DELETE", f"/1.0/tenants/{tenant}/listeners/P3"))[0] == 204

    async def gone_everywhere():
        codes = [(await api.call("GET", f"/1.0/tenants/{tenant}/listeners/P3/status"))[0] for api in (api_a, api_b)]
        return codes == [404, 404]
    await wait_for(gone_everywhere, timeout=5, interval=0.1, what="P3 gone on both nodes")
    await wait_for(lambda: not pusher.subscribers(f"{tenant}-c"), what="P3's subscription closed by its owner")


async def test_a_checkpoint_set_on_another_node_restarts_the_listener_from_there_on_its_owner(tmp_path, pg_url,
                                                                                              started):
    from listenerd.sim.salesforce import SalesforceSim

    engine = await started(EngineSim())
    pusher = await started(PusherSim("1", KEY, SECRET))
    salesforce = SalesforceSim(users={"sf@example.com": "pw" + "tok"}, clients={"ck": "cs-secret-1"}, long_poll=0.5)
    salesforce.create_topic("Orders", "SELECT Id, n FROM Order__c")
    await started(salesforce)
    extra = f"""
[[tenants]]
id = "s1"
[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "cs-secret-1"
username = "sf@example.com"
password = "pw"
secret-token = "tok"
login-url = "{salesforce.url}"
[[tenants.listeners]]
id = "S1"
type = "salesforce"
options = {{ topic = "Orders" }}
mapping = {{ seq = "n" }}
"""
    nodes = {}
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        nodes[name] = await started(DaemonProcess(tmp_path / name, node_config(tmp_path, name, pg_url, engine, pusher)
                                                  + extra, name=name))
    apis = {name: await started(Api(node.api_url)) for name, node in nodes.items()}

    async def owner():
        code, body = await apis["a"].call("GET", "/1.0/tenants/s1/listeners/S1/status")
        return body.get("node") if code == 200 and body.get("status") == "started" else None
    runs_on = await wait_for(owner, timeout=30, interval=0.1, what="S1 started")
    other = "b" if runs_on == "a" else "a"
    replays = [salesforce.publish("Orders", {"Id": f"a00{i:015d}", "n": i}) for i in range(3)]

    def seqs():
        return [e["event"].get("seq") for e in engine.received if e["listener-id"] == "S1"]
    await wait_for(lambda: sorted(seqs()) == [0, 1, 2], what="three events delivered")
    code, body = await apis[other].call("PUT", "/1.0/tenants/s1/listeners/S1/checkpoint", {"replay": replays[0]})
    assert code == 200, body
    # the owner restarts S1 from the first event's replayId: the two after it come again (same ids)
    await wait_for(lambda: sorted(seqs()) == [0, 1, 1, 2, 2], timeout=15, what="replayed from the checkpoint")


async def test_events_a_deleted_listener_left_waiting_are_still_delivered(cluster):
    """Committed events of a listener deleted through the API while the engine was away go out from one node,
    as they would on a single node, once the engine is back: none is stranded in the shared outbox."""
    engine, pusher, start, nodes, started = cluster
    a, _ = await start("a"), await start("b")
    api_a = await started(Api(a.api_url))
    seen = await settled(api_a, {"a", "b"})
    tenant = next(t for (t, _), (_, node) in seen.items() if node == "b")
    code, created = await api_a.call("POST", f"/1.0/tenants/{tenant}/listeners",
                                     {"id": "P3", "type": "pusher", "options": {"channel": f"{tenant}-c"}})
    assert code == 201, created

    async def status(*wanted):
        code, body = await api_a.call("GET", f"/1.0/tenants/{tenant}/listeners/P3/status")
        return code == 200 and body["status"] == "started" and body.get("received", 0) >= wanted[0]
    await wait_for(lambda: status(0), timeout=10, interval=0.1, what="P3 started")
    await engine.refuse()
    await pusher.publish(f"{tenant}-c", "ev", {"label": "orphan", "i": 0})
    await wait_for(lambda: status(1), timeout=10, interval=0.05, what="the first event committed (and sent)")
    await asyncio.sleep(0.2)  # the forwarder retries the batch it holds: the others wait in the outbox
    for i in range(1, 5):
        await pusher.publish(f"{tenant}-c", "ev", {"label": "orphan", "i": i})
    await wait_for(lambda: status(5), timeout=10, interval=0.1, what="five events committed, the engine away")
    assert (await api_a.call("DELETE", f"/1.0/tenants/{tenant}/listeners/P3"))[0] == 204
    await engine.accept()
    await wait_for(lambda: sorted(i for t, lid, i in delivered(engine, "orphan")) == list(range(5)), timeout=20,
                   what="the deleted listener's waiting events delivered")
    await asyncio.sleep(0.5)
    got = delivered(engine, "orphan")
    assert got == sorted(set(got)), "each once: one node forwards them, not every node"
