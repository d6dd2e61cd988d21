"""Pusher Channels protocol 7, client side, as a state machine without I/O.

Why a machine: every protocol decision (when to subscribe, how to sign, when to ping, what a close
code means) lives here and is unit-tested without sockets; `sources/pusher.py` only moves frames
and sleeps. The machine is fed text frames, clock ticks and the close of the socket, and answers
with actions: frames to send, events to emit, and how the connection ends (a `listenerd.outcome`).

One machine serves one connection attempt for one channel (a listener has exactly one channel).
A fresh machine is made for every connection, so the subscription is always signed with the new
`socket_id`: signatures never outlive the connection they were made for.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from listenerd import version
from listenerd.outcome import Fail, Outcome, Retry

PROTOCOL = 7
CLIENT_VERSION = version()
CLIENT = "listenerd"

# Close code meanings, for the operator-facing status message (pusher.com protocol docs).
CLOSE_CODES = {
    4000: "the app accepts TLS connections only",
    4001: "the app does not exist - check the app key and cluster",
    4003: "the app is disabled",
    4004: "the app is over its connection quota",
    4005: "path not found",
    4006: "invalid version string format",
    4007: "unsupported protocol version",
    4008: "no protocol version supplied",
    4009: "the connection is unauthorized",
    4100: "over capacity",
    4200: "generic reconnect immediately",
    4201: "pong reply not received",
    4202: "closed after inactivity",
}


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send this text frame."""

    text: str


@dataclass(frozen=True, slots=True)
class Emit:
    """A channel event the listener wants: forward it."""

    data: Any
    channel: str
    event: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The server confirmed the subscription: the listener is started."""

    channel: str


@dataclass(frozen=True, slots=True)
class Count:
    """A non-fatal problem worth a metric (malformed frame, pusher:error ...)."""

    kind: str
    detail: str


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake completed; the effective activity timeout is now known."""

    socket_id: str
    activity_timeout: float


Action = Send | Emit | Subscribed | Count | Established | Retry | Fail


# ---------------------------------------------------------------- helpers


def build_url(*, key: str, cluster: str = "mt1", host: str | None = None, port: int | None = None,
              tls: bool = True) -> str:
    """`{ws|wss}://{host or ws-<cluster>.pusher.com}:{port}/app/{key}?protocol=7&client=...&version=...`."""
    scheme = "wss" if tls else "ws"
    host = host or f"ws-{cluster}.pusher.com"
    port = port or (443 if tls else 80)
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6 literal
    return (f"{scheme}://{host}:{port}/app/{quote(key, safe='')}"
            f"?protocol={PROTOCOL}&client={CLIENT}&version={CLIENT_VERSION}")


def sign(key: str, secret: str, socket_id: str, channel: str, channel_data: str | None = None) -> str:
    """`key:hex(HMAC-SHA256(secret, socket_id:channel[:channel_data]))`, the Pusher auth string."""
    subject = f"{socket_id}:{channel}" if channel_data is None else f"{socket_id}:{channel}:{channel_data}"
    digest = hmac.new(secret.encode(), subject.encode(), hashlib.sha256).hexdigest()
    return f"{key}:{digest}"


