"""Pusher Channels protocol 7, client side, as a state machine without I/O.

(Past 400 lines on purpose: the per-channel and the connection-wide decisions share one state and
read best together.)

Why a machine: every protocol decision (when to subscribe, how to sign, when to ping, what a close
code means, whom an error concerns) lives here and is unit-tested without sockets; `sources/pusher.py`
only moves frames and sleeps. The machine is fed text frames, clock ticks, listeners joining and
leaving, and the close of the socket, and answers with actions: frames to send, events to emit, which
listeners are started, which end (`Resolve`), and how the whole connection ends (a bare
`listenerd.outcome`).

One machine serves one connection ("epoch") carrying many channels, as pusher-js carries every channel
of a `Pusher` object on one connection (pusher/pusher-js @f53faf9 `src/core/pusher.ts`
`subscribeAll`/`unsubscribe`, `src/core/channels/channels.ts`): each listener joins with its channel and
gets a ticket; a channel is subscribed once for all its listeners, unsubscribed when the last leaves
(a leave while the subscription is pending cancels it and unsubscribes on success, as
`channel.ts` `cancelSubscription` does). Per-channel state (pending, subscribed) makes a listener
`started` only on its own channel's `pusher_internal:subscription_succeeded`; a
`pusher:subscription_error` or a `pusher:error` naming a channel ends that channel's listeners only;
close codes, the handshake and liveness end the connection for every listener on it. A fresh machine
is made for every connection, so private and presence channels are signed with the new `socket_id`.

As pusher-js does (`channel.ts` `handleEvent` emits every non-internal event, subscribed or not),
events that arrive for a channel before its `subscription_succeeded` are delivered. `private-encrypted-`
channels are opened with a NaCl secretbox keyed by sha256(channel name + master key), as Pusher's server
libraries derive it (pusher/pusher-http-python `pusher/crypto.py` `generate_shared_secret`) and
pusher-js opens it (`src/core/channels/encrypted_channel.ts`); a payload that does not open is counted
(`decrypt`) and dropped, as pusher-js drops it. Presence `member_added`/`member_removed` reach the
listeners that asked for members as `pusher:member_added`/`pusher:member_removed`, the names pusher-js
gives them (`presence_channel.ts`); a client event's `user_id` travels with it (`$user_id`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson
from nacl.exceptions import CryptoError
from nacl.secret import SecretBox

from listenerd import version
from listenerd.net import sanitised
from listenerd.outcome import Fail, Outcome, Retry

PROTOCOL = 7
CLIENT_VERSION = version()
CLIENT = "listenerd"
ENCRYPTED_PREFIX = "private-encrypted-"

# Close code meanings, for the operator-facing status message (pusher.com protocol docs).
CLOSE_CODES = {
    4000: "the app accepts TLS connections only",
    4001: "the app does not exist - check the app key and cluster",
    4003: "the app is disabled",
    4004: "the app is over its connection quota (its plan's limit of concurrent connections)",
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
    """A channel event these listeners (`members`: their tickets) want: forward it to each."""

    data: Any
    channel: str
    event: str
    members: tuple[int, ...]
    user_id: str | None = None  # who sent a client event (presence channels)


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The server confirmed `channel`: these listeners are started (each reported once)."""

    channel: str
    members: frozenset[int]


@dataclass(frozen=True, slots=True)
class Count:
    """A non-fatal problem worth a metric, for these listeners (None: every listener on the connection)."""

    kind: str
    detail: str
    members: frozenset[int] | None = None


@dataclass(frozen=True, slots=True)
class Resolve:
    """End these listeners with `outcome` (their channel was refused); the connection and the others go on."""

    members: frozenset[int]
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Established:
    """The handshake completed; the effective activity timeout is now known."""

    socket_id: str
    activity_timeout: float


# A bare `Retry`/`Fail` ends the connection: every listener on it gets that outcome.
Action = Send | Emit | Subscribed | Count | Established | Resolve | Retry | Fail


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


def shared_secret(channel: str, master_key: bytes) -> bytes:
    """The secretbox key of an encrypted channel: sha256(channel name + master key), as pusher-http-python's
    `crypto.generate_shared_secret` derives it for its `shared_secret`."""
    return hashlib.sha256(channel.encode() + master_key).digest()


