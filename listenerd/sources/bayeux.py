"""The CometD/Bayeux long-polling client as a state machine without I/O.

Over 400 lines as one module because it is one machine: its handlers share the session's counters and state.

Why no I/O: every hard question of a Bayeux client (when to re-handshake, when a 401 means a fresh
login, which replayId to resubscribe with, when to give up instead of looping handshakes) is a
decision over messages, and decisions are easiest to get right and to test exhaustively when they
are pure. The asyncio driver (`sources/salesforce.py`) only moves requests and sleeps:

    request = client.next_request()        # what to POST next (and how long to wait first)
    outputs = client.receive(messages)     # or transport_error() / http_error() / malformed()
    for output in outputs: ...             # Message, Subscribed, ReplayRejected, Refused (one channel),
                                           # Rehandshake, Relogin, Retry, Fail (the whole client)

One client carries many channels, each with its own replayId (as EMP-Connector's one BayeuxClient
carries every `TopicSubscription`, forcedotcom/EMP-Connector `EmpConnector.java`). `add()` and
`remove()` change them on the live client: while a connect is held, the subscribe or unsubscribe
goes on a second request, `control_request()` (Bayeux allows two; cometd-javascript sends
subscribes beside the held `/meta/connect`, cometd/cometd
`cometd-javascript/common/src/main/webapp/js/cometd/cometd.js`), so no other channel notices. A
subscribe refused for one channel (missing topic, replayId without fallback) is `Refused(channel,
outcome)`, for that channel alone; what concerns the session (unknown client, 401, advice) is a
whole-client output. The poll lane (handshake, first subscribes, connects) is strictly sequential.
A failed connect is retried on the same clientId after a back-off (cometd.js `_connectFailure`,
`increaseBackoffPeriod`) before the client gives up and a new handshake is made.

Rules followed: advice is reset at each handshake and replaced by each new one; `handshake` advice or
`Unknown client` means a new handshake and a resubscribe of every channel with its latest replayId; a
401 (Bayeux error, `ext.sfdc.failureReason`, or HTTP status) means a fresh login; `none` advice ends the
session; repeated handshakes or logins without a successful connect, and repeated transport failures,
end the session with `Retry` so the supervisor backs off (never a handshake loop, which Salesforce
punishes with `403::Organization concurrent user limit exceeded`).

Sources: the Bayeux 1.0 spec (https://docs.cometd.org/current/reference/#_bayeux); Salesforce's client
rules and error codes (https://developer.salesforce.com/docs/platform/api-streaming/guide/intro-client-specs.html,
https://developer.salesforce.com/docs/platform/api-streaming/guide/streaming-error-codes.html);
replay as in forcedotcom/EMP-Connector `ReplayExtension.java` and robertmrk/aiosfstream `aiosfstream/replay.py`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from listenerd.net import sanitised
from listenerd.outcome import Fail, Outcome, Retry

Kind = Literal["handshake", "subscribe", "unsubscribe", "connect", "disconnect"]
State = Literal["unconnected", "handshaking", "subscribing", "connected", "disconnecting", "closed"]

_REPLAY_INVALID = re.compile(r"replayId", re.IGNORECASE)
# Salesforce refuses request bodies over 32,768 bytes (413): subscribe batches are cut below it.
MAX_BODY = 30_000
# What Salesforce says when an org's concurrent streaming clients are all taken (handshake).
CLIENT_LIMIT = "concurrent user limit"
# A server's `error` and `failureReason`, as quoted in a status message: its first words, printable (a hostile
# or broken server could otherwise relay any body, with terminal escapes, to the tenant who reads the status).
ERROR_LIMIT = 160  # as every other upstream reason (README "Security model")


# ---------------------------------------------------------------- what the machine asks for


@dataclass(frozen=True, slots=True)
class Request:
    """POST `messages` after waiting `delay` seconds; read the answer for at most `timeout` seconds."""

    kind: Kind
    messages: list[dict[str, Any]]
    timeout: float
    delay: float = 0.0
    session: int = 0  # the handshake it belongs to: a control answer from an older one is ignored


@dataclass(slots=True)  # not frozen: built once per event, and frozen dataclasses construct 3x slower
class Message:
    """A data message on a subscribed channel."""

    channel: str
    data: Any
    replay_id: int | None


@dataclass(frozen=True, slots=True)
class Subscribed:
    channel: str
    replay: int  # the replay value sent with the subscribe that succeeded
    resubscribe: bool  # True after a re-handshake


@dataclass(frozen=True, slots=True)
class ReplayRejected:
    """The server no longer holds `replay_id`; the channel is resubscribed from `fallback`."""

    channel: str
    replay_id: int
    fallback: int
    error: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The server refused `channel` alone: its listener ends with `outcome`; the other channels go on."""

    channel: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class Rehandshake:
    reason: str
    abandoned: str | None = None  # a clientId the server still holds: send it /meta/disconnect first


