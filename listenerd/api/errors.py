"""API errors: every one is `{"error": "..."}` with the right status code, never a traceback."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from listenerd.control import Conflict, ControlError, Invalid, NotFound, NotLoaded, TooMany, Unavailable

STATUS: dict[type[ControlError], int] = {Invalid: 400, NotFound: 404, Conflict: 409, NotLoaded: 503, Unavailable: 503,
                                      TooMany: 429}


class ApiError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra

    def response(self) -> web.Response:
        return error_response(self.status, self.message, **self.extra)


def error_response(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def refused(exc: ControlError) -> web.Response:
    """The answer to a request the control refused: its status code, message and fields (and when to retry)."""
    extra = {"fields": exc.fields} if exc.fields is not None else {}
    response = error_response(STATUS[type(exc)], exc.message, **extra)
    if exc.retry_after is not None:
        response.headers["Retry-After"] = str(exc.retry_after)
    return response
