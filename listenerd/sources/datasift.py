"""DataSift multi-stream source: one shared WebSocket per tenant and credentials, one hash per listener.

Why it is shaped this way: DataSift's `/multi` endpoint carries many stream hashes on one socket
(`{stream-url}?username=U&api_key=K`, then `{"action":"subscribe","hash":H}` per hash), and an
account's connections are a limited resource, so the listeners of one tenant that use the same
credentials and stream URL share ONE socket. The supervisor still runs one task per listener: each
task registers its hash with the shared `Stream` (kept in `ctx.shared`) and waits for its own
outcome, while the stream's own task owns the socket. The socket lives for one connection "epoch":
when it ends (drop, `{"reconnect": true}`, 65 s of silence, a failure) every listener on it gets its
outcome (`ListenerRetry` or `ListenerFailed`), the supervisor applies the back-off, and the listeners
that come back open a fresh socket and resubscribe their hashes. Adding or removing a listener while
the socket is live subscribes or unsubscribes on it; the last listener to leave closes it.

Protocol decisions (dispatch order, failure scope, delete identity) live in `classify`, a pure
function unit-tested without sockets. Facts and sources: /work/shared/protocols/pusher-datasift.md
part B (dev.datasift.com/docs/streaming-api/multiple-streams; datasift-node `lib/stream.js`,
datasift-java `MultiStreamInteraction.java`, datasift-python `tests/mocks.py`).

The api key travels only in the URL query and is never logged: logs and reasons carry the URL
without its query, and any server text that echoes the key is masked before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import ssl
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import orjson
import structlog
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from listenerd.sources.base import ListenerFailed, ListenerRetry, SourceContext

_REGISTRY_KEY = "datasift.streams"
_MASK = "********"
_CREDENTIAL_WORDS = ("api key", "api_key", "apikey", "username", "credential", "authenticat", "unauthori",
                     "not authorized", "forbidden", "access denied")
_CLOSE_WAIT = 2.0  # how long the last listener leaving waits for the socket's close handshake
# websockets logs the request line (with the api key in its query) at DEBUG: never let that through,
# whatever the daemon's log level.
_WS_LOG = logging.getLogger("listenerd.source.datasift.websockets")
_WS_LOG.setLevel(logging.INFO)


# ---------------------------------------------------------------- protocol: pure, no I/O


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
    """`status` `failure`/`error`: scoped to `hash` when it names one, else to the whole socket."""

    message: str
    hash: str | None = None
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
        named = _named_hash(message, text, hashes)
        if status in ("failure", "error"):
            return Failure(text or f"DataSift reported {status}", named,
                           credentials=named is None and _about_credentials(text))
        if status == "connected" or "tick" in message:
            return Tick()
        if status in ("success", "warning"):
            return Notice(status, text, named)
        return Notice("info", text, named)
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


def _named_hash(message: dict[str, Any], text: str, hashes: Collection[str]) -> str | None:
    value = message.get("hash")
    if isinstance(value, str) and value:
        return value
    for candidate in hashes:
        if candidate and candidate in text:
            return candidate
    return None


def _about_credentials(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in _CREDENTIAL_WORDS)


def _interaction_id(data: dict[str, Any]) -> str | None:
    interaction = data.get("interaction")
    if isinstance(interaction, dict):
        value = interaction.get("id")
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
            return str(value)
    return None


# ---------------------------------------------------------------- URLs and secrets


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


def _ssl_context(url: str, ca_bundle: str | None) -> ssl.SSLContext | None:
    if not url.lower().startswith("wss:"):
        return None
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()


# ---------------------------------------------------------------- the shared socket


@dataclass(eq=False)
class _Subscriber:
    ctx: SourceContext
    hash: str
    outcome: asyncio.Future[tuple[str, str, float | None]]
    started: bool = False


@dataclass(eq=False)
class _Ended(Exception):  # noqa: N818 - an outcome for the whole socket
    kind: str  # "retry" | "failed"
    reason: str
    delay: float | None = None


@dataclass(eq=False)
class Stream:
    """One WebSocket to `/multi` shared by every listener of one tenant with the same credentials."""

    key: str
    registry: dict[str, Stream]
    tenant_id: str
    username: str
    api_key: str
    base_url: str
    settings: Any
    subscribers: list[_Subscriber] = field(default_factory=list)
    closed: bool = False
    task: asyncio.Task[None] | None = None
    ws: ClientConnection | None = None
    sent: set[str] = field(default_factory=set)  # hashes subscribed on the live socket
    rejected: set[str] = field(default_factory=set)  # hashes the server failed: never unsubscribed
    confirmed: bool = False  # a non-failure frame arrived since the socket opened
    opened_at: float | None = None
    _dirty: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.url = public_url(self.base_url)
        self.log = structlog.get_logger("listenerd.source").bind(tenant=self.tenant_id, source="datasift",
                                                                 stream=self.url)

    def log_for(self, stream_hash: str | None) -> Any:
        """The stream's logger, naming the listener(s) that follow `stream_hash`."""
        ids = sorted({s.ctx.listener_id for s in self.subscribers if s.hash == stream_hash})
        return self.log.bind(listener=",".join(ids)) if ids else self.log

    # -- listeners joining and leaving (called from listener tasks)

    def add(self, ctx: SourceContext, stream_hash: str) -> _Subscriber:
        sub = _Subscriber(ctx, stream_hash, asyncio.get_running_loop().create_future())
        self.subscribers.append(sub)
        self.rejected.discard(stream_hash)  # a new definition may try a hash the server refused before
        if self.task is None:
            self.task = asyncio.create_task(self._run(), name=f"datasift:{self.url}")
        self._dirty.set()
        return sub

    def remove(self, sub: _Subscriber) -> None:
        if sub in self.subscribers:
            self.subscribers.remove(sub)
        if not self.subscribers and not self.closed:
            self._close()
        else:
            self._dirty.set()

    def wanted(self) -> set[str]:
        return {s.hash for s in self.subscribers}

    # -- the socket's task

    async def _run(self) -> None:
        try:
            await self._connect_and_read()
            ended = _Ended("retry", "DataSift closed the connection")
        except _Ended as exc:
            ended = exc
        except asyncio.CancelledError:
            ended = _Ended("retry", "DataSift connection closed")
            raise
        except Exception as exc:  # a bug here must not strand the listeners: they retry
            self.log.exception("datasift stream crashed")
            ended = _Ended("retry", f"Unexpected error: {type(exc).__name__}: {self._mask(str(exc))}")
        finally:
            self._close(cancel=False)
            self._resolve_all(ended)
            if self.ws is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_CLOSE_WAIT):
                        await self.ws.close()

    async def _connect_and_read(self) -> None:
        settings = self.settings
        url = stream_url(self.base_url, self.username, self.api_key)
        for sub in self.subscribers:
            sub.ctx.starting(f"Connecting to DataSift at {self.url} for stream: {sub.hash}")
        try:
            self.ws = await connect(
                url, open_timeout=settings.connect_timeout, ssl=_ssl_context(url, settings.ca_bundle),
                max_size=settings.max_frame_bytes * 16, close_timeout=_CLOSE_WAIT,
                user_agent_header="listenerd", logger=_WS_LOG)
        except InvalidURI:
            raise _Ended("failed", f"stream-url is not a valid WebSocket URL: {self.url}") from None
        except InvalidStatus as exc:
            code = exc.response.status_code
            if code in (401, 403):
                raise _Ended("failed", f"DataSift rejected the credentials (HTTP {code})") from None
            if 400 <= code < 500 and code not in (408, 420, 429):
                raise _Ended("failed", f"DataSift refused the connection to {self.url} (HTTP {code})") from None
            raise _Ended("retry", f"DataSift refused the connection to {self.url} (HTTP {code})") from None
        except (OSError, TimeoutError, InvalidHandshake) as exc:
            detail = self._mask(str(exc) or type(exc).__name__)
            raise _Ended("retry", f"Cannot connect to DataSift at {self.url}: {detail}") from None
        self.opened_at = time.monotonic()
        self.log.info("datasift connected", listener=",".join(sorted({s.ctx.listener_id for s in self.subscribers})))
        writer = asyncio.create_task(self._sync_subscriptions(), name=f"datasift-sync:{self.url}")
        try:
            await self._read_loop()
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer

    async def _sync_subscriptions(self) -> None:
        """Keep the live socket's subscriptions equal to the listeners' hashes."""
        assert self.ws is not None
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            wanted = self.wanted()
            for stream_hash in sorted(wanted - self.sent - self.rejected):
                await self.ws.send(orjson.dumps({"action": "subscribe", "hash": stream_hash}).decode())
                self.sent.add(stream_hash)
                self.log_for(stream_hash).info("datasift subscribe", hash=stream_hash)
            for stream_hash in sorted(self.sent - wanted):
                self.sent.discard(stream_hash)
                await self.ws.send(orjson.dumps({"action": "unsubscribe", "hash": stream_hash}).decode())
                self.log.info("datasift unsubscribe", hash=stream_hash)
            self._mark_started()

    async def _read_loop(self) -> None:
        assert self.ws is not None
        silence = self.settings.datasift_silence_timeout
        # End the socket a little before the supervisor's watchdog (same bound, measured from the same
        # frame) could: this path reconnects at once, the watchdog's path waits out the back-off.
        deadline = silence - min(0.25, silence * 0.2)
        max_bytes = self.settings.max_frame_bytes
        while True:
            try:
                async with asyncio.timeout(deadline):  # not wait_for: on 3.11 it can swallow a cancel
                    raw = await self.ws.recv(decode=False)
            except TimeoutError:
                raise _Ended("retry", f"No data or tick from DataSift for {silence:g}s; reconnecting", 0) from None
            except ConnectionClosed as exc:
                raise _Ended("retry", self._closed_reason(exc)) from None
            if self.closed:  # the last listener left while this frame arrived
                return
            for sub in self.subscribers:
                sub.ctx.alive()
            decision = decode_frame(raw, max_bytes, self.sent)
            await self._dispatch(decision)

    async def _dispatch(self, decision: Decision) -> None:
        match decision:
            case Item():
                self._confirm()
                meta = {"$hash": decision.hash, "$deleted": decision.deleted}
                for sub in [s for s in self.subscribers if s.hash == decision.hash]:
                    await sub.ctx.emit(decision.data, meta=meta, key=decision.key)
            case Tick():
                self._confirm()
            case Notice():
                self._confirm()
                text = self._mask(decision.message)
                if decision.level == "warning":
                    self.log_for(decision.hash).warning("datasift warning", message=text, hash=decision.hash)
                else:
                    self.log_for(decision.hash).info("datasift notice", level=decision.level, message=text,
                                                     hash=decision.hash)
            case Failure():
                self._fail(decision)
            case Reconnect():
                raise _Ended("retry", "DataSift asked for a reconnect", 0)
            case Malformed():
                targets = [s for s in self.subscribers if decision.hash is None or s.hash == decision.hash]
                for sub in targets:
                    sub.ctx.count(decision.kind)
                self.log.warning("datasift frame skipped", kind=decision.kind, reason=self._mask(decision.reason))

    def _fail(self, failure: Failure) -> None:
        text = self._mask(failure.message)
        if failure.hash is None:
            if failure.credentials:
                raise _Ended("failed", f"DataSift refused the credentials: {text}")
            # neither credentials nor a stream: not known to be permanent, so back off and try again
            raise _Ended("retry", f"DataSift reported a failure: {text}")
        self.rejected.add(failure.hash)
        self.sent.discard(failure.hash)
        hit = [s for s in self.subscribers if s.hash == failure.hash]
        if not hit:
            self.log.warning("datasift failure for a hash no listener follows", hash=failure.hash, message=text)
        for sub in hit:
            self._resolve(sub, _Ended("failed", f"DataSift refused stream {failure.hash}: {text}"))

    def _confirm(self) -> None:
        if not self.confirmed:
            self.confirmed = True
            self._mark_started()

    def _mark_started(self) -> None:
        """A listener is `started` once its hash is subscribed on a socket that has answered."""
        if not self.confirmed:
            return
        for sub in self.subscribers:
            if not sub.started and sub.hash in self.sent and not sub.outcome.done():
                sub.started = True
                sub.ctx.started(f"Connected to stream: {sub.hash}")

    def _closed_reason(self, exc: ConnectionClosed) -> str:
        if exc.rcvd is None:
            if exc.sent is not None and exc.sent.code != 1000:  # ours: ping timeout (1011), frame too big (1009)
                why = f": {exc.sent.reason}" if exc.sent.reason else ""
                return f"Connection to DataSift closed by listenerd (code {exc.sent.code}{why})"
            return "Connection to DataSift lost (no close frame)"
        reason = self._mask(exc.rcvd.reason) if exc.rcvd.reason else ""
        return f"DataSift closed the connection (code {exc.rcvd.code}{': ' + reason if reason else ''})"

    def _mask(self, text: str) -> str:
        return text.replace(self.api_key, _MASK) if self.api_key and self.api_key in text else text

    # -- ending

    def _resolve(self, sub: _Subscriber, ended: _Ended) -> None:
        if not sub.outcome.done():
            sub.outcome.set_result((ended.kind, ended.reason, ended.delay))

    def _resolve_all(self, ended: _Ended) -> None:
        for sub in list(self.subscribers):
            self._resolve(sub, ended)

    def _close(self, cancel: bool = True) -> None:
        """No new listener may join this socket; the next one opens a fresh socket."""
        self.closed = True
        if self.registry.get(self.key) is self:
            del self.registry[self.key]
        if cancel and self.task is not None and not self.task.done():
            self.task.cancel()


