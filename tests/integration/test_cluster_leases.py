"""The lease SQL of `listenerd.cluster` against PostgreSQL: taking, renewing, expiring, releasing, the
epoch raised on every change of hands, and the fence that locks a lease until the writer commits."""

import threading
import time

import pytest

from listenerd.cluster import acquire, holding, live_leases, release, renew
from listenerd.store_pg import PgConnection, migrate


@pytest.fixture
def conns(pg_url):
    first, second = PgConnection(pg_url), PgConnection(pg_url)
    migrate(first)
    yield first, second
    first.close()
    second.close()


def test_a_lease_is_taken_once_renewed_by_its_holder_only_and_changes_hands_with_a_new_epoch(conns):
    a, b = conns
    assert acquire(a, "t/pusher", "a", 0.5) == 1
    assert acquire(b, "t/pusher", "b", 0.5) is None, "held and unexpired: no one else takes it"
    assert renew(b, "b", {"t/pusher": 1}, 0.5) == set(), "only the holder renews"
    assert renew(a, "a", {"t/pusher": 1}, 0.5) == {"t/pusher"}
    assert live_leases(a)["t/pusher"][:2] == ("a", 1)
    time.sleep(0.6)
    assert renew(a, "a", {"t/pusher": 1}, 0.5) == set(), "an expired lease is not renewed: it may be taken"
    assert acquire(b, "t/pusher", "b", 0.5) == 2
    assert holding(a, "a", {"t/pusher": 1}) == set() and holding(b, "b", {"t/pusher": 2}) == {"t/pusher"}
    release(b, "b", {"t/pusher": 2})
    assert "t/pusher" not in live_leases(a)
    assert acquire(a, "t/pusher", "a", 5) == 3, "a released lease is free at once"


def test_the_fence_holds_the_lease_until_the_writer_commits(conns):
    a, b = conns
    assert acquire(a, "t/datasift", "a", 0.3) == 1
    a.execute("BEGIN")
    assert holding(a, "a", {"t/datasift": 1}) == {"t/datasift"}  # the lease row is now locked FOR SHARE
    time.sleep(0.4)  # it expires meanwhile
    taken: list[int | None] = []
    thief = threading.Thread(target=lambda: taken.append(acquire(b, "t/datasift", "b", 5)))
    thief.start()
    thief.join(0.5)
    assert thief.is_alive() and not taken, "no one takes it while the writer's transaction is open"
    a.execute("COMMIT")
    thief.join(5)
    assert taken == [2], "then it changes hands, with a new epoch the old holder's next write fails on"
    assert holding(a, "a", {"t/datasift": 1}) == set()
