"""The listeners that should run, read from the store, and the running set kept in step with it.

Start and a reload read the whole set once (`everything`) and the supervisor diffs it. An API change
reads only what it touched, by key: one listener (`listener_changed`) or one connection group, the
listeners of a tenant's integration (`integration_changed`), so its cost does not grow with the
number of listeners. The in-memory `ListenerIndex` is updated in the same step, from the same rows.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import orjson
import structlog
from pydantic import ValidationError

from listenerd.listener_index import ListenerIndex
from listenerd.model import (
    INTEGRATION_TYPES,
    Config,
    Integration,
    ListenerBase,
    integration_type,
    load_integration,
    load_listener,
)
from listenerd.observability import redactor, secrets_owner
from listenerd.store import Row, Store
from listenerd.supervisor import Desired, Key, Supervisor

log = structlog.get_logger("listenerd.fleet")


class Fleet:
    """`tenants()` gives the ids of the configured tenants (None: every tenant in the store, for tests);
    `configured(tenant, kind)` a config-file integration as the config holds it (the store keeps it without
    its secrets, which stay in the config)."""

    def __init__(self, store: Store, supervisor: Supervisor,
                 tenants: Callable[[], set[str] | None] = lambda: None,
                 configured: Callable[[str, str], Integration | None] = lambda tenant_id, kind: None):
        self.store = store
        self.supervisor = supervisor
        self.tenants = tenants
        self.configured = configured
        self.index = ListenerIndex()
        # a cluster node (cluster.py): runs only the connection groups it holds (`owns(tenant, kind)`), and
        # `announce(payload)` tells the other nodes about an API change (the index lists every listener)
        self.owns: Callable[[str, str], bool] = lambda tenant_id, kind: True
        self.announce: Callable[[dict], Awaitable[None]] | None = None
        self._integrations: dict[tuple[str, str], tuple[dict, str, Integration]] = {}
        # one read-and-reconcile at a time: a reload's whole read never lands after an API change it missed
        self._lock = asyncio.Lock()
        # each listener's stored bytes and their definition, as last read: a reload parses only the rows that
        # changed since (parsing 10,000 definitions was half of a reload's time)
        self._parsed: dict[Key, tuple[bytes, str, ListenerBase]] = {}

    async def everything(self) -> dict[Key, Desired]:
        """Every listener of a configured tenant with its tenant's integration; the index becomes this set."""
        tenant_ids = self.tenants()
        integrations: dict[tuple[str, str], Integration] = {}
        for row in await self.store.all_integrations():
            if (tenant_ids is None or row.tenant_id in tenant_ids) and (loaded := self._integration(row)) is not None:
                integrations[(row.tenant_id, row.key)] = loaded
        desired: dict[Key, Desired] = {}
        parsed: dict[Key, tuple[bytes, str, ListenerBase]] = {}
        for tenant_id, listener_id, body, managed_by in await self.store.all_listeners_stored():
            if tenant_ids is not None and tenant_id not in tenant_ids:
                continue
            key = (tenant_id, listener_id)
            known = self._parsed.get(key)
            if known is not None and known[0] == body and known[1] == managed_by:
                spec: ListenerBase | None = known[2]  # the same stored bytes: the same definition, not parsed again
            else:
                spec = _listener(Row(tenant_id, listener_id, orjson.loads(body), managed_by))
            if spec is not None:
                parsed[key] = (body, managed_by, spec)
                desired[key] = Desired(spec, integrations.get((tenant_id, integration_type(spec.type))))
        self._parsed = parsed
        self.index.replace((tenant_id, want.listener) for (tenant_id, _), want in desired.items())
        return {key: want for key, want in desired.items() if self.owns(key[0], integration_type(want.listener.type))}

    async def reconcile_all(self, config: Config | None = None) -> dict[str, list[Key]]:
        """Read the whole set and bring the running listeners in line (a reload: `config` is the new one)."""
        async with self._lock:
            return await self.supervisor.reconcile(await self.everything(), config=config)

    async def listener_changed(self, tenant_id: str, listener_id: str, announce: bool = True) -> dict[str, list[Key]]:
        """One listener was created, changed or deleted: read it (and its integration) by key, run that."""
        async with self._lock:
            changes = await self._listener_changed(tenant_id, listener_id)
        if announce and self.announce is not None:
            await self.announce({"listener": [tenant_id, listener_id]})
        return changes

    async def _listener_changed(self, tenant_id: str, listener_id: str) -> dict[str, list[Key]]:
        key = (tenant_id, listener_id)
        stored = await self.store.get_listener_stored(tenant_id, listener_id)
        spec = None
        if stored is not None and self._configured(tenant_id):
            body, managed_by = stored
            spec = _listener(Row(tenant_id, listener_id, orjson.loads(body), managed_by))
        want = None
        if spec is None:
            self.index.remove(tenant_id, listener_id)
            self._parsed.pop(key, None)
        else:
            self._parsed[key] = (body, managed_by, spec)
            self.index.put(tenant_id, spec)
            if self.owns(tenant_id, integration_type(spec.type)):
                integration = await self.store.get_integration(tenant_id, integration_type(spec.type))
                want = Desired(spec, self._integration(integration) if integration is not None else None)
        return await self.supervisor.reconcile_some({key: want})

    async def integration_changed(self, tenant_id: str, kind: str, announce: bool = True) -> dict[str, list[Key]]:
        """A tenant's credentials of one type changed, or (a cluster) the group moved: that connection group's
        listeners, and no others."""
        async with self._lock:
            changes = await self._integration_changed(tenant_id, kind)
        if announce and self.announce is not None:
            await self.announce({"integration": [tenant_id, kind]})
        return changes

    async def _integration_changed(self, tenant_id: str, kind: str) -> dict[str, list[Key]]:
        specs = [spec for spec in self.index.of_tenant(tenant_id) if integration_type(spec.type) == kind]
        if not self.owns(tenant_id, kind):
            return await self.supervisor.reconcile_some({(tenant_id, spec.id): None for spec in specs})
        stored = await self.store.get_integration(tenant_id, kind)
        integration = self._integration(stored) if stored is not None else None
        group: dict[Key, Desired | None] = {(tenant_id, spec.id): Desired(spec, integration) for spec in specs}
        return await self.supervisor.reconcile_some(group)

    def _integration(self, row: Row) -> Integration | None:
        """The row's integration; the same object as last time while the row is unchanged, so a tenant's
        listeners share one (not one copy each) and a reconcile compares it once."""
        if row.managed_by == "config":
            return self.configured(row.tenant_id, row.key)  # one object per config, shared by its listeners
        key = (row.tenant_id, row.key)
        known = self._integrations.get(key)
        if known is not None and known[0] == row.body and known[1] == row.managed_by:
            return known[2]
        loaded = _integration(row)
        if loaded is not None:
            self._integrations[key] = (row.body, row.managed_by, loaded)
        return loaded

    def _configured(self, tenant_id: str) -> bool:
        tenant_ids = self.tenants()
        return tenant_ids is None or tenant_id in tenant_ids


def _integration(row: Row) -> Integration | None:
    if row.key not in INTEGRATION_TYPES:
        return None
    with contextlib.suppress(ValidationError):
        integration = load_integration(row.key, row.body, row.managed_by)
        redactor.replace(secrets_owner(row.tenant_id, row.key), integration.secret_values())
        return integration
    return None


def _listener(row: Row) -> ListenerBase | None:
    try:
        return load_listener(row.body, row.managed_by)
    except ValidationError as exc:
        log.error("stored listener is invalid; skipped", tenant=row.tenant_id, listener=row.key, error=str(exc))
        return None
