"""sd_notify over NOTIFY_SOCKET, and the watchdog ping, without a libsystemd dependency.

The protocol is one datagram of `KEY=VALUE` lines to the unix socket named by NOTIFY_SOCKET (a
path, or an abstract name written with a leading `@`). Outside systemd there is no socket and
every call is a no-op. WATCHDOG=1 is sent at half of WATCHDOG_USEC from the event loop itself, so
a wedged loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os
import socket

import structlog

from listenerd.tasks import cancel_and_wait

log = structlog.get_logger("listenerd.systemd")


class Notifier:
    def __init__(self, address: str | None):
        self.address = address
        self._socket: socket.socket | None = None
        self._watchdog: asyncio.Task[None] | None = None

    @classmethod
    def from_env(cls) -> Notifier:
        return cls(os.environ.get("NOTIFY_SOCKET") or None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str | int) -> bool:
        """Send e.g. notify(READY=1, STATUS="3 started"); False when there is no socket or it fails."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={str(value).replace(chr(10), ' ')}" for key, value in fields.items())
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message.encode(), address)
            return True
        except OSError as exc:
            log.warning("sd_notify failed", error=str(exc), socket=self.address)
            return False

    def watchdog_interval(self) -> float | None:
        """Half of WATCHDOG_USEC when the watchdog is meant for this process, else None."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or not usec.isdigit() or int(usec) == 0:
            return None
        if pid and pid.isdigit() and int(pid) != os.getpid():
            return None
        return int(usec) / 2_000_000

    def start_watchdog(self) -> None:
        interval = self.watchdog_interval()
        if self.enabled and interval:
            self._watchdog = asyncio.create_task(self._ping(interval), name="systemd-watchdog")

    async def _ping(self, interval: float) -> None:
        while True:
            self.notify(WATCHDOG=1)
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._watchdog:
            await cancel_and_wait(self._watchdog)
        if self._socket:
            self._socket.close()
            self._socket = None
