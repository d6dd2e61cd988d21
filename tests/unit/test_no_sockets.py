"""The guard of tests/unit (its conftest): a unit test that connects or binds fails."""

import socket

import pytest


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_UNIX])
def test_connect_and_bind_fail_in_unit_tests(family):
    address = ("127.0.0.1", 9) if family == socket.AF_INET else "\0listenerd-unit-guard"
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        for method in (sock.connect, sock.connect_ex, sock.bind):
            with pytest.raises(pytest.fail.Exception, match="go in tests/integration"):
                method(address)
