"""Cluster mode: several nodes share one PostgreSQL store and its listeners, by connection group.

No coordination protocol of our own: membership, leases and status records are rows in the store
(`schema.CLUSTER_MIGRATIONS`), changes travel by PostgreSQL's `LISTEN/NOTIFY`, and `placement.place`
decides, the same way on every node from the same rows, which node runs which group.

- **The unit** is a connection group: a tenant's integration of one type (`tenant/type`), so a
  provider sees one client per org or app across the cluster.
- **Leases** (`cluster_leases`) expire on the database's clock (`lease-ttl`, default 10 s); a node
  renews every third of it. Taking a lease is only possible once it is free or expired, and bumps
  its **epoch**.
- **Fencing.** Every outbox commit (events and checkpoints: `Outbox.fence`) and every status write
  checks, in its own transaction and with the lease rows locked (`FOR SHARE`, so no one can take
  them before it commits), that this node still holds each group at its epoch. A node that cannot
  renew (database unreachable, process paused) stops its groups' sources when three quarters of the
  TTL have passed since the last renewal it sent, before the lease can expire; one that comes back
  from a pause finds its commits refused and stands down.
- **Hand-over.** SIGTERM stops this node's groups, commits what they appended, releases the leases
  and notifies: the other nodes take them at once, not after the TTL. A joining node's share moves
  the same way (the placement moves as few groups as the balance needs).
- **Delivery.** A node forwards only its groups' events (`Outbox.keep`); on taking a group it
  counts the group's backlog as its own and rewinds its forwarder, so the old owner's events go out
  first, in order per listener. The events a deleted listener left waiting go out from one node (the
  holder of its tenant's first group).
- **One API.** Status records of the groups a node runs are written, with `node`, within a second of
  every change (at once for a change of status, then a NOTIFY makes the other nodes read at once); an
  unchanged record is not written again. Every node reads them every second, so any node answers for
  any listener: only the records written since its last read (`read_statuses`, by transaction id), and
  all of them every `STATUS_FULL_READ` seconds, so the cost per second follows the changes, not the
  number of listeners. A deleted listener's record goes in the transaction that deletes it (API or
  config reload), and any left of a listener that no longer exists at the next full read. API writes go
  to the store and a NOTIFY makes the owner apply them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog

from listenerd.delivery import segments
from listenerd.placement import place
from listenerd.store_pg import drop_statuses

log = structlog.get_logger("listenerd.cluster")

# NOTIFY payloads: {"members": node} | {"status": node} | {"listener": [t, id]} | {"integration": [t, kind]}
# | {"checkpoint": [t, id, replay]} | {"restart": [t, id]}
CHANNEL = "listenerd_cluster"
RENEW_FRACTION = 1 / 3  # renew every third of the TTL
STAND_DOWN_FRACTION = 0.75  # stop the sources this far into the TTL without a renewal
STATUS_FULL_READ = 30.0  # seconds between full reads of the status records (the reads between fetch changes only)


def group_of(tenant_id: str, kind: str) -> str:
    return f"{tenant_id}/{kind}"


# -- the SQL, plain functions over a store connection (the PostgreSQL store's thread)

def heartbeat(conn: Any, node: str, advertise: str, draining: bool) -> None:
    conn.execute("INSERT INTO cluster_nodes (node, advertise, seen_at, draining) VALUES (?, ?, clock_timestamp(), ?) "
                 "ON CONFLICT (node) DO UPDATE SET advertise = excluded.advertise, seen_at = excluded.seen_at, "
                 "draining = excluded.draining", (node, advertise, draining))


def members(conn: Any, ttl: float) -> list[tuple[str, str, bool]]:
    """Nodes seen within the TTL: (node, advertise, draining)."""
    return conn.execute("SELECT node, advertise, draining FROM cluster_nodes WHERE seen_at > clock_timestamp() - "
                        "make_interval(secs => ?) ORDER BY node", (ttl,)).fetchall()


def live_leases(conn: Any) -> dict[str, tuple[str, int, float]]:
    """group -> (node, epoch, seconds left) of every unexpired lease."""
    return {g: (n, e, left) for g, n, e, left in conn.execute(
        "SELECT group_key, node, epoch, extract(epoch FROM expires_at - clock_timestamp())::float8 FROM "
        "cluster_leases WHERE node IS NOT NULL AND expires_at > clock_timestamp()").fetchall()}


def acquire(conn: Any, group: str, node: str, ttl: float) -> int | None:
    """Take a free or expired lease; its new epoch, or None when another node holds it."""
    row = conn.execute(
        "INSERT INTO cluster_leases (group_key, node, epoch, expires_at) VALUES (?, ?, 1, clock_timestamp() + "
        "make_interval(secs => ?)) ON CONFLICT (group_key) DO UPDATE SET node = excluded.node, "
        "epoch = cluster_leases.epoch + 1, expires_at = excluded.expires_at WHERE cluster_leases.node IS NULL "
        "OR cluster_leases.expires_at <= clock_timestamp() RETURNING epoch", (group, node, ttl)).fetchone()
    return row[0] if row else None


def acquire_many(conn: Any, groups: list[str], node: str, ttl: float) -> dict[str, int]:
    """Take every one of these leases that is free or expired, in one statement; group -> new epoch."""
    if not groups:
        return {}
    return dict(conn.execute(
        "INSERT INTO cluster_leases (group_key, node, epoch, expires_at) SELECT g, ?, 1, clock_timestamp() + "
        "make_interval(secs => ?) FROM unnest(?::text[]) AS g ON CONFLICT (group_key) DO UPDATE SET "
        "node = excluded.node, epoch = cluster_leases.epoch + 1, expires_at = excluded.expires_at WHERE "
        "cluster_leases.node IS NULL OR cluster_leases.expires_at <= clock_timestamp() RETURNING group_key, epoch",
        (node, ttl, groups)).fetchall())


def renew(conn: Any, node: str, held: dict[str, int], ttl: float) -> set[str]:
    """Extend the unexpired leases this node holds at their epochs; the groups renewed."""
    if not held:
        return set()
    groups, epochs = list(held), [held[g] for g in held]
    return {g for (g,) in conn.execute(
        "UPDATE cluster_leases l SET expires_at = clock_timestamp() + make_interval(secs => ?) FROM "
        "unnest(?::text[], ?::bigint[]) AS h(g, e) WHERE l.group_key = h.g AND l.epoch = h.e AND l.node = ? "
        "AND l.expires_at > clock_timestamp() RETURNING l.group_key", (ttl, groups, epochs, node)).fetchall()}


def release(conn: Any, node: str, held: dict[str, int]) -> None:
    if held:
        conn.execute("UPDATE cluster_leases l SET node = NULL, expires_at = clock_timestamp() FROM "
                     "unnest(?::text[], ?::bigint[]) AS h(g, e) WHERE l.group_key = h.g AND l.epoch = h.e "
                     "AND l.node = ?", (list(held), [held[g] for g in held], node))


def holding(conn: Any, node: str, held: dict[str, int]) -> set[str]:
    """Of these groups, those this node holds at their epochs, unexpired; their lease rows locked until the
    caller's transaction ends, so no other node can take them before it commits (the fence)."""
    if not held:
        return set()
    return {g for (g,) in conn.execute(
        "SELECT l.group_key FROM cluster_leases l JOIN unnest(?::text[], ?::bigint[]) AS h(g, e) ON "
        "l.group_key = h.g AND l.epoch = h.e WHERE l.node = ? AND l.expires_at > clock_timestamp() "
        "FOR SHARE OF l", (list(held), [held[g] for g in held], node)).fetchall()}


