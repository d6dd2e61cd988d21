"""Issue 17 finding 8: API-set secrets sealed with AES-GCM, bound to their row and field; rotation."""

import base64
import os

import pytest

from listenerd.sealing import PREFIX, Sealer, SealError, parse_key

BODY = {"key": "app-key", "secret": "pusher-secret-value", "cluster": "mt1"}


def test_sealed_secrets_open_and_others_stay_plain():
    sealer = Sealer([os.urandom(32)])
    sealed = sealer.seal("t1", "pusher", BODY)
    assert sealed["secret"].startswith(PREFIX) and "pusher-secret-value" not in str(sealed)
    assert sealed["key"] == "app-key" and sealer.open("t1", "pusher", sealed) == BODY


def test_a_sealed_value_cannot_be_moved_to_another_tenant():
    sealer = Sealer([os.urandom(32)])
    sealed = sealer.seal("t1", "pusher", BODY)
    with pytest.raises(SealError, match="moved from another row"):
        sealer.open("t2", "pusher", sealed)


def test_rotation_old_keys_open_the_new_one_seals():
    old, new = os.urandom(32), os.urandom(32)
    sealed = Sealer([old]).seal("t1", "pusher", BODY)
    rotated = Sealer([new, old])
    assert rotated.stale("pusher", sealed) and rotated.open("t1", "pusher", sealed) == BODY
    resealed = rotated.seal("t1", "pusher", rotated.open("t1", "pusher", sealed))
    assert not rotated.stale("pusher", resealed)
    assert Sealer([new]).open("t1", "pusher", resealed) == BODY
    with pytest.raises(SealError, match="secrets-old-key-files"):
        Sealer([new]).open("t1", "pusher", sealed)


def test_keys_are_32_bytes_raw_or_base64():
    key = os.urandom(32)
    assert parse_key(base64.b64encode(key) + b"\n", "k") == key
    with pytest.raises(ValueError, match="32 random bytes"):
        parse_key(b"too-short", "k")
