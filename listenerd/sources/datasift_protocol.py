"""DataSift `/multi` protocol, client side, as a state machine without I/O.

(Over 400 lines: the frame classifier, the socket's machine and its reconnect policy are one protocol,
read together.)

Why a machine: which hashes a socket should carry, which the server has refused, whom a failure
concerns, when a listener counts as started and when silence means a dead socket are decisions over
messages and time; made here, they are unit-tested without sockets (tests/unit/test_datasift_protocol.py),
and `sources/datasift.py` only moves frames, sleeps until `deadline()` and performs the actions.

One machine serves one socket ("epoch"): it is made before the socket opens (listeners join while it
connects) and dropped when the socket ends; the listeners that come back get a fresh one. Time is
passed in (monotonic seconds).

Sources (the message shapes and the dispatch order): https://dev.datasift.com/docs/streaming-api/multiple-streams;
datasift/datasift-java `src/main/java/com/datasift/client/stream/MultiStreamInteraction.java` and
`DataSiftMessage.java` (status, message, tick, hash); datasift/datasift-node `lib/stream.js` (the
`reconnect` message, 65 s of silence means reconnect now); datasift/datasift-python `tests/mocks.py`
(interaction fields). The api key travels in the URL query: every text the server sends is masked
before it reaches a reason, a log line or a status.

When a listener is started: once DataSift confirms its hash ("Successfully subscribed to hash H", the
success text a multi-stream client waits for: LocalResponse's Node DataSift driver resolves a
subscription on `/successfully subscribed to hash (\\S+)/i` and rejects it on the warning
`/The hash (\\S+) doesn't exist/i`), or when the first interaction for it arrives. A hash neither
confirmed nor refused `CONFIRM_WAIT` seconds after its subscribe keeps its listeners `starting`, with a
status that says so; they turn `started` whenever the confirmation or an interaction comes.

How fast a socket comes back (`ReconnectPolicy`): as DataSift's own client implements the published
policy, datasift/datasift-python @3a81520 `datasift/streamconsumer_http.py` (`run`, "see
http://dev.datasift.com/docs/streaming-api for timing details"): network errors back off linearly,
+1 s a try up to 16 s; HTTP errors exponentially, 10 s doubling to 320 s; 65 s of silence reconnects
at once; a good answer resets the delay. (The 250 ms steps and 5 s start sometimes quoted match
Twitter's streaming guidelines; DataSift's clients wait longer, and listenerd is not faster than
they are.) Where the client gives up past its caps, listenerd stays at the cap and the status names
the next attempt; immediate retries are bounded by the supervisor's policy.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson

from listenerd.net import mask, sanitised
from listenerd.outcome import Fail, Outcome, Retry

CONFIRM_WAIT = 30.0  # seconds a subscribe may go unconfirmed before the status says so (read at each new socket)
NONEXISTENT_WORDS = ("doesn't exist", "does not exist", "not found", "no such")  # a warning that fails its hash
CREDENTIAL_WORDS = ("api key", "api_key", "apikey", "username", "credential", "authenticat", "unauthori",
                    "not authorized", "forbidden", "access denied")


# ---------------------------------------------------------------- one frame -> one decision


@dataclass(frozen=True, slots=True)
class Tick:
    """`{"tick": ..., "status": "connected"}` or any keep-alive: proves the socket lives."""


@dataclass(frozen=True, slots=True)
class Notice:
    """`status` `success` or `warning` (or an unknown status): informational, never fatal."""

    level: str
    message: str
    hash: str | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """`status` `failure`/`error`: scoped to the `hashes` it names (a `hash` field, a `hashes` list, or
    hashes of this socket in its text), else to the whole socket."""

    message: str
    hashes: frozenset[str] = frozenset()
    credentials: bool = False


@dataclass(frozen=True, slots=True)
class Reconnect:
    """`{"reconnect": true}`: the server asks for a new connection now."""


@dataclass(frozen=True, slots=True)
class Item:
    """An interaction, or a delete when `deleted`; `key` is the event's stable source identity."""

    hash: str
    data: dict[str, Any]
    deleted: bool
    key: str | None


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that is not a DataSift message (bad JSON, wrong shape, oversized): counted, skipped."""

    reason: str
    kind: str = "malformed"
    hash: str | None = None


Decision = Tick | Notice | Failure | Reconnect | Item | Malformed


def decode_frame(raw: bytes | str, max_bytes: int, hashes: Collection[str] = ()) -> Decision:
    """One WebSocket frame -> one decision. Oversized frames are refused before parsing."""
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        return Malformed(f"frame of {size} bytes exceeds the {max_bytes}-byte limit", kind="oversized")
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return Malformed(f"not JSON: {exc}")
    return classify(message, hashes)


def classify(message: Any, hashes: Collection[str] = ()) -> Decision:
    """Dispatch in the documented order: status (tick, success, warning, failure), reconnect, delete, interaction.

    `hashes` are the hashes subscribed on this socket; a failure whose text names one of them (and has
    no `hash` field) is scoped to it, as DataSift's multi-stream messages name the hash in the text.
    """
    if not isinstance(message, dict):
        return Malformed("not a JSON object")
    status = message.get("status")
    if status is not None:
        text = message.get("message")
        text = text if isinstance(text, str) else ("" if text is None else str(text))
        named = _named_hashes(message, text, hashes)
        if status in ("failure", "error"):
            return Failure(text or f"DataSift reported {status}", named,
                           credentials=not named and _about_credentials(text))
        if status == "connected" or "tick" in message:
            return Tick()
        one = min(named) if named else None
        if status in ("success", "warning"):
            return Notice(status, text, one)
        return Notice("info", text, one)
    if "tick" in message:
        return Tick()
    if message.get("reconnect") is True:
        return Reconnect()
    stream_hash = message.get("hash")
    data = message.get("data")
    if not isinstance(stream_hash, str) or not stream_hash:
        return Malformed("message without status, reconnect or hash")
    if not isinstance(data, dict):
        return Malformed("stream message without a data object", hash=stream_hash)
    deleted = data.get("deleted") is True or message.get("deleted") is True
    interaction_id = _interaction_id(data)
    key = interaction_id
    if interaction_id is not None and deleted:
        key = f"deleted:{interaction_id}"  # a delete is an event of its own, with an id of its own
    return Item(stream_hash, data, deleted, key)


def _named_hashes(message: dict[str, Any], text: str, hashes: Collection[str]) -> frozenset[str]:
    """The hashes a status message is about: its `hash` field, its `hashes` list, else this socket's
    hashes that its text names."""
    value, listed = message.get("hash"), message.get("hashes")
    named = {value} if isinstance(value, str) and value else set()
    if isinstance(listed, list):
        named.update(h for h in listed if isinstance(h, str) and h)
    if named:
        return frozenset(named)
    return frozenset(candidate for candidate in hashes if candidate and candidate in text)


def confirms(notice: Notice) -> bool:
    """DataSift's success text for a subscribe ("Successfully subscribed to hash H"), not an unsubscribe."""
    text = notice.message.lower()
    return notice.level == "success" and "subscribed" in text and "unsubscribed" not in text


