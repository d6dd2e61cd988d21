"""Every provider connection names its node in its `User-Agent` (`net.user_agent`), and the simulators
record it with the connection's times and subscriptions (`connection_log`): the cluster chaos bench
measures from those whether a group was ever subscribed from two nodes at once."""

import time

import pytest

from listenerd import version
from listenerd.model import Config
from listenerd.sim.datasift import DataSiftSim
from listenerd.sim.pusher import PusherSim
from listenerd.sim.salesforce import SalesforceSim
from tests.harness import Harness, desired, integration, listener, wait_for

HASH = "ab" * 16


@pytest.fixture
async def sims():
    pusher = PusherSim("1", "ua-key", "ua-secret")
    datasift = DataSiftSim(users={"ua-user": "ua-api-key"})
    salesforce = SalesforceSim(users={"sf@example.com": "pwtok"}, clients={"ck": "cs"}, long_poll=0.5)
    salesforce.create_topic("Orders", "SELECT Id FROM Order__c")
    async with pusher, datasift, salesforce:
        yield pusher, datasift, salesforce


def wants(pusher, datasift, salesforce):
    creds = {
        "pusher": integration("pusher", key="ua-key", secret="ua-secret", **{"app-id": "1"}, host="127.0.0.1",
                              port=pusher.port, tls=False),
        "datasift": integration("datasift", username="ua-user", **{"api-key": "ua-api-key",
                                                                   "stream-url": datasift.url}),
        "salesforce": integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs",
                                                   "username": "sf@example.com", "password": "pw",
                                                   "secret-token": "tok", "login-url": salesforce.url}),
    }
    options = {"pusher": {"channel": "orders"}, "datasift": {"hash": HASH}, "salesforce": {"topic": "Orders"}}
    return {("t1", kind): desired(listener(id=kind, type=kind, options=options[kind], mapping={"id": "id"}),
                                  creds[kind]) for kind in creds}


@pytest.mark.parametrize("node", ["n7", None])
async def test_each_source_names_its_node_and_the_simulators_record_it(tmp_path, sims, node):
    pusher, datasift, salesforce = sims
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    expected = f"listenerd/{version()} (node {node})" if node else f"listenerd/{version()}"
    began = time.time()
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        sup.node = node
        want = wants(pusher, datasift, salesforce)
        await sup.start(want)
        await wait_for(lambda: all(sup.status(k).status == "started" for k in want), what="all three started")
        logs = {"pusher": pusher.connection_log, "datasift": datasift.connection_log,
                "salesforce": salesforce.connection_log}
        subscribed = {"pusher": "orders", "datasift": HASH, "salesforce": "/topic/Orders"}
        for kind, log in logs.items():
            assert [r.user_agent for r in log] == [expected], kind
            (record,) = log
            assert record.closed_at is None and began <= record.opened_at <= time.time()
            assert [s.name for s in record.subscriptions] == [subscribed[kind]], kind
            assert record.subscriptions[0].at >= record.opened_at and record.subscriptions[0].until is None
        await sup.stop()
        await wait_for(lambda: all(log[0].closed_at is not None for log in logs.values()), what="closes recorded")
        for kind, log in logs.items():
            assert log[0].subscriptions[0].until is not None and log[0].subscriptions[0].until <= log[0].closed_at, kind
