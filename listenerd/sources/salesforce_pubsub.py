"""Salesforce Pub/Sub API source: one gRPC channel per integration, one Subscribe stream per listener.

Why this shape: gRPC multiplexes streams on one HTTP/2 connection, so the connection group
(`PubSubChannels`, kept in the supervisor's `ctx.shared` under `group.group_key`) is the channel, its
login and its schema cache, and each listener's own task runs its own bidirectional `Subscribe`
stream on it: a stream's failure (unknown topic, refused replay id) is that listener's alone, and
nothing needs a group task to demultiplex. The login is the CometD listener's (`SalesforceClients`
in `salesforce.py`, shared by both types: one login per integration, single flight, a new one only
when Salesforce refuses the token). The last listener to leave closes the channel.

The decisions are the core's (`salesforce_pubsub_protocol.py`); this module moves messages:
metadata `accesstoken`, `instanceurl`, `tenantid` on every call; `GetSchema` once per schema id
(cached on the channel, single flight), payloads decoded with fastavro; each event emitted with its
replay id (decimal) as the checkpoint, which the outbox commits with it, so a restart resumes after
the last durable event. Flow control: more events are asked for only while the outbox has room; at
its bound nothing is asked and the server sends nothing more (it keeps sending keepalives).

Egress: gRPC resolves names itself, so for an API-made integration (`ctx.egress`) the channel dials
addresses resolved and checked here (`egress.grpc_target`), with TLS still verifying `pubsub-url`'s host:
a name re-bound to loopback or an internal range is `failed` ("pubsub-url: egress refused: ...") before
a byte is sent. The `instance_url` the login answers is sent only as the `instanceurl` metadata, never
dialled (the CometD source dials it, checked there).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import fastavro
import grpc
import orjson

from listenerd.egress import EgressRefused, grpc_target
from listenerd.model import SalesforceIntegration, SalesforcePubsubOptions
from listenerd.net import describe
from listenerd.outcome import Ended, Fail, Retry
from listenerd.proto import pubsub_api_pb2 as pb
from listenerd.proto import pubsub_api_pb2_grpc as pb_grpc
from listenerd.sources.base import SourceContext
from listenerd.sources.group import Registered, group_key
from listenerd.sources.salesforce import SalesforceClients
from listenerd.sources.salesforce_auth import Login, Session
from listenerd.sources.salesforce_pubsub_protocol import (
    EARLIEST,
    LATEST,
    GrpcError,
    Relogin,
    Resubscribe,
    Subscription,
    bitmap_fields,
    replay_decimal,
    start_for,
)

STOP_TIMEOUT = 2.0
MAX_MESSAGE_BYTES = 64 << 20  # one FetchResponse: up to 100 events of up to 1 MB each (Salesforce's event limit)
CHECK_EVERY = 1.0  # how often a quiet stream looks at its clock (more often for a short bound)
# A stream the server has neither refused nor answered after this long counts as subscribed: Salesforce
# refuses a bad token, topic or replay id at once, but a gRPC server may hold its response headers until
# its first message, which on an idle topic is the keepalive up to 270 s later.
ACCEPTED_AFTER = 3.0
BITMAP_FIELDS = ("changedFields", "nulledFields", "diffFields")


@dataclass(frozen=True, slots=True)
class Schema:
    parsed: Any  # fastavro's parsed schema
    raw: dict[str, Any]  # the JSON, for CDC bitmaps (field positions)


def target_of(url: str) -> tuple[str, bool]:
    """`https://host:port` -> (`host:port`, TLS); `http://` is plaintext gRPC (local simulators)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}", parts.scheme == "https"


class PubSubChannels:
    """The Pub/Sub channels of one supervisor (`ctx.shared`), by tenant integration and settings."""

    def __init__(self) -> None:
        self.channels: dict[str, PubSubChannel] = {}

    async def channel_for(self, ctx: SourceContext, login: Login) -> PubSubChannel:
        """The integration's open channel, else a new one (its addresses checked first under a policy).
        Raises EgressRefused (the policy refuses the host or an address it resolves to), OSError."""
        integration: SalesforceIntegration = ctx.integration  # type: ignore[assignment]
        key = group_key(ctx.tenant_id, id(login), integration.pubsub_url)
        found = self.channels.get(key)
        if found is not None and not found.closed:
            return found
        target, options = await grpc_target(ctx.egress, "salesforce", integration.pubsub_url, "pubsub-url",
                                            ctx.settings.connect_timeout)
        found = self.channels.get(key)  # another listener may have opened it meanwhile
        if found is None or found.closed:
            found = self.channels[key] = PubSubChannel(key, self.channels, login, integration.pubsub_url,
                                                       ctx.settings.ca_bundle, target, options)
        return found