def loads(text: str | bytes) -> Any:
    """orjson for speed (every frame is decoded twice); the standard library for what orjson refuses
    but JSON allows (integers over 64 bits). Raises ValueError when the text is not JSON."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def decode_data(raw: Any) -> Any:
    """`data` as a JSON string (decoded once more), an object, or absent; a non-JSON string stays raw."""
    if isinstance(raw, str):
        try:
            return loads(raw)
        except ValueError:
            return raw
    return raw


def describe_close(code: int | None, reason: str | None) -> str:
    """`close code 4001: the app does not exist ... (server said: ...)` for status messages."""
    if code is None:
        return "no close code"
    text = f"close code {code}"
    meaning = CLOSE_CODES.get(code)
    if meaning:
        text += f": {meaning}"
    said = (reason or "").strip()
    if said and (meaning is None or said.lower() != meaning.lower()):
        text += f" (server said: {said[:200]})"
    return text


def classify_close(code: int | None, reason: str | None, *, error: str | None = None) -> Outcome:
    """What a close code asks of the client (protocol 7 close-code ranges)."""
    said = describe_close(code, reason or error)
    if code is None or code == 1006:
        return Retry("network", "Connection to Pusher dropped without a close frame")
    if code == 1009:
        return Retry("protocol", "Pusher sent a frame over the size limit (sources.max-frame-bytes); reconnecting")
    if code == 4000:  # the contract: 4000-4099 mean failed; URLs are used as given, scheme included
        return Fail(f"Pusher refused the connection with {said}; set tls = true in the pusher integration")
    if 4001 <= code <= 4099:
        return Fail(f"Pusher refused the connection with {said}")
    if 4100 <= code <= 4199:
        return Retry("refused", f"Pusher closed the connection with {said}; backing off")
    if 4200 <= code <= 4299:
        return Retry("reconnect-advice", f"Pusher asked to reconnect now with {said}", delay=0)
    if code >= 4300:
        return Retry("closed", f"Pusher closed the connection with error {said}")
    return Retry("closed", f"Connection to Pusher closed with {said}")


# ---------------------------------------------------------------- the machine


class PusherProtocol:
    """One connection's protocol state for one channel.

    States: `connecting` (socket open, waiting for `pusher:connection_established`), `subscribing`
    (subscribe sent), `subscribed`, `ended` (an outcome was decided). Time is passed in (`now`,
    monotonic seconds), so tests drive the clock.
    """

    def __init__(self, *, key: str, secret: str, channel: str, wants: Callable[[str], bool],
                 activity_timeout: float = 120.0, pong_timeout: float = 30.0,
                 subscribe_timeout: float | None = None, connect_timeout: float = 15.0,
                 user_id: str = "listenerd", now: float = 0.0):
        self.key = key
        self._secret = secret
        self.channel = channel
        self.wants = wants
        self.configured_activity = activity_timeout
        self.activity_timeout = activity_timeout
        self.pong_timeout = pong_timeout
        self.subscribe_timeout = subscribe_timeout or pong_timeout
        self.connect_timeout = connect_timeout
        self.user_id = user_id
        self.state = "connecting"
        self.socket_id: str | None = None
        self.last_rx = now
        self.opened_at = now
        self.subscribe_sent_at: float | None = None
        self.ping_sent_at: float | None = None
        self.last_error: str | None = None  # the latest pusher:error, used when the close has no reason

    # -- inputs

    def receive(self, text: str | bytes, now: float) -> list[Action]:
        """One frame from the server. Any frame proves liveness."""
        self.last_rx = now
        self.ping_sent_at = None
        if isinstance(text, bytes):
            return [Count("malformed", "binary frame (Pusher frames are JSON text)")]
        try:
            msg = loads(text)
        except ValueError:
            return [Count("malformed", f"frame is not JSON: {text[:80]!r}")]
        if not isinstance(msg, dict) or not isinstance(msg.get("event"), str):
            return [Count("malformed", f"frame has no event name: {text[:80]!r}")]
        event: str = msg["event"]
        channel = msg.get("channel")
        if event == "pusher:connection_established":
            return self._established(msg.get("data"), now)
        if event == "pusher:ping":
            return [Send(json.dumps({"event": "pusher:pong", "data": {}}))]
        if event == "pusher:pong":
            return []
        if event == "pusher:error":
            return self._error(msg.get("data"), channel)
        if event in ("pusher:subscription_error", "pusher_internal:subscription_error"):
            return self._subscription_error(msg.get("data"), channel)
        if event == "pusher_internal:subscription_succeeded":
            if channel == self.channel and self.state == "subscribing":
                self.state = "subscribed"
                return [Subscribed(self.channel)]
            return []
        if channel != self.channel or self.state != "subscribed":
            return []  # not ours (or early): nothing to forward
        if not self.wants(event):
            return []
        return [Emit(decode_data(msg.get("data")), channel, event)]

    def tick(self, now: float) -> list[Action]:
        """The clock reached `deadline()`: ping, or give up on a pong, a subscription or a handshake."""
        if self.state == "ended":
            return []
        if self.state == "connecting" and now - self.opened_at >= self.connect_timeout:
            return [self._end(Retry("timeout", f"Pusher did not complete the handshake within "
                                               f"{self.connect_timeout:g}s"))]
        if (self.state == "subscribing" and self.subscribe_sent_at is not None
                and now - self.subscribe_sent_at >= self.subscribe_timeout):
            return [self._end(Retry("timeout", f"Pusher did not confirm the subscription to channel {self.channel} "
                                    f"within {self.subscribe_timeout:g}s"))]
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at >= self.pong_timeout:
                return [self._end(Retry("heartbeat", f"No pong from Pusher within {self.pong_timeout:g}s of a ping; "
                                        f"reconnecting", delay=0))]
            return []
        if self.state != "connecting" and now - self.last_rx >= self.activity_timeout:
            self.ping_sent_at = now
            return [Send(json.dumps({"event": "pusher:ping", "data": {}}))]
        return []

    def deadline(self) -> float:
        """When `tick` next has something to decide (monotonic seconds); never once ended."""
        if self.state == "ended":
            return float("inf")
        if self.state == "connecting":
            return self.opened_at + self.connect_timeout
        candidates = []
        if self.ping_sent_at is not None:
            candidates.append(self.ping_sent_at + self.pong_timeout)
        else:
            candidates.append(self.last_rx + self.activity_timeout)
        if self.state == "subscribing" and self.subscribe_sent_at is not None:
            candidates.append(self.subscribe_sent_at + self.subscribe_timeout)
        return min(candidates)

    def hold(self, now: float) -> None:
        """The client is not reading (back-pressure): unread frames may be waiting, so the silence is
        not the server's. Restart the activity clock instead of pinging or giving up."""
        self.last_rx = now
        self.ping_sent_at = None

    def closed(self, code: int | None, reason: str | None, *, sent: int | None = None) -> list[Action]:
        """The socket closed with `code` from the server (None or 1006 when it just dropped), or with
        `sent` from our side: 1009 when a frame was over our size limit, which is counted."""
        self.state = "ended"
        if sent == 1009:
            return [Count("oversized", "Pusher sent a frame over the size limit (sources.max-frame-bytes)"),
                    classify_close(1009, None)]
        return [classify_close(code, reason, error=self.last_error)]

    # -- what the machine knows

    @property
    def heartbeat_bound(self) -> float:
        """Longest silence before this machine gives up: activity timeout plus pong timeout."""
        return self.activity_timeout + self.pong_timeout

    # -- internals

    def _end(self, outcome: Outcome) -> Outcome:
        self.state = "ended"
        return outcome

    def _established(self, raw: Any, now: float) -> list[Action]:
        data = decode_data(raw)
        socket_id = data.get("socket_id") if isinstance(data, dict) else None
        if not isinstance(socket_id, str) or not socket_id:
            return [self._end(Retry("protocol", "Pusher's connection_established carried no socket_id"))]
        server_timeout = data.get("activity_timeout")
        if isinstance(server_timeout, int | float) and not isinstance(server_timeout, bool) and server_timeout > 0:
            self.activity_timeout = min(self.configured_activity, float(server_timeout))
        self.socket_id = socket_id
        self.state = "subscribing"
        self.subscribe_sent_at = now
        return [Established(socket_id, self.activity_timeout), Send(self.subscribe_frame())]

    def subscribe_frame(self) -> str:
        """`pusher:subscribe`, signed with this connection's socket_id for private/presence channels."""
        assert self.socket_id is not None
        data: dict[str, str] = {"channel": self.channel}
        if self.channel.startswith("presence-"):
            channel_data = json.dumps({"user_id": self.user_id, "user_info": {"name": "listenerd"}},
                                      separators=(",", ":"))
            data["auth"] = sign(self.key, self._secret, self.socket_id, self.channel, channel_data)
            data["channel_data"] = channel_data
        elif self.channel.startswith("private-"):
            data["auth"] = sign(self.key, self._secret, self.socket_id, self.channel)
        return json.dumps({"event": "pusher:subscribe", "data": data})

    def _error(self, raw: Any, channel: Any) -> list[Action]:
        data = decode_data(raw)
        code = data.get("code") if isinstance(data, dict) else None
        message = data.get("message") if isinstance(data, dict) else (data if isinstance(data, str) else None)
        message = str(message or "no message")[:200]
        self.last_error = message
        names_channel = channel == self.channel or (channel is None and self.state == "subscribing"
                                                    and self.channel in message)
        if names_channel:
            return [self._end(Fail(f"Pusher refused the subscription to channel {self.channel}: {message}"
                                   + (f" (code {code})" if code is not None else "")))]
        # Before a close the server may explain itself here; the close decides. 4301/4302 are advisory.
        return [Count("pusher_error", f"pusher:error {code}: {message}")]

    def _subscription_error(self, raw: Any, channel: Any) -> list[Action]:
        if channel not in (None, self.channel):
            return []
        data = decode_data(raw)
        status = data.get("status") if isinstance(data, dict) else None
        error = (data.get("error") or data.get("message") or data.get("type")) if isinstance(data, dict) else data
        detail = str(error or "no reason given")[:200]
        if status is not None:
            detail += f" (status {status})"
        reason = f"Pusher refused the subscription to channel {self.channel}: {detail}"
        if isinstance(status, int) and (500 <= status <= 599 or status == 429):
            return [self._end(Retry("refused", reason))]
        return [self._end(Fail(reason))]