def write_statuses(conn: Any, node: str, rows: list[tuple[str, str, bytes]]) -> None:
    """Upsert these (tenant, listener, record) status records as `node`'s, of listeners that still exist (a
    record written after its listener was deleted would outlive it)."""
    conn.executemany(
        "INSERT INTO cluster_status (tenant_id, listener_id, node, record, updated_at, written) SELECT ?::text, "
        "?::text, ?::text, ?::bytea, clock_timestamp(), pg_current_xact_id() WHERE EXISTS (SELECT 1 FROM listeners "
        "WHERE tenant_id = ? AND id = ?) ON CONFLICT (tenant_id, listener_id) DO UPDATE SET node = excluded.node, "
        "record = excluded.record, updated_at = excluded.updated_at, written = excluded.written",
        [(t, lid, node, body, t, lid) for t, lid, body in rows])


def read_statuses(conn: Any, since: str | None) -> tuple[str, list[tuple[str, str, str, bytes]]]:
    """The status records written since the read that returned `since` (every record when None), and the
    `since` of the next read: (tenant, listener, node, record) rows.

    `since` is the oldest transaction still running when a read began (its snapshot's xmin, taken before the
    read's own snapshot): every record not visible to that read was written by that transaction or a later
    one, so a read of `written >= since` misses nothing and fetches again only what was in flight. The
    database's transaction ids, not any clock: a write that commits late is still found."""
    xmin = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text").fetchone()[0]
    if since is None:
        rows = conn.execute("SELECT tenant_id, listener_id, node, record FROM cluster_status").fetchall()
    else:
        rows = conn.execute("SELECT tenant_id, listener_id, node, record FROM cluster_status WHERE written >= "
                            "?::xid8", (since,)).fetchall()
    return xmin, rows


