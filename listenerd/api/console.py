"""The web console: static HTML, CSS and JavaScript from the package, served without auth.

The page holds no data: it asks for a token and reads the same `/1.0` API as everyone else with it
(DESIGN.md, "People's views"), so it can show nothing the token could not fetch with curl. Only the
files named here are served, each with a strict Content-Security-Policy (no inline script, no other
origin), and never cached, so an upgraded daemon serves its own console.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

routes = web.RouteTableDef()
FILES = {"index.html": "text/html", "console.css": "text/css", "console.js": "text/javascript"}
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
                                      "script-src 'self'; connect-src 'self'; frame-ancestors 'none'",
           "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"}


def _file(name: str) -> web.Response:
    if name not in FILES:
        raise web.HTTPNotFound(text=f"no console file {name[:64]!r}")
    body = resources.files("listenerd.console").joinpath(name).read_bytes()
    return web.Response(body=body, content_type=FILES[name], charset="utf-8", headers=HEADERS)


@routes.get("/console")
async def console_root(request: web.Request) -> web.Response:
    raise web.HTTPFound("/console/")


@routes.get("/console/")
async def console_index(request: web.Request) -> web.Response:
    return _file("index.html")


@routes.get("/console/{name}")
async def console_file(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])