class PubSubChannel(Registered):
    """One gRPC channel of one integration: every listener's stream on it, and the schemas it has seen."""

    def __init__(self, key: str, registry: dict[str, Any], login: Login, url: str, ca_bundle: str | None,
                 target: str | None = None, pinning: list[tuple[str, Any]] | None = None):
        """`target`/`pinning`: checked addresses to dial and the options that keep the host's name for TLS
        and `:authority` (`egress.grpc_target`); absent, gRPC resolves `url`'s host itself."""
        self.key, self.registry, self.login, self.url = key, registry, login, url
        self.pinned = bool(pinning)
        self.closed = False
        self.task = None
        self.members = 0
        self.schemas: dict[str, asyncio.Task[Schema]] = {}  # fetches, in flight or failed
        self.ready: dict[str, Schema] = {}  # fetched: the per-event path reads only this
        named, tls = target_of(url)
        target = target or named
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.primary_user_agent", login.user_agent), *(pinning or [])]
        if tls:
            roots = open(ca_bundle, "rb").read() if ca_bundle else None  # noqa: SIM115 - read at once
            self.channel = grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
        else:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        self.stub = pb_grpc.PubSubStub(self.channel)

    def join(self) -> None:
        self.members += 1

    def retire(self) -> None:
        """No new stream joins this channel (the next one opens a fresh one); its members finish on it."""
        self._close()

    async def leave(self) -> None:
        self.members -= 1
        if self.members <= 0:
            self._close()
            await self.channel.close(grace=STOP_TIMEOUT)

    async def schema(self, schema_id: str, metadata: tuple[tuple[str, str], ...]) -> Schema:
        """`GetSchema` once per id (concurrent asks share one call); a failed fetch is not cached."""
        found = self.ready.get(schema_id)
        if found is not None:
            return found
        flight = self.schemas.get(schema_id)
        if flight is None or (flight.done() and (flight.cancelled() or flight.exception() is not None)):
            flight = self.schemas[schema_id] = asyncio.create_task(self._fetch_schema(schema_id, metadata))
        return await asyncio.shield(flight)

    async def _fetch_schema(self, schema_id: str, metadata: tuple[tuple[str, str], ...]) -> Schema:
        info = await self.stub.GetSchema(pb.SchemaRequest(schema_id=schema_id), metadata=metadata)
        raw = orjson.loads(info.schema_json)
        schema = self.ready[schema_id] = Schema(fastavro.parse_schema(raw), raw)
        return schema


def metadata_for(session: Session) -> tuple[tuple[str, str], ...]:
    return (("accesstoken", session.access_token), ("instanceurl", session.instance_url),
            ("tenantid", session.org_id))


def grpc_error(exc: grpc.aio.AioRpcError) -> GrpcError:
    trailers = dict(exc.trailing_metadata() or ())
    code = trailers.get("error-code", "")
    return GrpcError(exc.code().name, exc.details() or "", code if isinstance(code, str) else "")


def change_header(record: dict[str, Any], schema: Schema) -> dict[str, Any] | None:
    """A CDC event's ChangeEventHeader with its bitmap fields as field names (the record keeps the decoded one)."""
    header = record.get("ChangeEventHeader")
    if not isinstance(header, dict):
        return None
    decoded = dict(header)
    for name in BITMAP_FIELDS:
        if isinstance(header.get(name), list):
            decoded[name] = bitmap_fields(schema.raw, header[name])
    record["ChangeEventHeader"] = decoded
    return decoded