def says_missing(notice: Notice) -> bool:
    """A warning that its hash does not exist ("The hash H doesn't exist")."""
    text = notice.message.lower()
    return notice.level == "warning" and any(words in text for words in NONEXISTENT_WORDS)


def _about_credentials(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in CREDENTIAL_WORDS)


def _interaction_id(data: dict[str, Any]) -> str | None:
    interaction = data.get("interaction")
    if isinstance(interaction, dict):
        value = interaction.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


# ---------------------------------------------------------------- URLs


def stream_url(base: str, username: str, api_key: str) -> str:
    """`{stream-url}?username=..&api_key=..`, keeping any query the configured URL already has."""
    parts = urlsplit(base)
    query = urlencode({"username": username, "api_key": api_key})
    return urlunsplit(parts._replace(query=f"{parts.query}&{query}" if parts.query else query))


def public_url(base: str) -> str:
    """The URL as it may be logged: no query, no user info."""
    parts = urlsplit(base)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


# ---------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    """Send `{"action": "subscribe"|"unsubscribe", "hash": ...}` (unsubscribe once no listener follows it)."""

    action: Literal["subscribe", "unsubscribe"]
    hash: str

    @property
    def text(self) -> str:
        return orjson.dumps({"action": self.action, "hash": self.hash}).decode()