@dataclass(frozen=True, slots=True)
class Relogin:
    """The session token is no longer accepted: log in again, then call `relogged_in()`."""

    reason: str


Output = Message | Subscribed | ReplayRejected | Refused | Rehandshake | Relogin | Retry | Fail


@dataclass
class Advice:
    reconnect: str = "retry"
    interval: float = 0.0  # seconds
    timeout: float = 110.0  # seconds the server may hold a connect

    def update(self, advice: Any) -> None:
        if not isinstance(advice, dict):
            return
        if advice.get("reconnect") in ("retry", "handshake", "none"):
            self.reconnect = advice["reconnect"]
        if isinstance(advice.get("interval"), int | float) and advice["interval"] >= 0:
            self.interval = advice["interval"] / 1000
        if isinstance(advice.get("timeout"), int | float) and advice["timeout"] >= 0:
            self.timeout = advice["timeout"] / 1000


@dataclass
class BayeuxClient:
    """One Bayeux client over long-polling; `subscriptions` maps channel -> replay id to start from.

    `replay_fallback` is the replay value used when the server rejects a stored replayId as outside
    its retention window (-2: every retained event, at-least-once; -1: new events only; None: fail).
    """

    subscriptions: dict[str, int]
    replay_fallback: int | None = -2
    default_timeout: float = 110.0
    margin: float = 1.2
    slack: float = 1.0
    request_timeout: float = 15.0
    max_handshakes: int = 3
    max_relogins: int = 1
    max_transport_retries: int = 1
    # Seconds of back-off spent retrying connects that failed fast (refused, reset, 5xx) on the same
    # clientId before the client is given up; timed-out connects (silence) count against
    # `max_transport_retries` instead. cometd.js retries a failed connect on the same clientId until the
    # server would have dropped the client (`_handleFailure`: timeout + interval + maxInterval);
    # Salesforce drops one about 40 s after its last connect.
    connect_retry_window: float = 0.0
    replay: bool = True
    service: str = "Bayeux"  # names the server in every retry reason: a status message reads it alone

    state: State = "unconnected"
    client_id: str | None = None
    advice: Advice = field(default_factory=Advice)
    subscribed: set[str] = field(default_factory=set)
    replay_supported: bool = False
    _pending: dict[str, int] = field(default_factory=dict)  # channel -> replay sent
    _awaiting: Kind | None = None
    _next_id: int = 0
    _handshakes: int = 0  # handshakes since the last successful connect
    _relogins: int = 0  # logins since the last successful connect
    _transport_failures: int = 0
    _quick_failures: int = 0  # fast connect failures in a row, retried within `connect_retry_window`
    _retry_waited: float = 0.0  # back-off spent on them
    _ever_subscribed: set[str] = field(default_factory=set)  # a later subscribe of these is a resubscribe
    _session: int = 0  # handshakes made: tags requests, so a late control answer is recognised
    _unsubscribe: list[str] = field(default_factory=list)  # removed while subscribed, not yet sent
    _control: bool = False  # a control request is in flight
    _control_held: bool = False  # the control lane waits for the next successful connect or handshake
    _fallbacks: dict[str, int | None] = field(default_factory=dict)  # per channel, over `replay_fallback`
    limited: bool = False  # the last handshake was refused for the org's concurrent client limit
    _by_key: dict[str, str] = field(default_factory=dict)  # replay key (no filter) -> channel subscribed

    def __post_init__(self) -> None:
        self.advice.timeout = self.default_timeout
        self.subscriptions = dict(self.subscriptions)
        self._by_key = {replay_key(channel): channel for channel in self.subscriptions}

    # -- timing

    @property
    def poll_timeout(self) -> float:
        """HTTP read timeout for a connect: above the server's hold time, never below it."""
        return self.advice.timeout * self.margin + self.slack

    @property
    def heartbeat_bound(self) -> float:
        """Longest silence before this client gives up by itself: every connect it allows in a row (the
        first and `max_transport_retries` more) times out, each after its wait (plus the back-off it may
        spend on connects that fail fast)."""
        return self.connect_retry_window + sum(self._connect_wait(failures) + self.poll_timeout
                                               for failures in range(self.max_transport_retries + 1))

    def _connect_wait(self, failures: int) -> float:
        """Seconds before a connect that follows `failures` transport failures in a row."""
        if not failures:
            return self.advice.interval
        return max(self.advice.interval, min(5.0, 0.1 * 2 ** (failures - 1)))

    # -- the driver's side

    def next_request(self) -> Request:
        if self._awaiting is not None:
            raise RuntimeError(f"a {self._awaiting} request is still in flight")
        if self.state == "closed":
            raise RuntimeError("the client is closed")
        if self.state == "unconnected":
            self.state = "handshaking"
            self.client_id = None
            self.advice = Advice(timeout=self.default_timeout)
            self._handshakes += 1
            self._session += 1
            message: dict[str, Any] = {"channel": "/meta/handshake", "version": "1.0", "minimumVersion": "1.0",
                                       "supportedConnectionTypes": ["long-polling"], "id": self._id()}
            if self.replay:
                message["ext"] = {"replay": True}
            return self._request("handshake", [message], self.request_timeout)
        if self.state == "subscribing":
            messages = self._subscribes([c for c in self.subscriptions if c not in self.subscribed], 0)
            return self._request("subscribe", messages, self.request_timeout)
        if self.state == "connected":
            wait = self._connect_wait(self._transport_failures + self._quick_failures)
            if self._quick_failures:
                self._retry_waited += wait
            return self._request("connect", [{"channel": "/meta/connect", "clientId": self.client_id,
                                              "connectionType": "long-polling", "id": self._id()}],
                                 self.poll_timeout, wait)
        raise RuntimeError(f"no request to make in state {self.state}")

    def stop_request(self) -> Request | None:
        """Unsubscribe every channel and disconnect, batched; None when there is no session to end. Also
        after the client ended itself (`Retry`): an abandoned client is told, so its slot is freed at once."""
        if self.client_id is None or self.state in ("unconnected", "handshaking"):
            self.state = "closed"
            return None
        disconnect = {"channel": "/meta/disconnect", "clientId": self.client_id, "id": self._id()}
        messages: list[dict[str, Any]] = []
        size = len(orjson.dumps(disconnect))
        for channel in sorted(self.subscribed):  # what fits in one body; the disconnect drops the rest
            message = {"channel": "/meta/unsubscribe", "clientId": self.client_id, "subscription": channel,
                       "id": self._id()}
            size += len(orjson.dumps(message)) + 1
            if size > MAX_BODY:
                break
            messages.append(message)
        messages.append(disconnect)
        self.state = "closed"
        self._awaiting = None
        self.client_id = None
        return Request("disconnect", messages, self.request_timeout)

    # -- channels joining and leaving the live client

    def add(self, channel: str, replay: int, fallback: int | None = -2) -> None:
        """Subscribe `channel` from `replay`: with the next subscribes, or on the control lane when connected.
        `fallback` is this channel's `replay_fallback`."""
        self.subscriptions[channel] = replay
        self._by_key[replay_key(channel)] = channel
        self._fallbacks[channel] = fallback
        self.subscribed.discard(channel)
        self._ever_subscribed.discard(channel)

    def remove(self, channel: str) -> None:
        """Stop following `channel`; the server is told on the control lane when it had the subscription."""
        self.subscriptions.pop(channel, None)
        if self._by_key.get(replay_key(channel)) == channel:
            del self._by_key[replay_key(channel)]
        self._fallbacks.pop(channel, None)
        self._pending.pop(channel, None)
        if channel in self.subscribed:
            self.subscribed.discard(channel)
            if channel not in self._unsubscribe:
                self._unsubscribe.append(channel)
        if self.state == "subscribing" and all(c in self.subscribed for c in self.subscriptions):
            self.state = "connected"

    def control_request(self) -> Request | None:
        """A subscribe/unsubscribe batch to send beside the held connect, or None (nothing to say, or
        not now: a control request is in flight, the client is not connected, or the lane is held)."""
        if self.state != "connected" or self._control or self._control_held or self.client_id is None:
            return None
        unsubscribes = [{"channel": "/meta/unsubscribe", "clientId": self.client_id, "subscription": channel,
                         "id": self._id()} for channel in self._unsubscribe[:100]]
        del self._unsubscribe[:100]
        wanted = [c for c in self.subscriptions if c not in self.subscribed and c not in self._pending]
        size = sum(len(orjson.dumps(m)) + 1 for m in unsubscribes)
        messages = unsubscribes + self._subscribes(wanted, size)
        if not messages:
            return None
        self._control = True
        kind: Kind = "subscribe" if len(messages) > len(unsubscribes) else "unsubscribe"
        return Request(kind, messages, self.request_timeout, session=self._session)

    def control_answer(self, request: Request, messages: Any) -> list[Output]:
        """The answer to a control request. What concerns the whole session (unknown client, 401) is left
        to the poll lane, whose connect hears it too: here the lane just waits for a new connect."""
        self._control = False
        if request.session != self._session:
            return []  # an older session's answer: the new handshake resubscribes everything
        if isinstance(messages, dict):
            messages = [messages]
        if not isinstance(messages, list):
            return self.control_failed(request)
        outputs: list[Output] = []
        for message in messages:
            if not isinstance(message, dict):
                continue
            channel = message.get("channel")
            if "data" in message and (owner := self._owner(channel)) is not None:
                outputs.append(self._on_data(owner, message["data"]))
            elif channel == "/meta/subscribe":
                outputs += self._on_subscribe(message, control=True)
        for message in request.messages:  # a subscribe without a reply is asked again later
            if message["channel"] == "/meta/subscribe" and message["subscription"] in self._pending:
                self._pending.pop(message["subscription"])
        return outputs

    def control_failed(self, request: Request) -> list[Output]:
        """The control request got no usable answer: its subscribes wait for the next successful connect."""
        self._control = False
        if request.session == self._session:
            for message in request.messages:
                if message["channel"] == "/meta/subscribe":
                    self._pending.pop(message["subscription"], None)
            self._control_held = True
        return []

    def relogged_in(self) -> None:
        """After a fresh login: forget the clientId; the next request is a handshake."""
        self._awaiting = None
        self._forget_session()

    def receive(self, messages: Any) -> list[Output]:
        """Process one HTTP answer (a JSON array of Bayeux messages)."""
        awaited, self._awaiting = self._awaiting, None
        if isinstance(messages, dict):
            messages = [messages]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            self._awaiting = awaited
            return self.malformed("answer is not a list of Bayeux messages")
        outputs: list[Output] = []
        answered = False
        subscriptions = self.subscriptions
        for message in messages:
            channel = message.get("channel")
            if channel in subscriptions and "data" in message:  # the hot path: events, in bulk
                outputs.append(self._on_data(channel, message["data"]))
                continue
            if "data" in message and (owner := self._owner(channel)) is not None:  # a filtered channel's event
                outputs.append(self._on_data(owner, message["data"]))
                continue
            if channel == f"/meta/{awaited}":
                answered = True
            if channel == "/meta/handshake":
                outputs += self._on_handshake(message)
            elif channel == "/meta/subscribe":
                outputs += self._on_subscribe(message)
            elif channel == "/meta/connect":
                outputs += self._on_connect(message)
            else:
                continue  # unsubscribe/disconnect replies, other channels
            if self._ends(outputs):
                return outputs
        if not answered and awaited not in (None, "disconnect"):
            outputs += self._transport_failure(f"no /meta/{awaited} reply in the server's answer", awaited,
                                               "protocol")
        return outputs

    def transport_error(self, reason: str, kind: str = "network") -> list[Output]:
        """The request failed on the network (refused, reset: "network"; no answer in time: "timeout")."""
        awaited, self._awaiting = self._awaiting, None
        return self._transport_failure(reason, awaited, kind)

    def http_error(self, status: int, reason: str = "") -> list[Output]:
        awaited, self._awaiting = self._awaiting, None
        text = f"HTTP {status}" + (f": {reason}" if reason else "")
        if status == 401:
            return self._relogin(text)
        return self._transport_failure(text, awaited, "refused")

    def malformed(self, reason: str) -> list[Output]:
        """An answer that is not JSON: its events are unknown, so start a new session and replay them."""
        self._awaiting = None
        abandoned = self.client_id
        outputs = self._rehandshake(f"malformed answer from the server ({reason})")
        if abandoned and isinstance(outputs[0], Rehandshake):
            outputs[0] = Rehandshake(outputs[0].reason, abandoned)
        return outputs

    # -- message handlers

    def _on_handshake(self, message: dict[str, Any]) -> list[Output]:
        self.advice.update(message.get("advice"))
        if message.get("successful") is True and isinstance(message.get("clientId"), str):
            types = message.get("supportedConnectionTypes")
            if isinstance(types, list) and "long-polling" not in types:
                self.state = "closed"
                return [Fail(f"the server does not offer long-polling (only {types})")]
            self.client_id = message["clientId"]
            self.limited = False
            ext = message.get("ext")
            self.replay_supported = isinstance(ext, dict) and ext.get("replay") is True
            self.subscribed.clear()
            self.state = "subscribing" if self.subscriptions else "connected"
            return []
        error = _error(message)
        reason = _failure_reason(message)
        words = sanitised(f"{error}" + (f" ({reason})" if reason else ""), ERROR_LIMIT)
        if error.startswith("401") or reason.startswith("401"):
            return self._relogin(f"handshake denied: {words}")
        if CLIENT_LIMIT in words.lower():
            self.limited = True
            return [self._retry("refused", f"the org's limit of concurrent streaming clients is reached, "
                                           f"handshake refused: {words}")]
        return [self._retry("refused", f"Handshake refused: {words}")]

    def _on_subscribe(self, message: dict[str, Any], control: bool = False) -> list[Output]:
        channel = message.get("subscription")
        if isinstance(channel, list):
            channel = channel[0] if channel else None
        if not isinstance(channel, str) or channel not in self.subscriptions:
            return []
        sent = self._pending.pop(channel, self.subscriptions[channel])
        if message.get("successful") is True:
            self.subscribed.add(channel)
            resubscribe = channel in self._ever_subscribed
            self._ever_subscribed.add(channel)
            self._subscribing_done()
            return [Subscribed(channel, sent, resubscribe)]
        error = _error(message)
        if "unknown client" in error.lower() or error.startswith("401") or error.startswith(("503", "5")):
            if control:  # the session's trouble: the poll lane's connect hears it and acts once
                self._control_held = True
                return []
            if "unknown client" in error.lower():
                return self._rehandshake(f"subscribe answered {error}")
            if error.startswith("401"):
                return self._relogin(f"subscribe answered {error}")
            return [self._retry("refused", f"Subscription to {channel} failed: {error}")]
        fallback = self._fallbacks.get(channel, self.replay_fallback)
        if _REPLAY_INVALID.search(error) and "invalid" in error.lower() and not (
                fallback is None or sent == fallback or sent in (-1, -2)):
            self.subscriptions[channel] = fallback
            return [ReplayRejected(channel, sent, fallback, error)]
        del self.subscriptions[channel]  # this channel alone: the others keep their subscriptions
        self._subscribing_done()
        return [Refused(channel, Fail(f"Subscription to {channel} refused: {error}"))]

    def _subscribing_done(self) -> None:
        if self.state == "subscribing" and all(c in self.subscribed for c in self.subscriptions):
            self.state = "connected"

    def _on_connect(self, message: dict[str, Any]) -> list[Output]:
        self.advice.update(message.get("advice"))
        if message.get("successful") is True:
            self._handshakes = 0
            self._relogins = 0
            self._transport_failures = 0
            self._quick_failures = 0
            self._retry_waited = 0.0
            self._control_held = False
            if self.advice.reconnect == "handshake":
                return self._rehandshake("the server advised a new handshake")
            if self.advice.reconnect == "none":
                return [self._retry("reconnect-advice", "the server advised no reconnect")]
            return []
        error = _error(message)
        if "unknown client" in error.lower():
            return self._rehandshake(f"connect answered {error}")
        if error.startswith("401"):
            return self._relogin(f"connect answered {error}")
        if self.advice.reconnect == "handshake":
            return self._rehandshake(f"connect answered {error}; the server advised a new handshake")
        if self.advice.reconnect == "none":
            return [self._retry("reconnect-advice", f"connect answered {error}; the server advised no reconnect")]
        return self._transport_failure(f"connect answered {error}", "connect", "refused")

    def _owner(self, channel: Any) -> str | None:
        """The subscribed channel an event on `channel` belongs to: a filtered subscription's events may
        carry the channel with or without its query (EMP-Connector strips it when it files the replayId,
        `ReplayExtension.rcv`)."""
        if not isinstance(channel, str) or channel.startswith("/meta/"):
            return None
        return self._by_key.get(replay_key(channel))

    def _on_data(self, channel: str, data: Any) -> Message:
        event = data.get("event") if type(data) is dict else None
        replay_id = event.get("replayId") if type(event) is dict else None
        if type(replay_id) is not int:  # exact type: a bool is not a replayId
            return Message(channel, data, None)
        self.subscriptions[channel] = replay_id
        return Message(channel, data, replay_id)

    # -- transitions

    def _rehandshake(self, reason: str) -> list[Output]:
        if self._handshakes >= self.max_handshakes:
            return [self._retry("protocol", f"{reason}; {self._handshakes} handshakes without a successful connect")]
        self._forget_session()
        return [Rehandshake(reason)]

    def _relogin(self, reason: str) -> list[Output]:
        if self._relogins >= self.max_relogins:
            return [self._retry("refused", f"{reason}; the session was refused again right after a fresh login")]
        self._relogins += 1
        self.state = "unconnected"
        self.client_id = None
        return [Relogin(reason)]

    def _transport_failure(self, reason: str, awaited: Kind | None, kind: str) -> list[Output]:
        if awaited != "connect" or self.state != "connected":
            return [self._retry(kind, reason)]
        if kind != "timeout" and self._retry_waited < self.connect_retry_window:
            self._quick_failures += 1  # the server still holds this clientId: try it again after a back-off
            return []
        self._transport_failures += 1
        if self._transport_failures > self.max_transport_retries:
            return [self._retry(kind, reason)]
        return []

    def _retry(self, kind: str, reason: str) -> Retry:
        """End the session; the supervisor starts a new one after its back-off."""
        self.state = "closed"
        return Retry(kind, f"{self.service}: {reason}")

    def _forget_session(self) -> None:
        self.state = "unconnected"
        self.client_id = None
        self.subscribed.clear()
        self._pending.clear()
        self._unsubscribe.clear()  # the new session subscribes only what is followed now
        self._control = self._control_held = False
        self._transport_failures = 0
        self._quick_failures = 0
        self._retry_waited = 0.0

    def _subscribes(self, channels: list[str], size: int) -> list[dict[str, Any]]:
        """Subscribe messages for `channels`, as many as fit in one request body after `size` bytes. Each
        carries its own channel's replayId: the server reads that entry only (EMP-Connector sends its whole
        map with every subscribe, `ReplayExtension.java`, which with hundreds of channels passes 32 KB)."""
        messages = []
        for channel in channels:
            replay = self.subscriptions[channel]
            message = {"channel": "/meta/subscribe", "clientId": self.client_id, "subscription": channel,
                       "id": self._id()}
            if self.replay:  # keyed without a filter's query, as the server files replayIds
                message["ext"] = {"replay": {replay_key(channel): replay}}
            size += len(orjson.dumps(message)) + 1
            if size > MAX_BODY and messages:
                break
            self._pending[channel] = replay
            messages.append(message)
        return messages

    def _ends(self, outputs: list[Output]) -> bool:
        return bool(outputs) and isinstance(outputs[-1], Relogin | Retry | Fail | Rehandshake)

    def _request(self, kind: Kind, messages: list[dict[str, Any]], timeout: float, delay: float = 0.0) -> Request:
        self._awaiting = kind
        return Request(kind, messages, timeout, delay, self._session)

    def _id(self) -> str:
        self._next_id += 1
        return str(self._next_id)


def replay_key(channel: str) -> str:
    """The replay map's key for `channel`: a filtered subscription `/topic/X?Field=v` is filed under
    `/topic/X`, as forcedotcom/EMP-Connector does (`EmpConnector.java` `SubscriptionImpl.getReplayFrom`
    and `ReplayExtension.java`: `topicWithoutQueryString`, `fullTopic.split("\\?")[0]`)."""
    return channel.split("?", 1)[0]


def _error(message: dict[str, Any]) -> str:
    error = message.get("error")
    return sanitised(str(error), ERROR_LIMIT) if error else "no error given"


def _failure_reason(message: dict[str, Any]) -> str:
    ext = message.get("ext")
    sfdc = ext.get("sfdc") if isinstance(ext, dict) else None
    reason = sfdc.get("failureReason") if isinstance(sfdc, dict) else None
    return sanitised(str(reason), ERROR_LIMIT) if reason else ""
