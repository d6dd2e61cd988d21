"""Source implementations, one module per provider, looked up by listener type."""

from __future__ import annotations

import importlib

from listenerd.sources.base import SourceRun

_MODULES = {"datasift": "listenerd.sources.datasift", "pusher": "listenerd.sources.pusher",
            "salesforce": "listenerd.sources.salesforce",
            "salesforce-pubsub": "listenerd.sources.salesforce_pubsub"}
_EXTRA: dict[str, SourceRun] = {}


def register(source_type: str, run: SourceRun) -> None:
    """Add a source type at run time (tests use this for their scripted sources)."""
    _EXTRA[source_type] = run


def source_for(source_type: str) -> SourceRun:
    if source_type in _EXTRA:
        return _EXTRA[source_type]
    return importlib.import_module(_MODULES[source_type]).run
