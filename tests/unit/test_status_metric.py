"""`listenerd_listener_status`: made from the status records at each scrape, in the labelled gauge's format."""

import sys
import threading

from prometheus_client import CollectorRegistry, Gauge, generate_latest

from listenerd.observability import Metrics
from listenerd.status import STATES, ListenerStatus


def as_a_labelled_gauge(records: list[ListenerStatus]) -> bytes:
    """What the labelled Gauge it replaces printed for the same records."""
    registry = CollectorRegistry()
    gauge = Gauge("listenerd_listener_status", "1 for the listener's current status", ("tenant", "listener", "status"),
                  registry=registry)
    for record in records:
        for state in STATES:
            gauge.labels(record.tenant_id, record.listener_id, state).set(1 if state == record.status else 0)
    return generate_latest(registry)


def status_lines(page: bytes) -> list[str]:
    return [line for line in page.decode().splitlines() if "listenerd_listener_status" in line]


def test_the_page_is_the_labelled_gauges_and_follows_each_change_and_removal():
    metrics = Metrics()
    records = {}
    metrics.status.watch(records)
    for tenant, listener in (("t1", "L1"), ("t1", "L2"), ("t2", "L1")):
        records[(tenant, listener)] = ListenerStatus(tenant, listener)
    records[("t1", "L1")].set("started", "Subscribed to channel: a")
    records[("t2", "L1")].set("retrying", "Connection refused")
    assert status_lines(generate_latest(metrics.registry)) == status_lines(as_a_labelled_gauge(list(records.values())))
    assert 'listenerd_listener_status{listener="L1",status="started",tenant="t1"} 1.0' in status_lines(
        generate_latest(metrics.registry))
    records[("t1", "L1")].set("failed", "Unknown channel")
    del records[("t1", "L2")]  # a deleted listener's series go with its record
    page = status_lines(generate_latest(metrics.registry))
    assert page == status_lines(as_a_labelled_gauge(list(records.values())))
    assert not any('listener="L2"' in line for line in page)
    assert 'listenerd_listener_status{listener="L1",status="failed",tenant="t1"} 1.0' in page


def test_a_scrape_on_another_thread_while_listeners_come_and_go_never_fails():
    """/metrics renders on a worker thread while the loop adds and removes records."""
    metrics = Metrics()
    records = {}
    metrics.status.watch(records)
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        while not done.is_set():
            try:
                generate_latest(metrics.registry)
            except BaseException as exc:  # noqa: BLE001 - what the test is about
                errors.append(exc)
                return

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads take turns as often as they can: a race shows at once
    thread = threading.Thread(target=scrape)
    thread.start()
    try:
        for i in range(20_000):
            records[("t", f"L{i}")] = ListenerStatus("t", f"L{i}")
            if i >= 2_000:
                del records[("t", f"L{i - 2_000}")]
    finally:
        done.set()
        thread.join()
        sys.setswitchinterval(interval)
    assert errors == []
