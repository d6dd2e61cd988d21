"""The two per-event strings of an envelope, its id and its receipt time; and the clock of delivery's ages.

Both run once per event on the append path, so both are computed without the standard library's
per-call overhead, and tested against it (`tests/unit/test_ids.py`). The receipt time's inverse
(`received_epoch`, off the hot path) sits beside it, so the stamp's format is written in one place.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

EVENT_NAMESPACE = uuid.UUID("6f1c3a52-8d3e-4b7a-9a77-2f4c1f0e5d10")


def event_id(tenant_id: str, listener_id: str, key: str | None) -> str:
    """Stable for one source event (UUIDv5 of tenant, listener, source key); else fresh, stored once.

    Computed directly from SHA-1 and random bytes: the same values as `uuid.uuid5`/`uuid.uuid4`,
    at a fraction of their cost: fresh ids are formatted in bulk from one `os.urandom` call, and the
    SHA-1 of a listener's namespace prefix is computed once and copied per key.
    """
    if key is None:
        if not _fresh:
            _fresh.extend(_fresh_ids(4096))
        return _fresh.pop()
    hasher = _hashers.get((tenant_id, listener_id))
    if hasher is None:
        if len(_hashers) > 10_000:
            _hashers.clear()
        hasher = _hashers[(tenant_id, listener_id)] = hashlib.sha1(
            _NAMESPACE_BYTES + f"{tenant_id}\x00{listener_id}\x00".encode(), usedforsecurity=False)
    hasher = hasher.copy()
    hasher.update(key.encode())
    x = hasher.hexdigest()
    return f"{x[:8]}-{x[8:12]}-5{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:32]}"


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes
_VARIANT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}  # RFC 4122 variant: top bits 10
_hashers: dict[tuple[str, str], Any] = {}
_fresh: list[str] = []


os.register_at_fork(after_in_child=_fresh.clear)  # a forked child must never hand out its parent's ids


def _fresh_ids(n: int) -> list[str]:
    """`n` random (version 4) UUIDs from one system call, laid out column by column in C (strided
    slice copies), not formatted one by one."""
    digits = os.urandom(16 * n).hex().encode()
    text = bytearray(b"-" * (36 * n))
    for k, at in enumerate(_DIGIT_AT):
        text[at::36] = digits[k::32]
    text[14::36] = b"4" * n  # version
    text[19::36] = digits[16::32].translate(_VARIANT_BYTES)  # variant: top bits 10
    ids = text.decode()
    return [ids[i:i + 36] for i in range(0, 36 * n, 36)]


_DIGIT_AT = [k + (k >= 8) + (k >= 12) + (k >= 16) + (k >= 20) for k in range(32)]  # hex digit -> 8-4-4-4-12
_VARIANT_BYTES = bytes.maketrans(b"0123456789abcdef", b"89ab89ab89ab89ab")


_SECOND_FORMAT = "%Y-%m-%dT%H:%M:%S"  # a receipt time is this, then ".<microseconds>Z"
_stamp_second = -1
_stamp_prefix = ""


def received_at(ts: float) -> str:
    """RFC 3339 UTC with microseconds; the per-second prefix is formatted once per second."""
    global _stamp_second, _stamp_prefix
    second = int(ts)
    micros = round((ts - second) * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    if second != _stamp_second:
        _stamp_prefix = time.strftime(_SECOND_FORMAT, time.gmtime(second))
        _stamp_second = second
    return f"{_stamp_prefix}.{micros:06d}Z"


def received_epoch(stamp: str) -> float:
    """The inverse of `received_at`: seconds since the epoch; ValueError when `stamp` is not such a time."""
    return datetime.strptime(stamp, _SECOND_FORMAT + ".%fZ").replace(tzinfo=UTC).timestamp()


_STEADY_EPOCH = time.time() - time.monotonic()


def receipt_clock() -> float:
    """Now, for every age and deadline in delivery: the monotonic clock, on the wall clock's epoch at start.

    Segments are stamped with it (their `received_at` in the store, `Row.received`), and an age or a
    deadline is this clock minus such a stamp, so a step of the wall clock (NTP, an operator) moves
    neither a linger deadline nor `listenerd_outbox_oldest_age_seconds`. Why not a monotonic stamp
    per segment kept in memory: the stamp must survive in the store for the backlog a restart finds,
    and one clock for both keeps every comparison a plain subtraction. Across a restart the previous
    process's stamps are compared with this one's, off at most by how far the wall clock stepped in
    between; a stamp in the future then counts as age 0 (`age`). Envelopes keep the wall clock in
    `received-at`.
    """
    return _STEADY_EPOCH + time.monotonic()


def age(stamp: float) -> float:
    """Seconds since a `receipt_clock()` stamp, never negative (a stamp from before a clock step back)."""
    return max(0.0, receipt_clock() - stamp)
