"""The listeners of each tenant in memory, in a stable order: what lists, filters and summaries read.

Without it, every list read every listener of the tenant from the store and parsed it again. The
index holds the same parsed definitions the supervisor runs (no second copy), per tenant in the
natural order of their ids (`LI2` before `LI10`, so listeners made through the API list in the order
they were made), which never changes as others come and go: a page that starts after an id sees
every listener after it exactly once, whatever was inserted or deleted before it. `Fleet` keeps it
in step with the store (each API change, and the whole set at start and on reload).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable, Iterable, Iterator

from listenerd.model import ListenerBase

_TRAILING_NUMBER = re.compile(r"^(.*?)(\d*)$")
SortKey = tuple[str, int, str]


def sort_key(listener_id: str) -> SortKey:
    """Natural order: the text before a trailing number, then the number, then the id (a tie-break)."""
    match = _TRAILING_NUMBER.match(listener_id)
    assert match is not None  # the pattern matches every string
    prefix, digits = match.groups()
    return prefix, int(digits) if digits else -1, listener_id


class _Tenant:
    __slots__ = ("keys", "specs")

    def __init__(self) -> None:
        self.keys: list[SortKey] = []  # sorted
        self.specs: dict[str, ListenerBase] = {}


class ListenerIndex:
    def __init__(self) -> None:
        self._tenants: dict[str, _Tenant] = {}

    def replace(self, entries: Iterable[tuple[str, ListenerBase]]) -> None:
        """Become exactly `entries` ((tenant id, definition) pairs): the whole set, read once."""
        tenants: dict[str, _Tenant] = {}
        for tenant_id, spec in entries:
            tenants.setdefault(tenant_id, _Tenant()).specs[spec.id] = spec
        for tenant in tenants.values():
            tenant.keys = sorted(sort_key(i) for i in tenant.specs)
        self._tenants = tenants

    def put(self, tenant_id: str, spec: ListenerBase) -> None:
        tenant = self._tenants.setdefault(tenant_id, _Tenant())
        if spec.id not in tenant.specs:
            bisect.insort(tenant.keys, sort_key(spec.id))
        tenant.specs[spec.id] = spec

    def remove(self, tenant_id: str, listener_id: str) -> None:
        tenant = self._tenants.get(tenant_id)
        if tenant is None or tenant.specs.pop(listener_id, None) is None:
            return
        key = sort_key(listener_id)
        del tenant.keys[bisect.bisect_left(tenant.keys, key)]
        if not tenant.specs:
            del self._tenants[tenant_id]

    def tenants(self) -> list[str]:
        return list(self._tenants)

    def get(self, tenant_id: str, listener_id: str) -> ListenerBase | None:
        tenant = self._tenants.get(tenant_id)
        return tenant.specs.get(listener_id) if tenant else None

    def count(self, tenant_id: str | None = None) -> int:
        if tenant_id is None:
            return sum(len(t.specs) for t in self._tenants.values())
        tenant = self._tenants.get(tenant_id)
        return len(tenant.specs) if tenant else 0

    def of_tenant(self, tenant_id: str, after: str | None = None) -> Iterator[ListenerBase]:
        """A tenant's listeners in order, from the first after the id `after` (which need not exist any more)."""
        tenant = self._tenants.get(tenant_id)
        if tenant is None:
            return
        start = 0 if after is None else bisect.bisect_right(tenant.keys, sort_key(after))
        keys, specs = tenant.keys, tenant.specs
        for i in range(start, len(keys)):
            spec = specs.get(keys[i][2])
            if spec is not None:
                yield spec

    def page(self, tenant_id: str, after: str | None, limit: int,
             keep: Callable[[ListenerBase], bool] | None = None) -> tuple[list[ListenerBase], bool]:
        """Up to `limit` listeners after `after` that `keep` accepts, and whether more follow."""
        found: list[ListenerBase] = []
        for spec in self.of_tenant(tenant_id, after):
            if keep is None or keep(spec):
                if len(found) == limit:
                    return found, True
                found.append(spec)
        return found, False