def _stream_for(ctx: SourceContext) -> Stream:
    registry: dict[str, Stream] = ctx.shared.setdefault(_REGISTRY_KEY, {})
    creds = ctx.integration
    # settings too: after a reload that changes them, restarted listeners get a socket that uses them
    digest = hashlib.sha256(orjson.dumps([ctx.tenant_id, creds.username, creds.api_key, creds.stream_url,
                                          ctx.settings.dump()], option=orjson.OPT_SORT_KEYS))
    key = digest.hexdigest()
    stream = registry.get(key)
    if stream is None or stream.closed:
        stream = Stream(key=key, registry=registry, tenant_id=ctx.tenant_id, username=creds.username,
                        api_key=creds.api_key,
                        base_url=creds.stream_url, settings=ctx.settings)
        registry[key] = stream
    return stream


async def run(ctx: SourceContext) -> None:
    """One listener: join the shared socket with its hash, wait for this listener's outcome."""
    stream_hash = ctx.listener.options.hash
    ctx.set_heartbeat_bound(ctx.settings.datasift_silence_timeout)
    ctx.starting(f"Connecting to DataSift for stream: {stream_hash}")
    stream = _stream_for(ctx)
    sub = stream.add(ctx, stream_hash)
    try:
        kind, reason, delay = await sub.outcome
    finally:
        stream.remove(sub)
        task = stream.task
        if stream.closed and task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task}, timeout=_CLOSE_WAIT + 0.5)  # the close handshake, bounded
    if kind == "failed":
        raise ListenerFailed(reason)
    raise ListenerRetry(reason, delay)


__all__ = ["Decision", "Failure", "Item", "Malformed", "Notice", "Reconnect", "Stream", "Tick", "classify",
           "decode_frame", "public_url", "run", "stream_url"]
