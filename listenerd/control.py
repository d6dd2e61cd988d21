"""What an operator may change while the daemon runs, and the order each change is made in.

Every change is written to the store first and then reconciled, so what was made survives a restart;
a checkpoint is written while its listener is stopped, so the old run's last commit cannot overwrite
it. Requests arrive as the fields a client sent and are validated by the same model as the config
file. Refusals are domain errors (`NotFound`, `Conflict`, `Invalid` naming the fields at fault,
`NotLoaded`, `Unavailable` while the store fails) that the HTTP API maps to its status codes:
nothing here knows about HTTP.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from pydantic import ValidationError

from listenerd.config import format_errors
from listenerd.egress import EgressRefused, Policy, check_integration
from listenerd.fleet import Fleet
from listenerd.model import (
    INTEGRATION_TYPES,
    LISTENER_TYPES,
    SAFE_ID,
    Integration,
    Limits,
    ListenerBase,
    load_integration,
    load_listener,
    reserved_listener_id,
    stored_listener,
)
from listenerd.observability import redactor, secrets_owner
from listenerd.status import STATES, ListenerStatus
from listenerd.store import Row, Store, TenantFull
from listenerd.store_health import StoreHealth, is_store_error
from listenerd.supervisor import Supervisor

MAX_REPLAY_ID = 2**63 - 1  # a replayId is a signed 64-bit integer (Salesforce, CometD's replay extension)
DEFAULT_LIMIT = 100  # listed items per page unless a client asks for another number
MAX_LIMIT = 1000
EDITABLE = ("name", "description", "status", "type", "options", "mapping")
RETRY_AFTER = 5  # seconds a client is asked to wait while the store fails (its commits retry at least this often)
P = ParamSpec("P")
R = TypeVar("R")


class ControlError(Exception):
    """A refused request; `fields` names the request fields at fault, when the refusal is about some."""

    retry_after: int | None = None  # seconds after which the same request may succeed

    def __init__(self, message: str, fields: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.fields = fields


class NotFound(ControlError):
    pass


class Conflict(ControlError):
    """Declared in the config file (changed there, not here), or the id is taken."""


class Invalid(ControlError):
    pass


class NotLoaded(ControlError):
    """It exists in the store, but the supervisor has not picked it up yet."""


class TooMany(ControlError):
    """A tenant's quota (`[limits]`) refused the request; `retry_after` says when it may succeed."""

    def __init__(self, message: str, retry_after: int, fields: list[str] | None = None):
        super().__init__(message, fields)
        self.retry_after = retry_after


class Unavailable(ControlError):
    """The store failed the request (disk full, I/O error): nothing is wrong with it, so try it again later."""

    retry_after = RETRY_AFTER


