"""What every connection group has in common: one provider connection shared by a tenant's listeners.

A connection group is one tenant's integration of one source type (same credentials, same endpoint,
same `sources` settings), carried on ONE provider connection, as the providers' own clients do and
their limits require (DataSift's `/multi` socket, one Salesforce login and CometD client, one Pusher
WebSocket). The supervisor still runs one task per listener: each task joins its group, waits for its
own outcome (`follow`), and leaves; the group's own task owns the socket. The last listener to leave
closes the connection and waits, bounded, for its goodbye. A group is also the unit a cluster node
will own.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, NoReturn, Protocol

import orjson

from listenerd.outcome import Ended, Outcome


class Member(Protocol):
    """One listener on a group: its outcome resolves when its subscription, or the whole connection, ends."""

    outcome: asyncio.Future[Outcome]


class Group(Protocol):
    closed: bool  # no listener may join any more; the next one opens a fresh connection
    task: asyncio.Task[None] | None  # the connection's own task

    def remove(self, member: Any) -> None: ...


class Registered:
    """A group kept in its source type's registry under `key` (the DataSift and Pusher sockets)."""

    key: str
    registry: dict[str, Any]
    closed: bool
    task: asyncio.Task[None] | None

    def _close(self, cancel: bool = True) -> None:
        """No new listener may join this connection: out of the registry, so the next one opens a fresh one."""
        self.closed = True
        if self.registry.get(self.key) is self:
            del self.registry[self.key]
        if cancel and self.task is not None and not self.task.done():
            self.task.cancel()


def resolve(member: Member, outcome: Outcome) -> None:
    """End one listener's wait with `outcome`; the first outcome it gets is the one it keeps."""
    if not member.outcome.done():
        member.outcome.set_result(outcome)


def group_key(*parts: Any) -> str:
    """A stable key for a group from what makes two connections the same (tenant, credentials, settings)."""
    return hashlib.sha256(orjson.dumps(list(parts), option=orjson.OPT_SORT_KEYS, default=str)).hexdigest()


async def follow(group: Group, member: Member, close_wait: float) -> NoReturn:
    """Wait for `member`'s outcome, leave the group, and end the listener's run with that outcome.

    The last listener to leave a closing group waits up to `close_wait` seconds for the connection's
    task to say goodbye (a close handshake, a `/meta/disconnect`), so a stop never leaves a socket behind.
    """
    try:
        outcome = await member.outcome
    finally:
        group.remove(member)
        task = group.task
        if group.closed and task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task}, timeout=close_wait)
    raise Ended(outcome)
