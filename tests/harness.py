"""Test harness: real store, outbox, metrics and status record for driving one source or a supervisor.

No mocks of our own pieces: a `Harness` opens a real SQLite store in a temp dir, a real outbox, and
builds `SourceContext`s exactly as the supervisor does; the supervisors it builds stop when it closes.
`wait_for`, `listener` and `integration` come from `listenerd.testing` (the benchmarks use them too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from listenerd.delivery.dead_letters import DeadLetters
from listenerd.delivery.outbox import Outbox
from listenerd.model import Config, Integration
from listenerd.observability import Metrics
from listenerd.sources.base import Shared, SourceContext
from listenerd.status import ListenerStatus
from listenerd.store import Store
from listenerd.supervisor import Desired, Supervisor
from listenerd.testing import integration, listener, snapshot_envelopes, wait_for

__all__ = ["Harness", "desired", "integration", "listener", "outbox_envelopes", "wait_for"]


class Harness:
    def __init__(self, tmp_path: Path, config: Config | None = None, **outbox_bounds: int):
        self.config = config or Config.model_validate({"store": {"path": str(tmp_path / "test.db")}})
        self.store = Store(str(tmp_path / "test.db"))
        self.metrics = Metrics()
        self.outbox = Outbox(self.store, max_events=outbox_bounds.get("max_events", 1_000_000),
                             max_bytes=outbox_bounds.get("max_bytes", 1 << 30), metrics=self.metrics)
        self.dead_letters = DeadLetters(self.store, self.outbox)
        self.shared = Shared()
        self.supervisors: list[Supervisor] = []
        self.records: dict[tuple[str, str], ListenerStatus] = {}  # the status of each context built here

    async def __aenter__(self) -> Harness:
        await self.store.open()
        await self.outbox.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        """Stop every supervisor built here first: a test that failed half-way leaves no listener running."""
        try:
            for supervisor in reversed(self.supervisors):
                await supervisor.stop()
        finally:
            await self.outbox.close()
            await self.store.close()

    def context(self, tenant_id: str, spec: Any, creds: Integration) -> SourceContext:
        status = self.records[(tenant_id, spec.id)] = ListenerStatus(tenant_id, spec.id)
        return SourceContext(tenant_id=tenant_id, listener=spec, integration=creds, settings=self.config.sources,
                             status=status, outbox=self.outbox, metrics=self.metrics, shared=self.shared)

    def supervisor(self) -> Supervisor:
        """A supervisor over this harness's outbox, stopped when the harness closes (stopping twice is harmless)."""
        supervisor = Supervisor(self.config, self.outbox, self.metrics)
        self.supervisors.append(supervisor)
        return supervisor

    async def events(self, tenant_id: str | None = None, listener_id: str | None = None) -> list[dict]:
        """Envelopes in the outbox, in order."""
        rows = await self.outbox.lease(10_000_000)
        envelopes = [orjson.loads(r.body) for r in rows]
        return [e for e in envelopes if (tenant_id is None or e["tenant-id"] == tenant_id)
                and (listener_id is None or e["listener-id"] == listener_id)]


def outbox_envelopes(db_path: str | Path) -> list[dict]:
    """Every envelope waiting in the outbox of the store at `db_path` after a kill, read from a snapshot
    (`listenerd.testing.store_snapshot`) so that the restart still recovers from the WAL as left."""
    return [orjson.loads(body) for body in snapshot_envelopes(db_path)]


def desired(spec: Any, creds: Integration | None) -> Desired:
    return Desired(spec, creds)