class Stream:
    """One listener's Subscribe stream on its integration's channel, driven by its `Subscription`."""

    def __init__(self, ctx: SourceContext, channel: PubSubChannel, sub: Subscription, session: Session):
        self.ctx, self.channel, self.sub, self.session = ctx, channel, sub, session
        self.requests: asyncio.Queue[pb.FetchRequest] = asyncio.Queue()
        self.note = ""  # said beside "Subscribed" (a replay gap)
        self.subscribed = False

    async def _requests(self) -> Any:
        while True:
            yield await self.requests.get()

    async def run(self) -> Any:
        """Until the stream ends: the core's action for how it ended (Relogin, Resubscribe, Retry, Fail)."""
        ctx, sub = self.ctx, self.sub
        metadata = metadata_for(self.session)
        call = self.channel.stub.Subscribe(self._requests(), metadata=metadata)
        opened = time.monotonic()
        self.requests.put_nowait(pb.FetchRequest(**sub.open(time.monotonic(), ctx.outbox_room())))  # type: ignore[arg-type]
        read: asyncio.Future[Any] = asyncio.ensure_future(call.read())
        headers: asyncio.Future[Any] | None = asyncio.ensure_future(call.initial_metadata())
        room: asyncio.Task[None] | None = None
        try:
            while True:
                waits: set[asyncio.Future[Any]] = {read}
                if headers is not None:
                    waits.add(headers)
                if sub.owed == 0 and room is None:
                    room = asyncio.create_task(ctx.wait_for_room())
                if room is not None:
                    waits.add(room)
                done, _ = await asyncio.wait(waits, timeout=min(CHECK_EVERY, sub.bound / 4),
                                             return_when=asyncio.FIRST_COMPLETED)
                if headers is not None and headers in done:
                    headers = None
                    if not call.done():  # headers of an accepted stream, not a refusal's trailers-only answer
                        self._subscribed()
                if room is not None and room in done:
                    room = None
                    sub.idle(time.monotonic())
                    self._top_up()
                if read in done:
                    response = read.result()
                    if response is grpc.aio.EOF:
                        return sub.ended()
                    await self._received(response, metadata)
                    read = asyncio.ensure_future(call.read())
                    self._top_up()
                elif not done:
                    if not self.subscribed and time.monotonic() - opened >= ACCEPTED_AFTER and not call.done():
                        self._subscribed()
                    if ctx.paused:
                        sub.idle(time.monotonic())
                    elif (silent := sub.silent(time.monotonic())) is not None:
                        return silent
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and self.channel.pinned:
                self.channel.retire()  # its pinned addresses may be stale: the next stream resolves again
            return sub.failed(grpc_error(exc))
        finally:
            call.cancel()
            for task in (read, room, headers):
                if task is not None and not task.done():
                    task.cancel()
            with contextlib.suppress(BaseException):
                await read

    def _top_up(self) -> None:
        more = self.sub.top_up(self.ctx.outbox_room())
        if more:
            self.requests.put_nowait(pb.FetchRequest(num_requested=more))

    def _subscribed(self) -> None:
        """The server accepted the stream (its headers, or a first response: events or a keepalive)."""
        if not self.subscribed:
            self.subscribed = True
            self.sub.answered = True
            self.ctx.started(f"Subscribed to {self.sub.topic} on the Pub/Sub API{self.note}")

    async def _received(self, response: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        ctx, sub = self.ctx, self.sub
        sub.received(len(response.events), response.latest_replay_id, time.monotonic())
        ctx.alive()
        self._subscribed()
        for consumer in response.events:
            event = consumer.event
            schema = self.channel.ready.get(event.schema_id) or await self.channel.schema(event.schema_id, metadata)
            try:
                record = fastavro.schemaless_reader(io.BytesIO(event.payload), schema.parsed, None)
            except Exception as exc:  # the schema says one thing, the bytes another: count, skip, go on
                ctx.count("malformed")
                ctx.log.warning("event payload does not match its schema; skipped", schema=event.schema_id,
                                replay=replay_decimal(consumer.replay_id), error=str(exc)[:200])
                sub.handed_on(consumer.replay_id)
                continue
            replay = replay_decimal(consumer.replay_id)
            meta: dict[str, Any] = {"$event": {"replayId": replay, "id": event.id}, "$schema": {"id": event.schema_id},
                                    "$channel": sub.topic}
            if isinstance(record, dict) and (header := change_header(record, schema)) is not None:
                meta["$header"] = header
            await ctx.emit(record, meta=meta, key=f"{self.session.org_id}{sub.topic}/{replay}", checkpoint=replay)
            sub.handed_on(consumer.replay_id)
        sub.idle(time.monotonic())  # emits waiting for outbox room are back-pressure, not the server's silence


async def run(ctx: SourceContext) -> None:
    """One listener: the shared login, then its Subscribe stream on the shared channel, until its outcome."""
    integration: SalesforceIntegration = ctx.integration  # type: ignore[assignment]
    options: SalesforcePubsubOptions = ctx.listener.options  # type: ignore[attr-defined]
    login = ctx.shared.get(SalesforceClients).login_for(ctx)
    ctx.starting(f"Logging in to {integration.login_url}")
    session = await login.current()
    stored = await ctx.checkpoint()  # after the last run's queued events landed (see SourceContext.checkpoint)
    sub = Subscription(options.topic, start_for(options.replay, stored, ctx.launch.attempt, ctx.launch.replay_from),
                       options.batch, fallback=LATEST if options.replay == "new" else EARLIEST,
                       margin=ctx.settings.salesforce_poll_margin, keepalive=ctx.settings.salesforce_pubsub_keepalive)
    ctx.set_heartbeat_bound(sub.bound)
    try:
        channel = await ctx.shared.get(PubSubChannels).channel_for(ctx, login)
    except EgressRefused as exc:
        raise Ended(Fail(f"pubsub-url: {exc}")) from None
    except OSError as exc:  # TimeoutError too
        raise Ended(Retry("network", f"Pub/Sub API at {integration.pubsub_url}: "
                                     f"{describe(exc, limit=200)}")) from None
    channel.join()
    note = ""
    try:
        while True:
            ctx.starting(f"Subscribing to {options.topic} on the Pub/Sub API at {integration.pubsub_url} "
                         f"({sub.start.describe()})")
            stream = Stream(ctx, channel, sub, session)
            stream.note = note
            action = await stream.run()
            note = ""
            if isinstance(action, Relogin):
                ctx.reconnected()
                ctx.log.info("Pub/Sub API refused the session; logging in again", reason=action.reason)
                session = await login.refresh(session)
            elif isinstance(action, Resubscribe):
                note = f" ({action.note})"
                ctx.count("replay_gap")
                ctx.log.warning("replay id refused; subscribing again", start=action.start.describe(),
                                note=action.note)
            else:
                raise Ended(action)
    except (grpc.aio.AioRpcError, OSError) as exc:  # outside a stream: the channel itself
        raise Ended(Retry("network", f"Pub/Sub API at {integration.pubsub_url}: {exc}")) from None
    finally:
        await channel.leave()
