"""The HTTP API: one module per resource, each exporting `routes` (an aiohttp RouteTableDef)."""

from __future__ import annotations

import importlib

from aiohttp import web

_RESOURCES = ("health", "listeners", "integrations", "checkpoints", "dead_letters", "tap", "openapi")


def resources() -> list[web.RouteTableDef]:
    """Route tables of every resource module present."""
    tables = []
    for name in _RESOURCES:
        try:
            module = importlib.import_module(f"listenerd.api.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"listenerd.api.{name}":
                raise
            continue
        tables.append(module.routes)
    return tables
