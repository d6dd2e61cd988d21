"""The HTTP API: one module per resource, each exporting `routes` (an aiohttp RouteTableDef)."""

from __future__ import annotations

from aiohttp import web


def resources() -> list[web.RouteTableDef]:
    """Route tables of every resource module, imported here to keep `app` free of import cycles."""
    from listenerd.api import checkpoints, dead_letters, health, integrations, listeners, openapi, tap

    return [module.routes for module in (health, listeners, integrations, checkpoints, dead_letters, tap, openapi)]