def decrypt(data: Any, box: SecretBox) -> Any:
    """Open `{"nonce", "ciphertext"}` (base64) with `box`; the plaintext JSON-decoded when it is JSON.
    Raises ValueError with the reason when the payload is not an encrypted one or does not open."""
    if not isinstance(data, dict) or not isinstance(data.get("ciphertext"), str) or not isinstance(
            data.get("nonce"), str):
        raise ValueError("expected an object with `ciphertext` and `nonce`")
    try:
        nonce = base64.b64decode(data["nonce"], validate=True)
        ciphertext = base64.b64decode(data["ciphertext"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("nonce or ciphertext is not base64") from None
    if len(nonce) != SecretBox.NONCE_SIZE:
        raise ValueError(f"nonce is {len(nonce)} bytes, not {SecretBox.NONCE_SIZE}")
    try:
        plain = box.decrypt(ciphertext, nonce)
    except CryptoError:
        raise ValueError("does not decrypt with the channel's shared secret "
                         "(check encryption-master-key)") from None
    return decode_data(plain.decode("utf-8", "replace"))


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
    said = sanitised(reason or "")
    if said and (meaning is None or said.lower() != meaning.lower()):
        text += f" (server said: {said})"
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


@dataclass(slots=True)
class _Member:
    channel: str
    wants: Callable[[str], bool]
    members: bool  # forward presence member_added/member_removed


@dataclass(slots=True)
class _Channel:
    """A channel subscribed on this connection: `pending` (subscribe sent), `subscribed`, or `cancelled`
    (its last listener left while pending: unsubscribed once the server confirms, as pusher-js does)."""

    state: str
    sent_at: float


@dataclass(slots=True)
class _Tickets:
    next: int = 0
    unreported: set[int] = field(default_factory=set)  # members not yet reported started


class PusherProtocol:
    """One connection's protocol state for every channel its listeners follow.

    Connection states: `idle` (no socket yet; listeners may join), `connecting` (socket open, waiting for
    `pusher:connection_established`), `open`, `ended` (an outcome was decided). Time is passed in (`now`,
    monotonic seconds), so tests drive the clock.
    """

    def __init__(self, *, key: str, secret: str, activity_timeout: float = 120.0, pong_timeout: float = 30.0,
                 subscribe_timeout: float | None = None, connect_timeout: float = 15.0,
                 user_id: str = "listenerd", master_key: bytes | None = None, now: float | None = None):
        self.key = key
        self._secret = secret
        self._master_key = master_key
        self.configured_activity = activity_timeout
        self.activity_timeout = activity_timeout
        self.pong_timeout = pong_timeout
        self.subscribe_timeout = subscribe_timeout or pong_timeout
        self.connect_timeout = connect_timeout
        self.user_id = user_id
        self.state = "idle"
        self.socket_id: str | None = None
        self.last_rx = 0.0
        self.opened_at = 0.0
        self.ping_sent_at: float | None = None
        self.last_error: str | None = None  # the latest pusher:error, used when the close has no reason
        self.members: dict[int, _Member] = {}
        self.by_channel: dict[str, set[int]] = {}
        self.channels: dict[str, _Channel] = {}  # subscribed (or pending) on the open connection
        self.rejected: set[str] = set()  # refused here; tried again only when a listener joins anew
        self._tickets = _Tickets()
        self._boxes: dict[str, SecretBox] = {}
        if now is not None:
            self.opened(now)

    # -- listeners joining and leaving (no frames until `sync`)

    def join(self, channel: str, wants: Callable[[str], bool], *, members: bool = False) -> int:
        """A listener of `channel` joins; its ticket names it in actions and to `leave`."""
        self._tickets.next += 1
        ticket = self._tickets.next
        self.members[ticket] = _Member(channel, wants, members)
        self.by_channel.setdefault(channel, set()).add(ticket)
        self._tickets.unreported.add(ticket)
        self.rejected.discard(channel)  # a new definition may try a channel refused before
        return ticket

    def leave(self, ticket: int) -> None:
        member = self.members.pop(ticket, None)
        self._tickets.unreported.discard(ticket)
        if member is not None:
            followers = self.by_channel.get(member.channel)
            if followers is not None:
                followers.discard(ticket)
                if not followers:
                    del self.by_channel[member.channel]

    def sync(self, now: float) -> list[Action]:
        """Frames that make the open connection's subscriptions match its listeners' channels."""
        if self.state != "open":
            return []
        actions: list[Action] = []
        for channel in list(self.by_channel):
            if channel in self.rejected:
                continue
            known = self.channels.get(channel)
            if known is None:
                if channel.startswith(ENCRYPTED_PREFIX) and self._master_key is None:
                    actions.append(self._refuse(channel, Fail(
                        f"Channel {channel} is encrypted: set encryption-master-key in the pusher integration")))
                    continue
                self.channels[channel] = _Channel("pending", now)
                actions.append(Send(self.subscribe_frame(channel)))
            elif known.state == "cancelled":
                known.state = "pending"  # pusher-js `reinstateSubscription`
        for channel, known in list(self.channels.items()):
            if channel in self.by_channel:
                continue
            if known.state == "subscribed":
                del self.channels[channel]
                actions.append(Send(_unsubscribe(channel)))
            else:
                known.state = "cancelled"
        return actions + self._started()

    # -- the socket

    def opened(self, now: float) -> None:
        """The socket is open: the handshake clock starts."""
        self.state = "connecting"
        self.opened_at = self.last_rx = now

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
        if self.state != "open" or not isinstance(channel, str):
            return []  # nothing is subscribed before the handshake
        if event == "pusher_internal:subscription_succeeded":
            return self._succeeded(channel)
        if event in ("pusher_internal:member_added", "pusher_internal:member_removed"):
            return self._member_event(channel, event, msg.get("data"))
        followers = self.by_channel.get(channel)
        if not followers:
            return []  # not ours
        wanted = tuple(t for t in followers if self.members[t].wants(event))
        if not wanted:
            return []
        data = decode_data(msg.get("data"))
        if channel.startswith(ENCRYPTED_PREFIX):
            try:
                data = decrypt(data, self._box(channel))
            except ValueError as exc:
                return [Count("decrypt", f"event {event[:80]} on {channel}: {exc}", frozenset(wanted))]
        user_id = msg.get("user_id")
        return [Emit(data, channel, event, wanted, user_id if isinstance(user_id, str) else None)]

    def tick(self, now: float) -> list[Action]:
        """The clock reached `deadline()`: ping, give up on a subscription, a pong or a handshake."""
        if self.state in ("ended", "idle"):
            return []
        if self.state == "connecting":
            if now - self.opened_at >= self.connect_timeout:
                return [self._end(Retry("timeout", f"Pusher did not complete the handshake within "
                                                   f"{self.connect_timeout:g}s"))]
            return []
        actions: list[Action] = []
        for channel, known in list(self.channels.items()):
            if known.state != "subscribed" and now - known.sent_at >= self.subscribe_timeout:
                del self.channels[channel]  # a late confirmation is unsubscribed (`_succeeded`)
                if channel in self.by_channel:
                    actions.append(self._refuse(channel, Retry(
                        "timeout", f"Pusher did not confirm the subscription to channel {channel} "
                                   f"within {self.subscribe_timeout:g}s")))
        if self.ping_sent_at is not None:
            if now - self.ping_sent_at >= self.pong_timeout:
                return [self._end(Retry("heartbeat", f"No pong from Pusher within {self.pong_timeout:g}s of a ping; "
                                        f"reconnecting", delay=0))]
        elif now - self.last_rx >= self.activity_timeout:
            self.ping_sent_at = now
            actions.append(Send(json.dumps({"event": "pusher:ping", "data": {}})))
        return actions

    def deadline(self) -> float:
        """When `tick` next has something to decide (monotonic seconds); never once ended."""
        if self.state in ("ended", "idle"):
            return float("inf")
        if self.state == "connecting":
            return self.opened_at + self.connect_timeout
        if self.ping_sent_at is not None:
            soonest = self.ping_sent_at + self.pong_timeout
        else:
            soonest = self.last_rx + self.activity_timeout
        for known in self.channels.values():
            if known.state != "subscribed":
                soonest = min(soonest, known.sent_at + self.subscribe_timeout)
        return soonest

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

    @property
    def established(self) -> bool:
        return self.state == "open"

    def channel_state(self, channel: str) -> str | None:
        """`pending`, `subscribed`, `cancelled`, or None when not subscribed on this connection."""
        known = self.channels.get(channel)
        return known.state if known is not None else None

    def subscribe_frame(self, channel: str) -> str:
        """`pusher:subscribe`, signed with this connection's socket_id for private/presence channels
        (`private-encrypted-` ones are signed as private ones)."""
        assert self.socket_id is not None
        data: dict[str, str] = {"channel": channel}
        if channel.startswith("presence-"):
            channel_data = json.dumps({"user_id": self.user_id, "user_info": {"name": "listenerd"}},
                                      separators=(",", ":"))
            data["auth"] = sign(self.key, self._secret, self.socket_id, channel, channel_data)
            data["channel_data"] = channel_data
        elif channel.startswith("private-"):
            data["auth"] = sign(self.key, self._secret, self.socket_id, channel)
        return json.dumps({"event": "pusher:subscribe", "data": data})

    # -- internals

    def _end(self, outcome: Outcome) -> Outcome:
        self.state = "ended"
        return outcome

    def _box(self, channel: str) -> SecretBox:
        box = self._boxes.get(channel)
        if box is None:
            assert self._master_key is not None  # `sync` refuses an encrypted channel without one
            box = self._boxes[channel] = SecretBox(shared_secret(channel, self._master_key))
        return box

    def _refuse(self, channel: str, outcome: Outcome) -> Resolve:
        """End `channel`'s listeners (they leave the machine now) and keep it unsubscribed until one joins anew."""
        self.rejected.add(channel)
        self.channels.pop(channel, None)
        tickets = frozenset(self.by_channel.get(channel, ()))
        for ticket in tickets:
            self.leave(ticket)
        return Resolve(tickets, outcome)

    def _started(self, only: str | None = None) -> list[Action]:
        """Report the listeners not reported yet whose channel the server confirmed."""
        ready: dict[str, set[int]] = {}
        for ticket in self._tickets.unreported:
            channel = self.members[ticket].channel
            if (only is None or channel == only) and self.channel_state(channel) == "subscribed":
                ready.setdefault(channel, set()).add(ticket)
        actions: list[Action] = []
        for channel, tickets in ready.items():
            self._tickets.unreported -= tickets
            actions.append(Subscribed(channel, frozenset(tickets)))
        return actions

    def _established(self, raw: Any, now: float) -> list[Action]:
        data = decode_data(raw)
        socket_id = data.get("socket_id") if isinstance(data, dict) else None
        if not isinstance(socket_id, str) or not socket_id:
            return [self._end(Retry("protocol", "Pusher's connection_established carried no socket_id"))]
        server_timeout = data.get("activity_timeout")
        if isinstance(server_timeout, int | float) and not isinstance(server_timeout, bool) and server_timeout > 0:
            self.activity_timeout = min(self.configured_activity, float(server_timeout))
        self.socket_id = socket_id
        self.state = "open"
        return [Established(socket_id, self.activity_timeout), *self.sync(now)]

    def _succeeded(self, channel: str) -> list[Action]:
        known = self.channels.get(channel)
        if known is None or known.state == "cancelled":
            self.channels.pop(channel, None)
            return [] if channel in self.by_channel else [Send(_unsubscribe(channel))]
        known.state = "subscribed"
        return self._started(channel)

    def _member_event(self, channel: str, event: str, raw: Any) -> list[Action]:
        wanted = tuple(t for t in self.by_channel.get(channel, ()) if self.members[t].members)
        if not wanted:
            return []
        return [Emit(decode_data(raw), channel, event.replace("pusher_internal:", "pusher:", 1), wanted)]

    def _error(self, raw: Any, channel: Any) -> list[Action]:
        data = decode_data(raw)
        code = data.get("code") if isinstance(data, dict) else None
        message = data.get("message") if isinstance(data, dict) else (data if isinstance(data, str) else None)
        message = sanitised(str(message or "no message"))
        self.last_error = message
        named = channel if channel in self.by_channel else None
        if named is None and channel is None:
            # an error about a subscription may name its channel only in the text
            pending = [c for c, known in self.channels.items() if known.state == "pending" and c in message]
            named = max(pending, key=len) if pending else None
        if named is not None:
            return [self._refuse(named, Fail(f"Pusher refused the subscription to channel {named}: {message}"
                                             + (f" (code {code})" if code is not None else "")))]
        # Before a close the server may explain itself here; the close decides. 4301/4302 are advisory.
        return [Count("pusher_error", f"pusher:error {code}: {message}")]

    def _subscription_error(self, raw: Any, channel: Any) -> list[Action]:
        if channel is None:
            pending = [c for c, known in self.channels.items() if known.state == "pending"]
            channel = pending[0] if len(pending) == 1 else None
        if not isinstance(channel, str) or channel not in self.by_channel:
            if isinstance(channel, str):
                self.channels.pop(channel, None)
            return [Count("pusher_error", "pusher:subscription_error for a channel no listener follows")]
        data = decode_data(raw)
        status = data.get("status") if isinstance(data, dict) else None
        error = (data.get("error") or data.get("message") or data.get("type")) if isinstance(data, dict) else data
        detail = sanitised(str(error or "no reason given"))
        if status is not None:
            detail += f" (status {status})"
        reason = f"Pusher refused the subscription to channel {channel}: {detail}"
        if isinstance(status, int) and (500 <= status <= 599 or status == 429):
            return [self._refuse(channel, Retry("refused", reason))]
        return [self._refuse(channel, Fail(reason))]


def _unsubscribe(channel: str) -> str:
    return json.dumps({"event": "pusher:unsubscribe", "data": {"channel": channel}})