def notify(conn: Any, payload: dict[str, Any]) -> None:
    conn.execute("SELECT pg_notify(?, ?)", (CHANNEL, orjson.dumps(payload).decode()))


class RemoteStatus:
    """A listener's status as its owner last wrote it: what the API answers on the other nodes."""

    __slots__ = ("status", "_body")

    def __init__(self, body: dict[str, Any]):
        self._body = body
        self.status = body.get("status", "starting")

    def as_json(self) -> dict[str, Any]:
        return self._body


class Cluster:
    """This node's membership: heartbeats, leases, placement, fencing, status records and notifications.

    `fleet` is the node's Fleet (its index lists every listener; it runs those `owns` admits);
    `moved(tenant, kind)` re-reconciles one group after this node took or gave it up.
    """

    def __init__(self, store: Any, settings: Any, outbox: Any, fleet: Callable[[], Any],
                 rewind: Callable[[], None] = lambda: None, metrics: Any = None, api_url: str | None = None):
        self.store = store
        self.node = settings.node_id
        self.ttl = settings.lease_ttl
        # where the other nodes reach this one's API: the setting, else the API's own address unless it listens
        # on every interface (0.0.0.0 or ::, which no other node can dial)
        wildcard = api_url is None or any(h in api_url for h in ("//0.0.0.0", "//[::]", "//::"))
        self.advertise = settings.advertise or ("" if wildcard else api_url or "")
        self.outbox = outbox
        self.fleet = fleet
        self.rewind = rewind
        self.metrics = metrics
        self.held: dict[str, int] = {}  # group -> epoch, the leases this node holds
        self.running: set[str] = set()  # groups whose listeners run here
        self.renewed_at: float | None = None  # monotonic time the last successful renewal was sent
        self.nodes: list[tuple[str, str, bool]] = []
        self.owners: dict[str, tuple[str, int, float]] = {}
        self.statuses: dict[tuple[str, str], tuple[str, RemoteStatus]] = {}
        self.draining = False
        self.stood_down = 0  # times this node stopped its groups for want of a renewal
        self._written: dict[tuple[str, str], bytes] = {}  # the record of each listener of ours as last written
        self._since: str | None = None  # where the next status read starts (read_statuses); None: read them all
        self._full_read_at = 0.0  # monotonic time of the last full read
        self._read_lock = asyncio.Lock()  # reads apply in the order they were made
        self.status_reads = {"delta": 0, "delta_rows": 0, "full": 0, "full_rows": 0}  # reads, rows they fetched
        self._wake = asyncio.Event()
        self._status_dirty = asyncio.Event()
        self._interval = self.ttl * RENEW_FRACTION  # until the next round: shorter when a lease can lapse sooner
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        outbox.fence = self._fence
        outbox.keep = self.keeps

    # -- what the rest of the daemon asks

    def owns(self, tenant_id: str, kind: str) -> bool:
        return group_of(tenant_id, kind) in self.running

    def keeps(self, tenant_id: str, listener_id: str) -> bool:
        """Whether this node forwards the listener's waiting events: those of its groups, and the orphans'."""
        group = self._group_of_listener(tenant_id, listener_id)
        if group is not None:
            return group in self.held
        return self._forwards_orphans_of(tenant_id)

    def _forwards_orphans_of(self, tenant_id: str) -> bool:
        """Events of a listener no longer defined (deleted through the API, or from the config) were committed:
        they are delivered as on one node, by one node, the one every node picks from the same rows: the
        holder of the tenant's first group, else the first member not draining."""
        prefix = tenant_id + "/"
        first = min((g for g in self.owners if g.startswith(prefix)), default=None)
        if first is not None:
            return first in self.held
        members = [node for node, _, draining in self.nodes if not draining]
        return bool(members) and members[0] == self.node

    def holds_leases(self) -> bool:
        """Ready: a member whose leases are renewed (and at least the first renewal round done)."""
        return (not self.draining and self.renewed_at is not None
                and time.monotonic() - self.renewed_at < self.ttl * STAND_DOWN_FRACTION)

    def remote_status(self, key: tuple[str, str]) -> RemoteStatus | None:
        """The owner's last record; `starting` when the node that wrote it no longer holds the group (a record
        of a dead or paused node must not say `started` once its lease is gone)."""
        found = self.statuses.get(key)
        if found is None:
            return None
        node, status = found
        group = self._group_of_listener(*key)
        if group is None:  # deleted (the index follows every node's API writes): its last record is no answer
            return None
        lease = self.owners.get(group)
        if lease is None or lease[0] != node:
            return RemoteStatus({**status.as_json(), "status": "starting", "node": lease[0] if lease else None,
                                 "message": f"Moving: node {node} no longer holds its connection group"})
        return status

    def owner_of(self, tenant_id: str, listener_id: str) -> tuple[str, str] | None:
        """(node, advertise address) of the node running this listener's group, if any."""
        group = self._group_of_listener(tenant_id, listener_id)
        lease = self.owners.get(group) if group else None
        if lease is None:
            return None
        advertise = next((a for n, a, _ in self.nodes if n == lease[0]), "")
        return lease[0], advertise

    def view(self) -> dict[str, Any]:
        """The cluster as this node sees it (/metrics)."""
        return {"nodes": len([n for n in self.nodes if not n[2]]), "groups_owned": len(self.held),
                "lease_age": time.monotonic() - self.renewed_at if self.renewed_at is not None else None}

    def _group_of_listener(self, tenant_id: str, listener_id: str) -> str | None:
        from listenerd.model import integration_type

        spec = self.fleet().index.get(tenant_id, listener_id)
        return group_of(tenant_id, integration_type(spec.type)) if spec is not None else None

    def _fence(self, conn: Any, listeners: set[tuple[str, str]]) -> set[tuple[str, str]]:
        """Inside a commit's transaction: the listeners whose groups this node does not hold now."""
        groups = {k: self._group_of_listener(*k) for k in listeners}
        wanted = {g: self.held[g] for g in groups.values() if g is not None and g in self.held}
        held = holding(conn, self.node, wanted)
        return {k for k, g in groups.items() if g not in held}

    # -- lifecycle

    async def start(self) -> None:
        # a node stopped in the middle of a transaction (SIGSTOP) must not hold lease rows locked for the others:
        # the server ends such a transaction at half the TTL; and no statement waits on a lock past a quarter of
        # it (a wait that long fails, and is retried, rather than stall the store thread)
        await self.store.run(lambda c: (
            c.apply("idle_in_transaction_session_timeout", f"{int(self.ttl * 500)}ms"),
            c.apply("lock_timeout", f"{int(self.ttl * 250)}ms")))
        await self.store.run(lambda c: heartbeat(c, self.node, self.advertise, False))
        await self._tick()
        self._tasks = [asyncio.create_task(self._loop(), name="cluster-loop"),
                       asyncio.create_task(self._watch(), name="cluster-watchdog"),
                       asyncio.create_task(self._statuses(), name="cluster-status"),
                       asyncio.create_task(self._listen(), name="cluster-listen")]
        log.info("cluster member", node=self.node, lease_ttl=self.ttl, groups=len(self.held))

    async def stop(self, timeout: float = 10.0) -> None:
        """Hand every group over at once: stop its sources, commit what they appended, release, notify."""
        self.draining = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a round that does not end when asked must not hold the hand-over
            _, late = await asyncio.wait(self._tasks, timeout=timeout)
            if late:
                log.error("cluster tasks did not end when asked; handing over regardless",
                          tasks=sorted(t.get_name() for t in late))
        self._tasks = []
        async with self._lock:
            await self._stop_groups(list(self.running))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.outbox.flush(), timeout)
            held, self.held = dict(self.held), {}
            try:
                await self.store.transaction(lambda c: (release(c, self.node, held),
                                                        c.execute("DELETE FROM cluster_nodes WHERE node = ?",
                                                                  (self.node,)),
                                                        notify(c, {"members": self.node})))
            except Exception as exc:  # the database is away: the leases lapse after the TTL instead
                log.error("could not hand the groups over; they move when their leases expire", error=str(exc))
        log.info("cluster groups handed over", node=self.node, groups=len(held))

    # -- the loops

    async def _loop(self) -> None:
        while not self.draining:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster round failed; leases run on until renewed or the stand-down", error=str(exc))

    async def _watch(self) -> None:
        """Stop this node's sources before its leases can expire when renewals do not get through."""
        while True:
            await asyncio.sleep(min(0.25, self.ttl / 20))
            if self.running and self.renewed_at is not None and \
                    time.monotonic() - self.renewed_at >= self.ttl * STAND_DOWN_FRACTION:
                await self._stand_down("no lease renewal within three quarters of the lease TTL")

    async def _stand_down(self, why: str) -> None:
        async with self._lock:
            if not self.running:
                return
            self.stood_down += 1
            log.error("standing down: stopping every source of this node", node=self.node, why=why,
                      groups=len(self.running))
            await self._stop_groups(list(self.running))
            self.held.clear()

    async def _tick(self) -> None:
        async with self._lock:
            sent = time.monotonic()
            held = dict(self.held)

            def round_trip(c: Any) -> tuple[set[str], list, dict]:
                heartbeat(c, self.node, self.advertise, self.draining)
                return renew(c, self.node, held, self.ttl), members(c, self.ttl), live_leases(c)

            renewed, self.nodes, self.owners = await self.store.transaction(round_trip)
            if time.monotonic() - sent < self.ttl * STAND_DOWN_FRACTION:
                self.renewed_at = sent
            lost = sorted(set(held) - renewed)  # expired meanwhile (a pause): someone may run them now
            for group in lost:
                log.error("lease lost; stopping the group", group=group, node=self.node)
                self.held.pop(group, None)
            await self._stop_groups(lost)
            weights = self._weights()
            nodes = [n for n, _, draining in self.nodes if not draining]
            if self.node not in nodes and not self.draining:
                nodes.append(self.node)
            placed = place(weights, nodes, {g: lease[0] for g, lease in self.owners.items()})
            wanted = sorted(g for g, n in placed.items()
                            if n == self.node and g not in self.held and g not in self.owners)
            if wanted:
                def take(c: Any) -> dict[str, int]:
                    got = acquire_many(c, wanted, self.node, self.ttl)
                    if got:  # the other nodes learn the new owner now, not at their next round (up to TTL/3 on):
                        notify(c, {"members": self.node})  # until then their API answers `starting` for the group
                    return got

                try:
                    taken = await self.store.transaction(take)
                except sqlite3.Error as exc:  # a row locked (a paused holder mid-commit): next round
                    log.info("groups not taken this round", groups=len(wanted), error=str(exc))
                    taken = {}
                for group, epoch in sorted(taken.items()):
                    self.held[group] = epoch
                    self.owners[group] = (self.node, epoch, self.ttl)
                    await self._start_group(group)
            # wake when the first lease of another node can lapse: its group is placed again at once
            lapsing = [left for n, _, left in self.owners.values() if n != self.node]
            self._interval = min([self.ttl * RENEW_FRACTION, *(left + 0.05 for left in lapsing)])
            moving = {g: e for g, e in self.held.items() if placed.get(g) not in (None, self.node)}
            if moving:  # balance: hand them to their new nodes now
                await self._stop_groups(list(moving))
                for group in moving:
                    self.held.pop(group)
                await self.store.transaction(lambda c: (release(c, self.node, moving),
                                                        notify(c, {"members": self.node})))
                for group in moving:
                    log.info("group handed over for balance", group=group, to=placed[group])
            for group in set(self.held) - self.running:
                await self._start_group(group)
            if self.metrics is not None:
                self.metrics.cluster(self.view())

    def _weights(self) -> dict[str, int]:
        from listenerd.model import integration_type

        weights: dict[str, int] = {}
        index = self.fleet().index
        for tenant_id in index.tenants():
            for spec in index.of_tenant(tenant_id):
                group = group_of(tenant_id, integration_type(spec.type))
                weights[group] = weights.get(group, 0) + 1
        return weights

    async def _start_group(self, group: str) -> None:
        tenant_id, kind = group.rsplit("/", 1)
        ids = self._listener_ids(tenant_id, kind)
        events, size = await self.store.run(lambda c: segments.waiting(c, tenant_id, ids))
        self.outbox.adopt(events, size)
        self.rewind()  # the old owner's backlog has lower seqs: forward it first
        self.running.add(group)
        await self.fleet().integration_changed(tenant_id, kind, announce=False)
        log.info("group started here", group=group, node=self.node, epoch=self.held.get(group), backlog=events)

    async def _stop_groups(self, groups: list[str]) -> None:
        """Stop every listener of these groups together (before the leases can lapse), then stop counting their
        waiting events as this node's."""
        groups = [g for g in groups if g in self.running]
        if not groups:
            return
        self.running.difference_update(groups)
        members = {g: (g.rsplit("/", 1)[0], self._listener_ids(*g.rsplit("/", 1))) for g in groups}
        await self.fleet().supervisor.release([(t, lid) for t, ids in members.values() for lid in ids],
                                              "Stopped: its connection group moved to another node")
        for tenant_id, ids in members.values():
            with contextlib.suppress(Exception):
                events, size = await self.store.run(lambda c, t=tenant_id, i=ids: segments.waiting(c, t, i))
                self.outbox.disown(events, size)

    def _listener_ids(self, tenant_id: str, kind: str) -> list[str]:
        from listenerd.model import integration_type

        return [s.id for s in self.fleet().index.of_tenant(tenant_id) if integration_type(s.type) == kind]

    def status_changed(self) -> None:
        """A listener of this node changed status: write the records now (well, within 50 ms, batched)."""
        self._status_dirty.set()

    async def _statuses(self) -> None:
        """Every second, and on a change of status (then telling the other nodes, which read at once): write the
        records of this node's running listeners that changed, and read what everyone wrote since."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._status_dirty.wait(), 1.0)
            changed = self._status_dirty.is_set()
            if changed:
                await asyncio.sleep(0.05)  # a group's listeners change together: one write for them
                self._status_dirty.clear()
            with contextlib.suppress(Exception):
                await self.publish_statuses(announce=changed)

    async def publish_statuses(self, announce: bool = False) -> None:
        """Write the records of this node's listeners that changed since last written (an unchanged record is
        not written again: nor fetched by the other nodes' reads), then read what the other nodes wrote."""
        supervisor = self.fleet().supervisor
        rows, ours = [], set()
        for (tenant_id, listener_id), record in list(supervisor.records.items()):
            group = self._group_of_listener(tenant_id, listener_id)
            if group is None or group not in self.held:
                continue
            key = (tenant_id, listener_id)
            ours.add(key)
            body = orjson.dumps({**record.as_json(), "node": self.node})
            if self._written.get(key) != body:
                rows.append((group, tenant_id, listener_id, body))
        for key in [k for k in self._written if k not in ours]:  # given up: written afresh if it comes back
            del self._written[key]
        if rows:
            held = dict(self.held)
            node = self.node

            def write(c: Any) -> list[tuple[str, str, bytes]]:
                allowed = holding(c, node, {g: held[g] for g in {r[0] for r in rows} if g in held})
                fresh = [(t, lid, b) for g, t, lid, b in rows if g in allowed]
                write_statuses(c, node, fresh)
                if announce and fresh:
                    notify(c, {"status": node, "from": node})
                return fresh

            for tenant_id, listener_id, body in await self.store.transaction(write):
                self._written[(tenant_id, listener_id)] = body
        await self.refresh_statuses()

    async def refresh_statuses(self, full: bool = False) -> None:
        """Read the status records written since the last read; all of them every STATUS_FULL_READ seconds (or
        when `full`), which also deletes those of listeners that no longer exist: the reads between cost what
        changed, not the number of listeners."""
        async with self._read_lock:
            full = full or self._since is None or time.monotonic() - self._full_read_at >= STATUS_FULL_READ
            since = None if full else self._since

            def read(c: Any) -> tuple[str, list]:
                if since is None:
                    drop_statuses(c)
                return read_statuses(c, since)

            began = time.monotonic()
            self._since, rows = await self.store.run(read)
            raw = {(t, lid): (n, bytes(r)) for t, lid, n, r in rows}
            read_now = {key: (n, RemoteStatus(orjson.loads(body))) for key, (n, body) in raw.items()}
            if since is None:
                self._full_read_at = began
                self.statuses = read_now
                # ours as the table holds them: one lost or changed meanwhile (a database failover) is written again
                for key in [k for k, body in self._written.items() if raw.get(k, ("", b""))[1] != body]:
                    del self._written[key]
            else:
                self.statuses.update(read_now)
            kind = "full" if since is None else "delta"
            self.status_reads[kind] += 1
            self.status_reads[kind + "_rows"] += len(rows)

    def _listener_touched(self, tenant_id: str, listener_id: str) -> None:
        """A listener was created, changed or deleted (through any node): its record is written afresh by its
        owner, and a deleted one's last record is no answer any more."""
        self._written.pop((tenant_id, listener_id), None)
        if self.fleet().index.get(tenant_id, listener_id) is None:
            self.statuses.pop((tenant_id, listener_id), None)

    async def announce(self, payload: dict[str, Any]) -> None:
        """Tell the other nodes a listener or integration changed (the owner applies it at once)."""
        await self.store.run(lambda c: notify(c, {**payload, "from": self.node}))
        if "listener" in payload:
            self._listener_touched(*payload["listener"])
        self._wake.set()  # a new listener may change the weights, or be a new group to place

    async def _listen(self) -> None:
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.store.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self._wake.set()  # a reconnect may have missed notifications: look now
                    async for note in conn.notifies():
                        await self._on_notify(orjson.loads(note.payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cluster notifications interrupted; reconnecting", error=str(exc))
                await asyncio.sleep(1.0)

    async def _on_notify(self, payload: dict[str, Any]) -> None:
        if payload.get("from") == self.node:
            return
        if "status" in payload:
            with contextlib.suppress(Exception):
                await self.refresh_statuses()
        elif "members" in payload:
            self._wake.set()
        elif "listener" in payload:
            await self.fleet().listener_changed(*payload["listener"], announce=False)
            self._listener_touched(*payload["listener"])
            self._wake.set()  # a new listener may change the weights
        elif "integration" in payload:
            await self.fleet().integration_changed(*payload["integration"], announce=False)
        elif "restart" in payload:  # asked through another node's API (restarts it only where it runs)
            await self.fleet().supervisor.restart(tuple(payload["restart"]))
        elif "checkpoint" in payload:  # set through another node's API: stop, write, start from there (if ours)
            tenant_id, listener_id, replay = payload["checkpoint"]

            async def write() -> None:
                await self.store.set_checkpoint(tenant_id, listener_id, str(replay))
            await self.fleet().supervisor.restart((tenant_id, listener_id), while_stopped=write,
                                                  replay_from=str(replay))


Announce = Callable[[dict[str, Any]], Awaitable[None]]
