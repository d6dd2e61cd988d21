"""Field mappings: `{"username": "interaction.author.username"}` compiled once, applied per event.

A path is dot-separated keys; a numeric segment also indexes an array. A path that does not
resolve leaves its field out and is never an error. Paths starting with `$` read the protocol
metadata the source passes beside the payload (`$channel`, `$event.type`, `$hash`, ...).
An empty mapping passes the payload through whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_MISSING = object()


@dataclass(frozen=True, slots=True)
class CompiledMapping:
    fields: tuple[tuple[str, tuple[str, ...]], ...]

    def apply(self, payload: Any, meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The normalized event: every field whose path resolves."""
        if not self.fields:
            return payload if isinstance(payload, dict) else {"value": payload}
        event: dict[str, Any] = {}
        for name, path in self.fields:
            value = resolve(payload, meta, path)
            if value is not _MISSING:
                event[name] = value
        return event

    def unresolved(self, payload: Any, meta: Mapping[str, Any] | None = None) -> list[str]:
        """The output fields whose paths did not resolve, for `listenerd map`."""
        return [name for name, path in self.fields if resolve(payload, meta, path) is _MISSING]


def compile_mapping(mapping: Mapping[str, str] | None) -> CompiledMapping:
    """Check and split every path once. Raises ValueError naming the offending field."""
    fields = []
    for name, path in (mapping or {}).items():
        if not isinstance(name, str) or not name:
            raise ValueError("mapping field names must be non-empty strings")
        if not isinstance(path, str) or not path:
            raise ValueError(f"mapping.{name}: path must be a non-empty string")
        segments = tuple(path.split("."))
        if any(segment == "" for segment in segments):
            raise ValueError(f"mapping.{name}: path {path!r} has an empty segment")
        fields.append((name, segments))
    return CompiledMapping(tuple(fields))


def resolve(payload: Any, meta: Mapping[str, Any] | None, path: tuple[str, ...]) -> Any:
    """Walk `path`; `_MISSING` when any step fails. `$`-rooted paths start in `meta`."""
    head = path[0]
    if head.startswith("$"):
        if meta is None or head not in meta:
            return _MISSING
        current, rest = meta[head], path[1:]
    else:
        current, rest = payload, path
    for segment in rest:
        if isinstance(current, dict):
            current = current.get(segment, _MISSING)
        elif isinstance(current, list) and segment.isdigit():
            index = int(segment)
            current = current[index] if index < len(current) else _MISSING
        else:
            return _MISSING
        if current is _MISSING:
            return _MISSING
    return current
