"""The forwarder's retry policy as pure functions (its delivery over HTTP is in tests/integration/test_forwarder.py)."""

import time
from email.utils import formatdate

import pytest

from listenerd.delivery.forwarder import retry_after_seconds, retryable


def test_retry_after_parsing():
    assert retry_after_seconds("2") == 2.0
    assert retry_after_seconds(" 120 ") == 120.0
    now = time.time()
    assert retry_after_seconds(formatdate(now + 30, usegmt=True), now=now) == pytest.approx(30, abs=1)
    assert retry_after_seconds(formatdate(now - 30, usegmt=True), now=now) == 0.0
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_which_statuses_retry():
    assert all(retryable(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(retryable(s) for s in (400, 401, 403, 404, 409, 413, 422))
