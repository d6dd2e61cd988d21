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

import orjson

_MISSING = object()
_SCALAR_BYTES = 24  # a number, true/false/null as JSON: at most this


class EventTooLarge(ValueError):
    """The mapped event would pass the size bound; `size` is how far the estimate had got."""

    def __init__(self, size: int, limit: int):
        super().__init__(f"the mapped event passes {limit} bytes (at least {size})")
        self.size = size
        self.limit = limit


@dataclass(frozen=True, slots=True)
class CompiledMapping:
    fields: tuple[tuple[str, tuple[str, ...]], ...]

    def apply(self, payload: Any, meta: Mapping[str, Any] | None = None,
              max_bytes: int | None = None) -> dict[str, Any]:
        """The normalized event: every field whose path resolves.

        With `max_bytes`, raise `EventTooLarge` as soon as the event's JSON size passes it: a mapping
        that names one big field many times is stopped before the copies are built (mapping amplification).
        """
        if not self.fields:
            return payload if isinstance(payload, dict) else {"value": payload}
        event: dict[str, Any] = {}
        total = 2
        sizes: dict[int, int] = {}  # id(value) -> its JSON size, so a value named many times is measured once
        for name, path in self.fields:
            value = resolve(payload, meta, path)
            if value is not _MISSING:
                event[name] = value
                if max_bytes is not None:
                    total += len(name) + 4 + _json_size(value, sizes)
                    if total > max_bytes:
                        raise EventTooLarge(total, max_bytes)
        return event

    def unresolved(self, payload: Any, meta: Mapping[str, Any] | None = None) -> list[str]:
        """The output fields whose paths did not resolve, for `listenerd map`."""
        return [name for name, path in self.fields if resolve(payload, meta, path) is _MISSING]


def _json_size(value: Any, sizes: dict[int, int]) -> int:
    """About the JSON size of `value` (a lower bound for strings: escapes are not counted)."""
    if isinstance(value, str):
        return len(value) + 2
    if not isinstance(value, dict | list):
        return _SCALAR_BYTES
    size = sizes.get(id(value))
    if size is None:
        try:
            size = sizes[id(value)] = len(orjson.dumps(value))
        except (TypeError, orjson.JSONEncodeError):
            size = sizes[id(value)] = _SCALAR_BYTES  # not JSON: the outbox will say so
    return size


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


def check_bounds(mapping: Mapping[str, str], max_fields: int, max_path_length: int, max_segments: int) -> None:
    """Refuse a mapping past the `[limits]` bounds: a mapping of thousands of fields pointing at one big
    field turns each event into an envelope of that many copies (mapping amplification)."""
    if len(mapping) > max_fields:
        raise ValueError(f"at most {max_fields} fields (limits.mapping-max-fields; got {len(mapping)})")
    for name, path in mapping.items():
        if len(name) > max_path_length:
            raise ValueError(f"mapping.{name[:64]}: field name longer than {max_path_length} characters "
                             f"(limits.mapping-max-path-length)")
        if len(path) > max_path_length:
            raise ValueError(f"mapping.{name}: path longer than {max_path_length} characters "
                             f"(limits.mapping-max-path-length; got {len(path)})")
        if path.count(".") + 1 > max_segments:
            raise ValueError(f"mapping.{name}: more than {max_segments} path segments "
                             f"(limits.mapping-max-path-segments; got {path.count('.') + 1})")


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
