"""The OpenAPI 3.1 document of every route, served at /1.0/openapi.json.

Request bodies reuse the pydantic models' JSON schemas, so the document cannot drift from the
validation the handlers run; tests check that every route of the app is described and vice versa,
and schemathesis fuzzes the running daemon against it.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import TypeAdapter

from listenerd import version
from listenerd.control import DEFAULT_LIMIT, MAX_LIMIT
from listenerd.model import INTEGRATION_TYPES, LISTENER_TYPES, Listener
from listenerd.status import STATES

routes = web.RouteTableDef()

ERROR = {"$ref": "#/components/schemas/Error"}
TENANT = {"name": "tid", "in": "path", "required": True, "schema": {"type": "string"}}
LISTENER_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
DEAD_LETTER_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
TYPE = {"name": "type", "in": "path", "required": True, "schema": {"type": "string"}}
PAGE = [{"name": "limit", "in": "query", "required": False, "description": "items per page",
         "schema": {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT}},
        {"name": "cursor", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "opaque; the next page's URL, cursor included, is in the Link header (rel=\"next\"), "
                        "absent on the last page"}]
LISTENER_FILTERS = [
    {"name": "status", "in": "query", "required": False, "description": "only listeners in this runtime status",
     "schema": {"enum": list(STATES)}},
    {"name": "type", "in": "query", "required": False, "description": "only listeners of this type",
     "schema": {"enum": list(LISTENER_TYPES)}}]
DEAD_LETTER_FILTERS = [
    {"name": "listener-id", "in": "query", "required": False, "schema": {"type": "string"},
     "description": "only this listener's dead letters"},
    {"name": "status-code", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 0,
                                                                          "maximum": 999},
     "description": "only batches the engine answered with this status code"},
    {"name": "type", "in": "query", "required": False, "schema": {"enum": list(LISTENER_TYPES)},
     "description": "only the dead letters of the tenant's listeners of this type"}]
LINK = {"Link": {"description": "<url>; rel=\"next\": the next page, when there is one",
                 "schema": {"type": "string"}}}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _page(schema: dict[str, Any], description: str) -> dict[str, Any]:
    """A page of a list: a bare JSON array, the next page in the Link header."""
    return {**_json({"type": "array", "items": schema}, description), "headers": LINK}


def _errors(*codes: int) -> dict[str, Any]:
    text = {400: "bad body or parameters; the error names the field", 401: "no or bad token",
            403: "the token may not use that tenant", 404: "no such tenant or item",
            408: "the body did not arrive within server.header-timeout",
            409: "declared in the config file, or the id is taken",
            429: "a tenant quota ([limits]: listeners or writes per second): try again after Retry-After seconds",
            503: "not loaded yet, or the store is failing (disk full): try again after Retry-After seconds"}
    return {str(code): _json(ERROR, text[code]) for code in codes}


def _op(summary: str, ok: dict[str, Any], params: list[dict], *errors: int, body: dict | None = None,
        auth: bool = True) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "parameters": params, "responses": {**ok, **_errors(*errors)}}
    if body is not None:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if not auth:
        operation["security"] = []
    return operation


def document() -> dict[str, Any]:
    listener_input = TypeAdapter(Listener).json_schema(by_alias=True, mode="validation",
                                                       ref_template="#/components/schemas/{model}")
    defs = listener_input.pop("$defs", {})
    for schema in defs.values():
        schema.get("properties", {}).pop("managed-by", None)
    auth = (401, 403, 404, 503)  # 503: every route below /1.0 may meet a failing store
    body_errors = (400, 401, 403, 404, 408, 429, 503)  # every body is a write: the tenant's write quota applies
    listener = {"$ref": "#/components/schemas/Listener"}
    lparams = [TENANT, LISTENER_ID]
    paths = {
        "/1.0/tenants": {
            "get": _op("The tenants this token may use", {"200": _json({"type": "array", "items": {
                "$ref": "#/components/schemas/Tenant"}}, "tenants")}, [], 401, 503),
        },
        "/1.0/engine": {
            "get": _op("The delivery side, daemon-wide: engine state, outbox depth, store health (any token)",
                       {"200": _json({"$ref": "#/components/schemas/Engine"}, "engine state")}, [], 401, 503),
        },
        "/1.0/tenants/{tid}/listeners": {
            "get": _op("List listeners, a page at a time, in id order (LI2 before LI10)",
                       {"200": _page(listener, "listeners")}, [TENANT, *PAGE, *LISTENER_FILTERS], 400, *auth),
            "post": _op("Create a listener (starts at once when status is true)",
                        {"201": _json(listener, "created")}, [TENANT], *body_errors, 409,
                        body={"$ref": "#/components/schemas/ListenerInput"}),
        },
        "/1.0/tenants/{tid}/listeners/status": {
            "get": _op("A tenant's health: counts per runtime status, and every listener not started",
                       {"200": _json({"$ref": "#/components/schemas/Summary"}, "summary")}, [TENANT], *auth),
        },
        "/1.0/tenants/{tid}/listeners/{id}": {
            "get": _op("Retrieve a listener", {"200": _json(listener, "the listener")}, lparams, *auth),
            "put": _op("Update the fields given; the listener restarts", {"200": _json(listener, "updated")},
                       lparams, *body_errors, 409, body={"$ref": "#/components/schemas/ListenerUpdate"}),
            "delete": _op("Delete a listener; it stops at once", {"204": {"description": "deleted"}}, lparams,
                          *auth, 409, 429),
        },
        "/1.0/tenants/{tid}/listeners/{id}/status": {
            "get": _op("A listener's status", {"200": _json({"$ref": "#/components/schemas/Status"}, "status")},
                       lparams, *auth, 503),
        },
        "/1.0/tenants/{tid}/listeners/{id}/restart": {
            "post": _op("Restart now, also out of failed", {"202": _json({"type": "object"}, "restarting")},
                        lparams, *auth, 429),
        },
        "/1.0/tenants/{tid}/listeners/{id}/checkpoint": {
            "get": _op("The stored resume point", {"200": _json({"$ref": "#/components/schemas/Checkpoint"},
                                                                "checkpoint")}, lparams, *auth),
            "put": _op("Set the resume point; the listener restarts from there",
                       {"200": _json({"$ref": "#/components/schemas/Checkpoint"}, "stored")}, lparams,
                       *body_errors, body={"$ref": "#/components/schemas/Checkpoint"}),
        },
        "/1.0/tenants/{tid}/listeners/{id}/tap": {
            "get": _op("Server-sent events: each normalized event as it passes",
                       {"200": {"description": "event stream", "content": {"text/event-stream": {
                           "schema": {"type": "string"}}}}}, lparams, *auth),
        },
        "/1.0/tenants/{tid}/dead-letters": {
            "get": _op("Batches the engine refused, a page at a time, oldest first", {"200": _page(
                {"$ref": "#/components/schemas/DeadLetter"}, "dead letters")}, [TENANT, *PAGE, *DEAD_LETTER_FILTERS],
                400, *auth),
        },
        "/1.0/tenants/{tid}/dead-letters/{id}/retry": {
            "post": _op("Queue a dead letter for delivery again", {"202": _json({"type": "object"}, "queued")},
                        [TENANT, DEAD_LETTER_ID], *auth, 429),
        },
        "/1.0/tenants/{tid}/dead-letters/{id}": {
            "get": _op("Retrieve a dead letter", {"200": _json({"$ref": "#/components/schemas/DeadLetter"},
                                                               "dead letter")}, [TENANT, DEAD_LETTER_ID], *auth),
            "delete": _op("Discard a dead letter", {"204": {"description": "discarded"}}, [TENANT, DEAD_LETTER_ID],
                          *auth, 429),
        },
        "/1.0/tenants/{tid}/integrations": {
            "get": _op("List integrations, secrets masked", {"200": _json({"type": "array", "items": {
                "$ref": "#/components/schemas/Integration"}}, "integrations")}, [TENANT], *auth),
        },
        "/1.0/tenants/{tid}/integrations/{type}": {
            "get": _op("Retrieve an integration, secrets masked",
                       {"200": _json({"$ref": "#/components/schemas/Integration"}, "integration")},
                       [TENANT, TYPE], *auth),
            "post": _op("Set up or replace that type's credentials; listeners using it restart. 400 names the field "
                        "when a URL or host is outside [server.egress] (TLS and the provider's hosts by default) "
                        "or a secret is too short (under 8 characters), too common or too repetitive",
                        {"200": _json({"$ref": "#/components/schemas/Integration"}, "stored, secrets masked")},
                        [TENANT, TYPE], *body_errors, 409, body={"type": "object"}),
        },
        "/console": {"get": _op("Redirect to /console/", {"302": {"description": "to /console/"}}, [], auth=False)},
        "/console/": {"get": _op("The web console (it asks for a token and reads this API with it)",
                                 {"200": {"description": "HTML", "content": {"text/html": {
                                     "schema": {"type": "string"}}}}}, [], 404, auth=False)},
        "/console/{name}": {"get": _op("The console's stylesheet and script (console.css, console.js)",
                                       {"200": {"description": "the file", "content": {
                                           "text/css": {"schema": {"type": "string"}},
                                           "text/javascript": {"schema": {"type": "string"}}}}},
                                       [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}],
                                       404, auth=False)},
        "/healthz": {"get": _op("Liveness", {"200": _json({"type": "object"}, "running")}, [], auth=False)},
        "/readyz": {"get": _op("Readiness: store, supervisor and, in a cluster, `cluster` (this node holds its "
                               "leases)", {"200": _json({"type": "object"}, "ready"),
                                             "503": _json({"type": "object"}, "not ready")}, [], auth=False)},
        "/metrics": {"get": _op("Prometheus metrics; with server.metrics-token set, that bearer token is needed",
                                {"200": {"description": "text format", "content": {
                                    "text/plain": {"schema": {"type": "string"}}}}}, [], 401, auth=False)},
        "/1.0/openapi.json": {"get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.1")}, [],
                                         401)},
    }
    nullable_time = {"type": ["string", "null"], "format": "date-time"}
    schemas: dict[str, Any] = {
        **defs,
        "ListenerInput": listener_input,
        "ListenerUpdate": {"type": "object", "properties": {
            "name": {"type": "string"}, "description": {"type": "string"}, "status": {"type": "boolean"},
            "type": {"enum": list(LISTENER_TYPES)}, "options": {"type": "object"},
            "mapping": {"type": "object", "additionalProperties": {"type": "string"}}}, "additionalProperties": False},
        "Listener": {"type": "object", "required": ["id", "name", "description", "status", "type", "options",
                                                    "mapping", "managed-by"],
                     "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                                    "description": {"type": "string"}, "status": {"type": "boolean"},
                                    "type": {"enum": list(LISTENER_TYPES)},
                                    "options": {"type": "object"},
                                    "mapping": {"type": "object", "additionalProperties": {"type": "string"}},
                                    "managed-by": {"enum": ["config", "api"]}}},
        "Status": {"type": "object", "required": ["status", "message", "since", "received", "forwarded",
                                                  "last-event-at", "last-error", "attempts", "rate", "history"],
                   "properties": {"status": {"enum": ["starting", "started", "retrying", "failed", "stopped"]},
                                  "message": {"type": "string"}, "since": {"type": "string", "format": "date-time"},
                                  "received": {"type": "integer"}, "forwarded": {"type": "integer"},
                                  "last-event-at": nullable_time, "last-error": {"type": ["string", "null"]},
                                  "attempts": {"type": "integer"},
                                  "node": {"type": ["string", "null"], "description": "in a cluster only: the node "
                                           "that runs the listener (null while its group moves)"},
                                  "rate": {"type": "number", "description": "events per second, averaged over "
                                                                           "the last 60 s"},
                                  "history": {"type": "array", "description": "the last 20 status changes, "
                                                                              "oldest first",
                                              "items": {"type": "object", "required": ["status", "message", "at"],
                                                        "properties": {"status": {"type": "string"},
                                                                       "message": {"type": "string"},
                                                                       "at": {"type": "string",
                                                                              "format": "date-time"}}}}}},
        "Tenant": {"type": "object", "required": ["id", "name"],
                   "properties": {"id": {"type": "string"}, "name": {"type": "string"}}},
        "Engine": {"type": "object", "required": ["engine", "outbox", "store"], "properties": {
            "engine": {"type": "object", "required": ["state", "in-flight", "attempt", "last-error"], "properties": {
                "state": {"enum": ["idle", "delivering", "retrying", "stopped"]},
                "in-flight": {"type": "integer", "description": "events in the batch being sent"},
                "attempt": {"type": "integer", "description": "failed attempts of the batch being sent"},
                "last-error": {"type": ["string", "null"]}}},
            "outbox": {"type": "object", "required": ["events", "bytes", "max-events", "max-bytes", "oldest-age"],
                       "properties": {"events": {"type": "integer"}, "bytes": {"type": "integer"},
                                      "max-events": {"type": "integer"}, "max-bytes": {"type": "integer"},
                                      "oldest-age": {"type": "number", "description": "seconds"}}},
            "store": {"type": "object", "required": ["writing", "problem"], "properties": {
                "writing": {"type": "boolean"}, "problem": {"type": ["string", "null"]}}}}},
        "Summary": {"type": "object", "required": ["total", "counts", "not-started"], "properties": {
            "total": {"type": "integer"},
            "counts": {"type": "object", "required": list(STATES),
                       "properties": {state: {"type": "integer"} for state in STATES}},
            "not-started": {"type": "array", "description": "every listener whose runtime status is not started, "
                            "disabled ones (enabled false, status stopped) included", "items": {
                "type": "object", "required": ["id", "name", "type", "enabled", "status", "message", "since",
                                               "last-error"],
                "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                               "type": {"enum": list(LISTENER_TYPES)}, "enabled": {"type": "boolean"},
                               "status": {"enum": list(STATES)}, "message": {"type": "string"},
                               "since": {"type": ["string", "null"]}, "last-error": {"type": ["string", "null"]}}}}}},
        "Checkpoint": {"type": "object", "required": ["replay"], "additionalProperties": False,
                       "properties": {"replay": {"type": "integer", "minimum": -2}}},
        "Integration": {"type": "object", "required": ["id", "type", "managed-by"],
                        "properties": {"id": {"enum": list(INTEGRATION_TYPES)},
                                       "type": {"enum": list(INTEGRATION_TYPES)},
                                       "managed-by": {"enum": ["config", "api"]}}},
        "DeadLetter": {"type": "object", "required": ["id", "listener-id", "status-code", "response", "failed-at",
                                                      "events"],
                       "properties": {"id": {"type": ["string", "integer"]}, "listener-id": {"type": "string"},
                                      "status-code": {"type": "integer", "description": "the engine's answer; "
                                                      "0: set aside by listenerd, its stored segment was damaged"},
                                      "response": {"type": "string"},
                                      "failed-at": {"type": "string", "format": "date-time"},
                                      "events": {"type": "array", "items": {"type": ["object", "string"]},
                                                 "description": "envelopes as sent; a string: bytes a damaged "
                                                                "store gave that no longer parse"}}},
        "Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string"}, "fields": {"type": "array", "items": {"type": "string"}}}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "listenerd", "version": version(),
                 "description": "Listeners, integrations, status, checkpoints, dead letters and taps."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearer": []}],
    }


@routes.get("/1.0/openapi.json")
async def openapi(request: web.Request) -> web.Response:
    return web.json_response(document())
