"""tests/unit opens no socket: a test that connects or binds fails here, and belongs in tests/integration."""

import socket

import pytest


@pytest.fixture(autouse=True)
def no_sockets(monkeypatch):
    def refusing(method):
        def refuse(self, address, *args, **kwargs):
            pytest.fail(f"unit tests open no socket, this one called {method}({address!r}) on a "
                        f"{self.family.name} socket: tests that need the network go in tests/integration")
        return refuse

    for method in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, method, refusing(method))
