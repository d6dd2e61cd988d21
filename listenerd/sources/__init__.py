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


def load_all() -> dict[str, SourceRun]:
    """Import every provider's module now. The daemon does this at start-up, before its API answers: else
    the first listener of a type imports its module inside a task step, on the event loop, while requests
    wait (15-40 ms for each of pusher, datasift and salesforce, about 100 for salesforce-pubsub's gRPC)."""
    return {source_type: source_for(source_type) for source_type in _MODULES}


def source_for(source_type: str) -> SourceRun:
    if source_type in _EXTRA:
        return _EXTRA[source_type]
    return importlib.import_module(_MODULES[source_type]).run
