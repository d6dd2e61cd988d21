"""What every connection shares: one TLS context per CA bundle, error words, outcome kinds, masking."""

import ssl

from listenerd.model import SECRET_MASK
from listenerd.net import client_tls, describe, kind_of, mask


def test_one_verifying_context_per_bundle():
    context = client_tls(None)
    assert context is client_tls(None) and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_connection_errors_in_a_few_words_and_their_kind():
    assert describe(TimeoutError()) == "timed out" and kind_of(TimeoutError()) == "timeout"
    assert describe(ConnectionRefusedError(111, "Connect call failed")) == "connection refused"
    assert kind_of(ConnectionRefusedError()) == "network"
    assert describe(OSError()) == "OSError"
    assert describe(OSError("x" * 300), limit=200) == "x" * 200
    assert describe(OSError("x" * 300)) == "x" * 300


def test_mask_replaces_every_secret_long_enough():
    assert mask("key abc and pw hunter2", "abc", "hunter2") == f"key {SECRET_MASK} and pw {SECRET_MASK}"
    assert mask("key abc", "abc", shortest=4) == "key abc"  # too short to tell from ordinary words
    assert mask("nothing", "", "absent") == "nothing"
