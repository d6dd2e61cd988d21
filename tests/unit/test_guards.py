"""The per-tenant write bucket and the accept-error log bound (issue 17, findings 5 and 7), on a manual clock."""

import asyncio
import errno
import logging

from listenerd.api.guard import AcceptErrorLog
from listenerd.quotas import WriteQuota, retry_after


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_tenant_gets_its_burst_then_the_rate_and_others_are_not_touched():
    clock = Clock()
    quota = WriteQuota(clock)
    assert [quota.take("a", 2.0, 3) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = quota.take("a", 2.0, 3)
    assert wait == 0.5 and retry_after(wait) == 1
    assert quota.take("b", 2.0, 3) == 0.0  # another tenant has its own bucket
    clock.now += 0.5
    assert quota.take("a", 2.0, 3) == 0.0 and quota.take("a", 2.0, 3) > 0
    clock.now += 1000
    assert [quota.take("a", 2.0, 3) for _ in range(4)][-1] > 0  # refills to the burst, not beyond
    assert quota.take("a", 0, 3) == 0.0  # rate 0: no bound


def accept_failure():
    return {"message": "socket.accept() out of system resource",
            "exception": OSError(errno.EMFILE, "Too many open files")}


def test_accept_errors_are_logged_once_per_period_with_the_count_left_out(caplog):
    clock = Clock()
    counted = []
    handler = AcceptErrorLog(every=10.0, clock=clock, on_error=lambda: counted.append(1))
    loop = asyncio.new_event_loop()
    try:
        for _ in range(10_000):  # an fd storm: every accept() fails
            handler(loop, accept_failure())
            clock.now += 0.001
        assert handler.lines == 1 and handler.suppressed == 9_999 and len(counted) == 10_000
        clock.now += 10
        handler(loop, accept_failure())
        assert handler.lines == 2 and handler.suppressed == 0
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            handler(loop, {"message": "something else", "exception": ValueError("x")})
        assert "something else" in caplog.text  # other loop errors are logged as before
    finally:
        loop.close()