@dataclass(frozen=True, slots=True)
class Started:
    """These listeners (the tickets `join` gave them) are `started`: DataSift confirmed their hash, or an
    interaction for it arrived. Each listener is reported once."""

    members: frozenset[int]


@dataclass(frozen=True, slots=True)
class Unconfirmed:
    """These listeners' hash is subscribed but DataSift has not confirmed it within the wait: they stay
    `starting` with `message` (reported once; `Started` may follow)."""

    members: frozenset[int]
    message: str


@dataclass(frozen=True, slots=True)
class Count:
    """A skipped frame (`kind`: malformed, oversized), counted for each listener of `hashes`."""

    kind: str
    reason: str
    hashes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Resolve:
    """End the listeners of `hash` with `outcome`; the socket and the others carry on."""

    hash: str
    outcome: Outcome


@dataclass(frozen=True, slots=True)
class End:
    """End the socket: every listener on it gets `outcome`."""

    outcome: Outcome


# Two decisions are also actions, their text masked: an `Item` is handed to the listeners of its hash,
# a `Notice` is logged.
Action = Send | Started | Unconfirmed | Item | Count | Notice | Resolve | End


# ---------------------------------------------------------------- reconnect policy

NETWORK_STEP = 1.0  # datasift-python's linear back-off: +1 s a try ...
NETWORK_MAX = 16.0  # ... up to 16 s
HTTP_FIRST = 10.0  # its exponential back-off: 10 s ...
HTTP_MAX = 320.0  # ... doubling to 320 s


@dataclass(slots=True)
class ReconnectPolicy:
    """The delay before a socket's next connection, as datasift-python's `streamconsumer_http.run` keeps it.

    One per tenant and credentials, outliving the sockets (the driver keeps it beside them); every
    listener on a socket gets the same delay, so they come back together onto one new socket.
    """

    delay: float = 0.0

    def network_error(self) -> float:
        """A failed connect or a dropped socket: linear (never shortening a longer delay)."""
        if self.delay < NETWORK_MAX:
            self.delay = min(NETWORK_MAX, self.delay + NETWORK_STEP)
        return self.delay

    def http_error(self) -> float:
        """An HTTP status refusing the upgrade (5xx, 420, 429): exponential."""
        self.delay = min(HTTP_MAX, max(HTTP_FIRST, self.delay * 2))
        return self.delay

    def reset(self) -> None:
        """DataSift answered on a socket: the next failure starts the back-off afresh."""
        self.delay = 0.0


# ---------------------------------------------------------------- the machine


