"""tests/unit opens no socket: a test that connects or binds fails here, and belongs in tests/integration."""

import socket

import pytest


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch):
    def refuse(self, *args, **kwargs):
        pytest.fail(f"a unit test opened a {self.family.name} socket ({args[0] if args else ''}); "
                    "tests that need the network go in tests/integration", pytrace=True)

    for method in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, method, refuse)
