"""How a connection ends: retry (with a machine-readable kind and an optional delay) or fail.

One vocabulary for every protocol core (which returns outcomes as values), every driver and the
supervisor (which carry them as `Ended`), and the engine forwarder. The reason is prose for the
operator; the kind is a label for code and metrics, so nothing ever parses a reason.

Kinds of `Retry`:

- "network": could not connect, or the connection dropped;
- "timeout": no answer within a bound (connect, handshake, subscription, request);
- "heartbeat": a live connection fell silent past its protocol's bound;
- "reconnect-advice": the server asked for a new connection;
- "closed": the server (or the source) ended the connection normally, or with a transient close code;
- "refused": the server refused for now (an HTTP status on a handshake, a login error, a 5xx);
- "protocol": the server broke the protocol (an oversized or malformed answer, a missing field);
- "crash": a bug in listenerd (an unexpected exception), isolated to its listener;
- "HTTP <status>": the engine answered with this status (the forwarder's metric label).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Retry:
    """Transient: try again after `delay` seconds, or after the caller's back-off when None (0: at once)."""

    kind: str
    reason: str
    delay: float | None = None


@dataclass(frozen=True, slots=True)
class Fail:
    """Permanent until the definition changes (bad credentials, unknown topic, a fatal close code)."""

    reason: str


Outcome = Retry | Fail


def http_kind(status: int) -> str:
    """The kind of a retry caused by an HTTP answer: `HTTP 503`, the engine retries' metric label."""
    return f"HTTP {status}"


class Ended(Exception):  # noqa: N818 - it carries an outcome, it is not an error
    """Raised by a source (or any code on its behalf) to end its run with `outcome`."""

    def __init__(self, outcome: Outcome):
        super().__init__(outcome.reason)
        self.outcome = outcome