class DataSiftProtocol:
    """One socket's subscriptions, confirmations and silence.

    `members` are the listeners on the socket (a ticket each, from `join`) and their hashes; `sent` are
    the hashes subscribed on the open socket, `sent_at` when; `subscribed` those DataSift confirmed (or
    sent an interaction for); `rejected` the hashes the server failed (never unsubscribed, and
    subscribed again only when a listener joins with them anew, i.e. after a new definition);
    `confirmed` turns true at the first frame that is not a failure (the socket answers: the reconnect
    policy resets). A listener is started once its hash is subscribed, and reported so once.
    """

    def __init__(self, *, url: str, api_key: str, silence_timeout: float, max_frame_bytes: int,
                 policy: ReconnectPolicy | None = None, confirm_wait: float | None = None):
        self.url = url  # public: no query
        self._api_key = api_key
        self.silence_timeout = silence_timeout
        self.max_frame_bytes = max_frame_bytes
        self.policy = policy if policy is not None else ReconnectPolicy()
        self.confirm_wait = CONFIRM_WAIT if confirm_wait is None else confirm_wait
        self.members: dict[int, str] = {}
        self._unreported: set[int] = set()  # members not yet reported started
        self._overdue: set[int] = set()  # members reported `Unconfirmed`
        self._tickets = 0
        self.sent: set[str] = set()
        self.sent_at: dict[str, float] = {}
        self.subscribed: set[str] = set()
        self.rejected: set[str] = set()
        self.open = False
        self.confirmed = False
        self.listening_since = 0.0
        self._now = 0.0  # the last time the machine was told

    @property
    def heartbeat_bound(self) -> float:
        """Longest silence before this machine ends the socket: what its listeners declare."""
        return self.silence_timeout

    @property
    def wanted(self) -> set[str]:
        """The hashes some listener on the socket follows."""
        return set(self.members.values())

    # -- listeners joining and leaving (no frames until `sync`, so a quick leave-and-join sends nothing)

    def join(self, stream_hash: str) -> int:
        """A listener of `stream_hash` joins; its ticket names it in `Started` and to `leave`."""
        self._tickets += 1
        self.members[self._tickets] = stream_hash
        self._unreported.add(self._tickets)
        self.rejected.discard(stream_hash)  # a new definition may try a hash the server refused before
        return self._tickets

    def leave(self, member: int) -> None:
        self.members.pop(member, None)
        self._unreported.discard(member)
        self._overdue.discard(member)

    def sync(self, now: float | None = None) -> list[Action]:
        """Frames that make the open socket's subscriptions equal to the listeners' hashes."""
        if not self.open:
            return []
        now = self._clock(now)
        actions: list[Action] = []
        wanted = self.wanted
        for stream_hash in sorted(wanted - self.sent - self.rejected):
            self.sent.add(stream_hash)
            self.sent_at[stream_hash] = now
            actions.append(Send("subscribe", stream_hash))
        for stream_hash in sorted(self.sent - wanted):
            self.sent.discard(stream_hash)
            self.subscribed.discard(stream_hash)  # a later subscribe is confirmed afresh
            self.sent_at.pop(stream_hash, None)
            actions.append(Send("unsubscribe", stream_hash))
        return actions + self._started()

    # -- the socket

    def opened(self, now: float) -> list[Action]:
        self.open = True
        self.listening_since = now
        return self.sync(now)

    def listening(self, now: float) -> None:
        """The driver waits for the next frame from now: time spent handing events on under
        back-pressure is ours, not the server's silence."""
        self.listening_since = self._clock(now)

    def deadline(self) -> float:
        """When `tick` has something to say: silence ends the socket, or a subscribe waited too long."""
        waits = [self.sent_at[self.members[m]] + self.confirm_wait for m in self._unreported - self._overdue
                 if self.members[m] in self.sent_at]
        return min([self.listening_since + self.silence_timeout, *waits])

    def tick(self, now: float) -> list[Action]:
        now = self._clock(now)
        if self.open and now >= self.listening_since + self.silence_timeout:
            return [End(Retry("heartbeat", f"No data or tick from DataSift for {self.silence_timeout:g}s; "
                                           f"reconnecting", 0))]
        return self._unconfirmed(now)

    def receive(self, raw: bytes | str, now: float) -> list[Action]:
        """One frame: what to do about it, in order."""
        self.listening_since = self._clock(now)
        decision = decode_frame(raw, self.max_frame_bytes, self.sent)
        match decision:
            case Item():
                return [*self._confirm(), *self._subscribed(decision.hash), decision, *self._unconfirmed(now)]
            case Tick():
                return [*self._confirm(), *self._unconfirmed(now)]
            case Notice():
                return [*self._confirm(), *self._notice(decision), *self._unconfirmed(now)]
            case Failure():
                return self._failure(decision)
            case Reconnect():
                return [End(Retry("reconnect-advice", "DataSift asked for a reconnect", 0))]
            case Malformed():  # counted for the listeners of its hash, or for all when it names none
                wanted = self.wanted
                hashes = wanted & {decision.hash} if decision.hash is not None else wanted
                return [Count(decision.kind, self.mask(decision.reason), frozenset(hashes))]
        raise AssertionError(f"unhandled decision {decision!r}")

    def mask(self, text: str) -> str:
        return mask(text, self._api_key)

    # -- how a socket ends (the driver saw it happen; the machine words it, with the policy's delay)

    def handshake_refused(self, code: int) -> Outcome:
        """The server answered the WebSocket handshake with HTTP `code`."""
        if code in (401, 403):
            return Fail(f"DataSift rejected the credentials (HTTP {code})")
        reason = f"DataSift refused the connection to {self.url} (HTTP {code})"
        if 400 <= code < 500 and code not in (408, 420, 429):
            return Fail(reason)
        return Retry("refused", reason, self.policy.http_error())

    def invalid_url(self) -> Outcome:
        return Fail(f"stream-url is not a valid WebSocket URL: {self.url}")

    def unreachable(self, detail: str, kind: str = "network") -> Outcome:
        return Retry(kind, f"Cannot connect to DataSift at {self.url}: {self.mask(detail)}",
                     self.policy.network_error())

    def closed(self, received: tuple[int, str] | None, sent: tuple[int, str] | None) -> Outcome:
        """The socket closed: the close frame `received` from the server and the one we `sent` (code, reason)."""
        self.open = False
        if received is None:
            if sent is not None and sent[0] != 1000:  # ours: ping timeout (1011), frame too big (1009)
                why = f": {sent[1]}" if sent[1] else ""
                kind = {1009: "protocol", 1011: "heartbeat"}.get(sent[0], "closed")
                return Retry(kind, f"Connection to DataSift closed by listenerd (code {sent[0]}{why})",
                             self.policy.network_error())
            return Retry("network", "Connection to DataSift lost (no close frame)", self.policy.network_error())
        reason = self.mask(received[1]) if received[1] else ""
        return Retry("closed", f"DataSift closed the connection (code {received[0]}{': ' + reason if reason else ''})",
                     self.policy.network_error())

    # -- internals

    def _clock(self, now: float | None) -> float:
        if now is not None:
            self._now = now
        return self._now

    def _confirm(self) -> list[Action]:
        """The socket answered: the back-off starts afresh next time."""
        if not self.confirmed:
            self.confirmed = True
            self.policy.reset()
        return []

    def _subscribed(self, stream_hash: str | None) -> list[Action]:
        if stream_hash is not None and stream_hash in self.sent and stream_hash not in self.subscribed:
            self.subscribed.add(stream_hash)
            return self._started()
        return []

    def _started(self) -> list[Action]:
        """The listeners not reported yet whose hash DataSift holds."""
        ready = frozenset(member for member in self._unreported if self.members[member] in self.subscribed)
        self._unreported -= ready
        return [Started(ready)] if ready else []

    def _unconfirmed(self, now: float) -> list[Action]:
        """Listeners whose hash went unconfirmed past the wait, each reported once, by hash."""
        late: dict[str, set[int]] = {}
        for member in self._unreported - self._overdue:
            stream_hash = self.members[member]
            if stream_hash in self.sent_at and now >= self.sent_at[stream_hash] + self.confirm_wait:
                late.setdefault(stream_hash, set()).add(member)
        actions: list[Action] = []
        for stream_hash, members in sorted(late.items()):
            self._overdue |= members
            actions.append(Unconfirmed(frozenset(members), f"Subscribed to stream {stream_hash}; DataSift has "
                                                           f"not confirmed it after {self.confirm_wait:g}s"))
        return actions

    def _notice(self, notice: Notice) -> list[Action]:
        masked = Notice(notice.level, self.mask(notice.message), notice.hash)
        if notice.hash is not None and confirms(notice):
            return [*self._subscribed(notice.hash), masked]
        if notice.hash in self.wanted and says_missing(notice):
            return [masked, *self._refuse(frozenset({notice.hash}), sanitised(masked.message))]
        return [masked]

    def _failure(self, failure: Failure) -> list[Action]:
        text = sanitised(self.mask(failure.message))  # a status quotes the server's first words, printable
        if not failure.hashes:
            if failure.credentials:
                return [End(Fail(f"DataSift refused the credentials: {text}"))]
            # neither credentials nor a stream: not known to be permanent, so back off and try again
            return [End(Retry("refused", f"DataSift reported a failure: {text}", self.policy.network_error()))]
        return self._refuse(failure.hashes, text)

    def _refuse(self, hashes: frozenset[str], text: str) -> list[Action]:
        """DataSift refused these hashes: their listeners fail; the socket and the others carry on."""
        actions: list[Action] = []
        wanted = self.wanted
        for stream_hash in sorted(hashes):
            self.rejected.add(stream_hash)
            self.sent.discard(stream_hash)
            self.subscribed.discard(stream_hash)
            self.sent_at.pop(stream_hash, None)
            if stream_hash in wanted:
                actions.append(Resolve(stream_hash, Fail(f"DataSift refused stream {stream_hash}: {text}")))
            else:
                actions.append(Notice("warning", f"datasift failure for a hash no listener follows: {text}",
                                      stream_hash))
        return actions