def _uses_store(op: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """A store failure inside the method is `Unavailable`, counted as `op` in the store's health."""
    def wrap(method: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(method)
        async def call(*args: P.args, **kwargs: P.kwargs) -> R:
            control: Control = args[0]  # type: ignore[assignment]
            try:
                result = await method(*args, **kwargs)
            except sqlite3.Error as exc:
                if not is_store_error(exc):
                    raise
                raise control.unavailable(op, exc) from None
            if control.health is not None:
                control.health.succeeded(op)
            return result
        return call
    return wrap


class Control:
    """Listeners, integrations and checkpoints of the running daemon: reads, and changes in order."""

    def __init__(self, store: Store, supervisor: Supervisor, fleet: Fleet, health: StoreHealth | None = None,
                 limits: Callable[[], Limits] = Limits):
        self.store = store
        self.limits = limits  # the current config's `[limits]` (a reload replaces them)
        self.supervisor = supervisor
        self.fleet = fleet  # brings the running listener (or connection group) a change touched in line with the store
        self.health = health
        self._creating: dict[str, int] = {}  # tenant -> creates under way (in the store, not yet in the index)

    def unavailable(self, op: str, exc: BaseException) -> Unavailable:
        """The refusal for a request the store failed (`op`: api-read or api-write), counted in its health."""
        if self.health is not None:
            self.health.failed(op, exc)
        return Unavailable(f"the store is failing ({exc}); nothing is wrong with the request: "
                           f"try again in {RETRY_AFTER}s")

    # -- listeners

    def _count_in_store(self, tenant_id: str, bound: int) -> int | None:
        """The bound for the store to check by counting the tenant's listeners in the insert's transaction, or
        None when it cannot be reached. The index, plus the creates under way (in the store before the index),
        is at least what the store holds on one node: far below the bound, a create need not count (a count
        reads every listener of the tenant). Near it, and on a cluster node (others create too), it counts."""
        if not bound:
            return None
        if self.fleet.announce is None and self.fleet.index.count(tenant_id) + self._creating[tenant_id] < bound:
            return None
        return bound

    @_uses_store("api-read")
    async def get_listener(self, tenant_id: str, listener_id: str) -> ListenerBase:
        if not SAFE_ID.match(listener_id):
            raise NotFound(f"no listener {listener_id[:64]!r} in tenant {tenant_id!r}")
        row = await self.store.get_listener(tenant_id, listener_id)
        if row is None:
            raise NotFound(f"no listener {listener_id!r} in tenant {tenant_id!r}")
        return load_listener(row.body, row.managed_by)

    async def listeners(self, tenant_id: str, after: str | None = None, limit: int = DEFAULT_LIMIT,
                        status: str | None = None, kind: str | None = None) -> tuple[list[ListenerBase], bool]:
        """A page of a tenant's listeners in id order after the id `after`, and whether more follow.

        `status` keeps those in that runtime status (`started`, `failed`, ...), `kind` those of that type.
        Read from the in-memory index: its cost is the page's, not the tenant's.
        """
        if status is not None and status not in STATES:
            raise Invalid(f"status: must be one of {', '.join(STATES)} (the runtime status)", ["status"])
        if kind is not None and kind not in LISTENER_TYPES:
            raise Invalid(f"type: unknown listener type {kind[:64]!r} (known: {', '.join(LISTENER_TYPES)})",
                          ["type"])

        def keep(spec: ListenerBase) -> bool:
            return ((kind is None or spec.type == kind)
                    and (status is None or self._status_of(tenant_id, spec) == status))

        return self.fleet.index.page(tenant_id, after, limit, keep)

    def listener_summary(self, tenant_id: str) -> dict[str, Any]:
        """Counts per runtime status, and every listener not `started` with its status: a tenant's health."""
        counts = dict.fromkeys(STATES, 0)
        not_started: list[dict[str, Any]] = []
        for spec in self.fleet.index.of_tenant(tenant_id):
            record = self.supervisor.status((tenant_id, spec.id))
            status = record.status if record is not None else "starting"  # stored, not loaded yet
            counts[status] += 1
            if status != "started":
                entry: dict[str, Any] = {"id": spec.id, "name": spec.name, "type": spec.type, "enabled": spec.status}
                entry.update(record.as_json() if record is not None else
                             {"status": status, "message": "Not loaded yet", "since": None, "last-error": None})
                not_started.append(entry)
        return {"total": sum(counts.values()), "counts": counts, "not-started": not_started}

    def _status_of(self, tenant_id: str, spec: ListenerBase) -> str:
        record = self.supervisor.status((tenant_id, spec.id))
        return record.status if record is not None else "starting"

    @_uses_store("api-write")
    async def create_listener(self, tenant_id: str, fields: Mapping[str, Any]) -> ListenerBase:
        """Store a new listener and start it; without an id, the store assigns the next `LI<n>`."""
        if "managed-by" in fields:
            raise Invalid("managed-by: set by listenerd, not by the API", ["managed-by"])
        given = fields.get("id")
        if given is not None and not isinstance(given, str):
            raise Invalid("id: must be a string", ["id"])
        if (reserved := reserved_listener_id(given)) is not None:
            raise Invalid(f"id: {reserved}", ["id"])
        limits = self.limits()
        spec = _validated({**fields, "id": given or "LI0"}, limits)  # a stand-in id until the store assigns one
        # assigned and inserted in one transaction: concurrent creates never share an id, a taken id is a
        # conflict (never an overwrite), an assigned LI<n> is above every id this tenant ever had, and the
        # tenant's listener count (config-file ones included) is checked against its bound
        self._creating[tenant_id] = self._creating.get(tenant_id, 0) + 1  # until the index has it too
        try:
            try:
                listener_id = await self.store.insert_listener(
                    tenant_id, given, lambda lid: stored_listener(spec.model_copy(update={"id": lid})),
                    max_count=self._count_in_store(tenant_id, limits.tenant_max_listeners))
            except TenantFull as exc:
                raise TooMany(f"tenant {tenant_id!r} has {exc.count} listeners, its limit "
                              f"(limits.tenant-max-listeners); delete one first", RETRY_AFTER) from None
            if listener_id is None:
                raise Conflict(f"id: listener {given!r} already exists in tenant {tenant_id!r}", ["id"])
            await self.fleet.listener_changed(tenant_id, listener_id)
        finally:
            self._creating[tenant_id] -= 1
            if not self._creating[tenant_id]:
                del self._creating[tenant_id]
        return spec.model_copy(update={"id": listener_id})

    @_uses_store("api-write")
    async def update_listener(self, tenant_id: str, listener_id: str, fields: Mapping[str, Any]) -> ListenerBase:
        """Replace the fields given; the listener restarts if its definition changed."""
        current = await self.get_listener(tenant_id, listener_id)
        if current.managed_by == "config":
            raise Conflict(f"listener {listener_id!r} is declared in the config file; change it there")
        if fields.get("id", listener_id) != listener_id:
            raise Invalid("id: cannot be changed", ["id"])
        unknown = sorted(set(fields) - set(EDITABLE) - {"id"})
        if unknown:
            raise Invalid(f"{unknown[0]}: unknown or read-only field", unknown)
        spec = _validated({**stored_listener(current), **{k: v for k, v in fields.items() if k in EDITABLE}},
                          self.limits())
        await self.store.put_listener(tenant_id, listener_id, stored_listener(spec))
        await self.fleet.listener_changed(tenant_id, listener_id)
        return spec

    @_uses_store("api-write")
    async def delete_listener(self, tenant_id: str, listener_id: str) -> None:
        """Delete it with its checkpoint and stop it; its undelivered events stay in the outbox and go on."""
        current = await self.get_listener(tenant_id, listener_id)
        if current.managed_by == "config":
            raise Conflict(f"listener {listener_id!r} is declared in the config file; remove it there")
        await self.store.delete_listener(tenant_id, listener_id)
        await self.fleet.listener_changed(tenant_id, listener_id)

    @_uses_store("api-read")
    async def restart_listener(self, tenant_id: str, listener_id: str) -> None:
        await self.get_listener(tenant_id, listener_id)
        if not await self.supervisor.restart((tenant_id, listener_id)) and self.fleet.announce is not None:
            await self.fleet.announce({"restart": [tenant_id, listener_id]})  # a cluster: its node restarts it

    @_uses_store("api-read")
    async def status(self, tenant_id: str, listener_id: str) -> ListenerStatus:
        record = self.supervisor.status((tenant_id, listener_id))
        if record is None:
            await self.get_listener(tenant_id, listener_id)
            raise NotLoaded("the listener is not loaded yet; try again")
        return record

    # -- checkpoints

    @_uses_store("api-read")
    async def checkpoint(self, tenant_id: str, listener_id: str) -> str:
        await self.get_listener(tenant_id, listener_id)
        value = await self.store.get_checkpoint(tenant_id, listener_id)
        if value is None:
            raise NotFound(f"listener {listener_id!r} has no stored checkpoint")
        return value

    @_uses_store("api-write")
    async def set_checkpoint(self, tenant_id: str, listener_id: str, fields: Mapping[str, Any]) -> int:
        """Set a Salesforce listener's resume point (`{"replay": n}`) and restart it from there."""
        spec = await self.get_listener(tenant_id, listener_id)
        replay = fields.get("replay")
        if spec.type not in ("salesforce", "salesforce-pubsub"):
            raise Invalid(f"replay: only salesforce and salesforce-pubsub listeners have checkpoints "
                          f"({listener_id!r} is {spec.type})",
                          ["replay"])
        if isinstance(replay, bool) or not isinstance(replay, int) or not -2 <= replay <= MAX_REPLAY_ID:
            raise Invalid(f"replay: must be a replayId (an integer from 0 to {MAX_REPLAY_ID}, Salesforce's 64-bit "
                          f"range), -1 (new events) or -2 (all retained)", ["replay"])
        unknown = sorted(set(fields) - {"replay"})
        if unknown:
            raise Invalid(f"{unknown[0]}: unknown field", unknown)

        async def write() -> None:
            await self.store.set_checkpoint(tenant_id, listener_id, str(replay))

        # stop, then write, then start: the old run's last commit cannot overwrite the new checkpoint
        if not await self.supervisor.restart((tenant_id, listener_id), while_stopped=write, replay_from=str(replay)):
            await write()
            if self.fleet.announce is not None:  # a cluster: the node that runs it restarts it from there
                await self.fleet.announce({"checkpoint": [tenant_id, listener_id, replay]})
        return replay

    # -- integrations

    @_uses_store("api-read")
    async def integrations(self, tenant_id: str) -> list[Integration]:
        """A tenant's integrations, in the order of `INTEGRATION_TYPES`."""
        found = {row.key: self._integration(row) for row in await self.store.integrations(tenant_id)
                 if row.key in INTEGRATION_TYPES}
        return [found[kind] for kind in INTEGRATION_TYPES if kind in found]

    @_uses_store("api-read")
    async def get_integration(self, tenant_id: str, kind: str) -> Integration:
        row = await self.store.get_integration(tenant_id, kind) if kind in INTEGRATION_TYPES else None
        if row is None:
            raise NotFound(f"no {kind[:64]!r} integration in tenant {tenant_id!r}")
        return self._integration(row)

    def _integration(self, row: Row) -> Integration:
        """A stored integration; a config-file one is the config's (the store does not keep its secrets)."""
        if row.managed_by == "config":
            tenant = self.supervisor.config.tenant(row.tenant_id)
            found = tenant.integrations.get(row.key) if tenant is not None else None
            if found is not None:
                return found
        try:
            return load_integration(row.key, row.body, row.managed_by)
        except ValidationError:  # its sealed secrets do not open (the store logged why): as if absent
            raise NotFound(f"the {row.key} integration of tenant {row.tenant_id!r} cannot be opened with the "
                           f"configured secrets key; set it again") from None

    @_uses_store("api-write")
    async def set_integration(self, tenant_id: str, kind: str, fields: Mapping[str, Any]) -> Integration:
        """Set up or replace a tenant's credentials of one type; the listeners using them restart."""
        integration_type(kind)
        body = dict(fields)
        for key in ("id", "type"):
            if key in body and body.pop(key) != kind:
                raise Invalid(f"{key}: must be {kind!r} (it is the path's type)", [key])
        if "managed-by" in body:
            raise Invalid("managed-by: set by listenerd, not by the API", ["managed-by"])
        current = await self.store.get_integration(tenant_id, kind)
        if current is not None and current.managed_by == "config":
            raise Conflict(f"the {kind} integration of tenant {tenant_id!r} is declared in the config file")
        try:
            integration = load_integration(kind, body, "api")
        except ValidationError as exc:
            raise _invalid(exc) from None
        for name in integration.SECRETS:
            problem = weak_secret(getattr(integration, name.replace("-", "_")) or "")
            if problem:
                raise Invalid(f"{name}: {problem}", [name])
        try:
            check_integration(Policy.from_settings(self.supervisor.config.server.egress), integration)
        except EgressRefused as exc:
            raise Invalid(exc.message, [exc.field] if exc.field else None) from None
        # before it is stored: no log line can show them; the replaced credentials' secrets are dropped
        redactor.replace(secrets_owner(tenant_id, kind), integration.secret_values())
        await self.store.put_integration(tenant_id, kind, integration.dump())
        await self.fleet.integration_changed(tenant_id, kind)
        return integration


# Words a secret set through the API may not be: the log's own vocabulary and well-known passwords. Each
# registered secret is removed from every log line, so "error" as a secret would blind every tenant's logs.
COMMON_SECRETS = frozenset({
    "password", "passw0rd", "12345678", "123456789", "1234567890", "qwertyuiop", "changeme", "iloveyou",
    "listener", "listenerd", "salesforce", "datasift", "starting", "started", "retrying", "stopped", "warning",
    "critical", "exception", "timestamp", "connected", "reconnect", "subscribe", "integration", "integrations",
    "tenant-id", "listener-id", "secret-token", "consumer-secret", "redacted", "[redacted]", "********"})
MIN_SECRET_LENGTH = 8


def weak_secret(value: str) -> str | None:
    """Why `value` is too weak to be registered as a secret (too short, too common, too repetitive), or None."""
    if not value:
        return None
    if len(value) < MIN_SECRET_LENGTH:
        return f"too short to be a secret (at least {MIN_SECRET_LENGTH} characters)"
    if value.lower() in COMMON_SECRETS:
        return "too common to be a secret"
    if len(set(value)) < 4:
        return "too repetitive to be a secret (at least 4 different characters)"
    return None


def integration_type(kind: str) -> str:
    """`kind` when it names an integration type, else Invalid."""
    if kind not in INTEGRATION_TYPES:
        raise Invalid(f"type: unknown integration type {kind[:64]!r} (known: {', '.join(INTEGRATION_TYPES)})",
                      ["type"])
    return kind


def _validated(body: dict[str, Any], limits: Limits) -> ListenerBase:
    try:
        return load_listener(body, "api", limits)
    except ValidationError as exc:
        raise _invalid(exc) from None


def _invalid(exc: ValidationError) -> Invalid:
    problems = format_errors(exc)
    return Invalid("; ".join(str(p) for p in problems), [p.location for p in problems])
