"""Store failures gathered into episodes: the metric per failure, one log line per episode and period, the end."""

import sqlite3

from structlog.testing import capture_logs

from listenerd.observability import Metrics
from listenerd.store_health import StoreHealth, is_store_error

FULL = sqlite3.OperationalError("database or disk is full")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_an_episode_logs_its_start_a_count_per_period_and_its_end():
    clock, metrics = Clock(), Metrics()
    health = StoreHealth(metrics, "/var/lib/listenerd/listenerd.db", report_every=30, clock=clock)
    with capture_logs() as logs:
        for _ in range(1000):  # a storm of failures within one period: one line
            health.failed("commit", FULL)
            clock.now += 0.01
        assert [e["event"] for e in logs] == ["store failing; retrying with back-off (events wait in memory, "
                                              "sources pause at the bound)"]
        assert logs[0]["error"] == "database or disk is full" and logs[0]["op"] == "commit"
        assert logs[0]["path"] == "/var/lib/listenerd/listenerd.db" and "exc_info" not in logs[0]
        clock.now += 30
        health.failed("commit", FULL)
        assert logs[-1]["event"] == "store still failing" and logs[-1]["failures"] == 1000
        health.failed("commit", FULL)
        assert len(logs) == 2
        assert health.failing and "database or disk is full" in health.describe()
        health.succeeded("commit")
        assert logs[-1]["event"] == "store recovered" and logs[-1]["failures"] == 1002
        assert logs[-1]["seconds"] == 40.0
    assert metrics.store_errors.labels("commit")._value.get() == 1002
    assert not health.failing and health.describe() is None and health.failures == 0


def test_the_episode_ends_once_every_failed_operation_worked_again():
    health = StoreHealth(clock=Clock())
    health.failed("ack", FULL)
    health.failed("commit", FULL)
    health.succeeded("commit")  # small commits fit while acks do not: still failing
    assert health.failing
    health.succeeded("lease")
    assert health.failing
    health.succeeded("ack")
    assert not health.failing


def test_api_failures_are_cleared_by_a_delivery_write_not_by_a_read():
    health = StoreHealth(clock=Clock())
    health.failed("api-write", FULL)  # an operator's request: it may never be tried again
    health.succeeded("lease")
    assert health.failing
    health.succeeded("commit")
    assert not health.failing


def test_watchers_hear_every_failure_and_the_end():
    health = StoreHealth(clock=Clock())
    heard = []
    health.watch(heard.append)
    health.succeeded("commit")  # healthy: nothing to say
    health.failed("commit", FULL)
    health.failed("commit", sqlite3.OperationalError("disk I/O error"))
    health.succeeded("commit")
    assert heard == ["database or disk is full", "disk I/O error", None]


def test_what_counts_as_a_store_error():
    assert is_store_error(FULL) and is_store_error(sqlite3.DatabaseError("database disk image is malformed"))
    assert is_store_error(sqlite3.IntegrityError("a trigger said no"))
    assert not is_store_error(sqlite3.ProgrammingError("Cannot operate on a closed database."))
    assert not is_store_error(ValueError("no"))
