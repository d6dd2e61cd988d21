"""The Salesforce Pub/Sub API over loopback: gRPC (plaintext), package `eventbus.v1`, service `PubSub`.

What it serves, as the API does (https://developer.salesforce.com/docs/platform/pub-sub-api/guide/):
`Subscribe` (bidirectional: the first FetchRequest names the topic and the replay start, later ones
add `num_requested`; never more events are sent than were asked for; an idle stream gets an empty
FetchResponse with `latest_replay_id` every `keepalive` seconds), `GetSchema` and `GetTopic`. Events
are Avro binary (fastavro) with real schemas for a Platform Event (`/event/Order__e`) and a Change
Data Capture object (`/data/AccountChangeEvent`, its `ChangeEventHeader` bitmaps built from field
positions as Salesforce builds them). Replay: LATEST, EARLIEST, CUSTOM (after an 8-byte big-endian
replay id); a replay id it never issued, or one purged (`purge`), is refused.

Authentication is the org's: metadata `accesstoken` must be a token the Salesforce simulator
(`sim/salesforce.py`, passed as `org`) issued and has not revoked (`org.valid_token`, the same check
its REST and CometD use), `instanceurl` its URL and `tenantid` its org id. Errors are gRPC status
codes with Salesforce's code in the `error-code` trailer and an `rpc-id` trailer:
`UNAUTHENTICATED` + `sfdc.platform.eventbus.grpc.service.auth.error`; a refused replay id
`INVALID_ARGUMENT` + `sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted` (the code the
guide shows for a replay id it cannot use); an unknown topic `NOT_FOUND` (the trailer code for it is
our reading); a different topic on a later FetchRequest `INVALID_ARGUMENT`.

Checked against a client written by others (aiosfpubsub's stubs and Apache Avro decoder) in tests/peers.

    async with SalesforceSim() as org, SalesforcePubsubSim(org) as sim:
        sim.url                                                    # http://127.0.0.1:<port> (pubsub-url)
        sim.publish("/event/Order__e", {"OrderNumber__c": "O-1"})  # -> replay id (int)
        sim.publish_change("Account", "UPDATE", {"Name": "Acme"}, changed=["Name"], nulled=["Phone"])
        sim.silence(); sim.drop_streams(); sim.purge(upto=...); await sim.send_raw("/event/Order__e", b"...")
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import io
import itertools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

import fastavro
import grpc
import orjson

from listenerd.proto import pubsub_api_pb2 as pb
from listenerd.proto import pubsub_api_pb2_grpc as pb_grpc
from listenerd.sim.salesforce import SalesforceSim

AUTH_ERROR = "sfdc.platform.eventbus.grpc.service.auth.error"
REPLAY_ERROR = "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"
TOPIC_ERROR = "sfdc.platform.eventbus.grpc.subscription.topic.not.found"
MAX_PER_RESPONSE = 100

ORDER_SCHEMA: dict[str, Any] = {
    "type": "record", "name": "Order__e", "namespace": "com.sforce.eventbus",
    "fields": [
        {"name": "CreatedDate", "type": "long", "doc": "CreatedDate:DateTime"},
        {"name": "CreatedById", "type": "string", "doc": "CreatedBy:EntityId"},
        {"name": "OrderNumber__c", "type": ["null", "string"], "doc": "Data:Text:00N5g00000Order1", "default": None},
        {"name": "Amount__c", "type": ["null", "double"], "doc": "Data:Double:00N5g00000Order2", "default": None},
        {"name": "Status__c", "type": ["null", "string"], "doc": "Data:Text:00N5g00000Order3", "default": None},
    ]}

_ADDRESS = {"type": "record", "name": "Address", "namespace": "com.sforce.eventbus", "fields": [
    {"name": n, "type": ["null", t], "default": None} for n, t in (
        ("Street", "string"), ("City", "string"), ("State", "string"), ("PostalCode", "string"),
        ("Country", "string"), ("StateCode", "string"), ("CountryCode", "string"), ("Latitude", "double"),
        ("Longitude", "double"), ("Xyz", "string"), ("GeocodeAccuracy", "string"))]}

_HEADER = {"type": "record", "name": "ChangeEventHeader", "namespace": "com.sforce.eventbus", "fields": [
    {"name": "entityName", "type": "string"},
    {"name": "recordIds", "type": {"type": "array", "items": "string"}},
    {"name": "changeType", "type": {"type": "enum", "name": "ChangeType", "namespace": "com.sforce.eventbus",
                                    "symbols": ["CREATE", "UPDATE", "DELETE", "UNDELETE", "GAP_CREATE",
                                                "GAP_UPDATE", "GAP_DELETE", "GAP_UNDELETE", "GAP_OVERFLOW",
                                                "SNAPSHOT"]}},
    {"name": "changeOrigin", "type": "string"},
    {"name": "transactionKey", "type": "string"},
    {"name": "sequenceNumber", "type": "int"},
    {"name": "commitTimestamp", "type": "long"},
    {"name": "commitNumber", "type": "long"},
    {"name": "commitUser", "type": "string"},
    {"name": "nulledFields", "type": {"type": "array", "items": "string"}},
    {"name": "diffFields", "type": {"type": "array", "items": "string"}},
    {"name": "changedFields", "type": {"type": "array", "items": "string"}},
]}

ACCOUNT_CHANGE_SCHEMA: dict[str, Any] = {
    "type": "record", "name": "AccountChangeEvent", "namespace": "com.sforce.eventbus",
    "fields": [
        {"name": "ChangeEventHeader", "type": _HEADER, "doc": "Data:ChangeEventHeader"},
        {"name": "Name", "type": ["null", "string"], "doc": "Data:Text", "default": None},
        {"name": "Type", "type": ["null", "string"], "doc": "Data:Picklist", "default": None},
        {"name": "ParentId", "type": ["null", "string"], "doc": "Data:EntityId", "default": None},
        {"name": "BillingAddress", "type": ["null", _ADDRESS], "doc": "Data:Address", "default": None},
        {"name": "Phone", "type": ["null", "string"], "doc": "Data:Phone", "default": None},
        {"name": "Industry", "type": ["null", "string"], "doc": "Data:Picklist", "default": None},
        {"name": "AnnualRevenue", "type": ["null", "double"], "doc": "Data:Currency", "default": None},
        {"name": "NumberOfEmployees", "type": ["null", "int"], "doc": "Data:Integer", "default": None},
        {"name": "OwnerId", "type": ["null", "string"], "doc": "Data:EntityId", "default": None},
        {"name": "CreatedDate", "type": ["null", "long"], "doc": "Data:DateTime", "default": None},
        {"name": "LastModifiedDate", "type": ["null", "long"], "doc": "Data:DateTime", "default": None},
    ]}


def bitmap_of(schema: dict[str, Any], names: list[str]) -> list[str]:
    """Field names -> Salesforce's bitmap list: `0x<hex>` over top-level positions, `<i>-0x<hex>` per compound."""
    fields = [f["name"] for f in schema["fields"]]
    top, nested = 0, {}
    for name in names:
        parent, _, child = name.partition(".")
        position = fields.index(parent)
        if not child:
            top |= 1 << position
            continue
        record = next(t for t in schema["fields"][position]["type"] if isinstance(t, dict))
        nested[position] = nested.get(position, 0) | 1 << [f["name"] for f in record["fields"]].index(child)
    out = [f"0x{top:X}"] if top else []
    return out + [f"{position}-0x{bits:X}" for position, bits in sorted(nested.items())]


def replay_bytes(number: int) -> bytes:
    return number.to_bytes(8, "big")


class Refused(Exception):  # noqa: N818 - the API's refusal, as a status
    """A call ends with this gRPC status, Salesforce's code in the `error-code` trailer and an `rpc-id`."""

    def __init__(self, code: grpc.StatusCode, error_code: str, message: str):
        super().__init__(message)
        self.code, self.error_code, self.rpc_id = code, error_code, secrets.token_hex(8)
        self.details = f"{message} rpcId: {self.rpc_id}"

    def trailers(self) -> tuple[tuple[str, str], ...]:
        return ((("error-code", self.error_code),) if self.error_code else ()) + (("rpc-id", self.rpc_id),)

    def end(self, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(self.trailers())
        context.set_code(self.code)
        context.set_details(self.details)

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        context.set_trailing_metadata(self.trailers())
        await context.abort(self.code, self.details)


@dataclass
class _Topic:
    name: str
    schema: dict[str, Any]
    schema_id: str
    parsed: Any = None
    events: list[tuple[int, pb.ConsumerEvent]] = field(default_factory=list)  # (replay id, event), oldest first
    wake: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class StreamStats:
    """One Subscribe stream as the server saw it: what was asked for and what was sent (tests read these)."""

    topic: str = ""
    requested: int = 0
    sent: int = 0
    responses: int = 0
    keepalives: int = 0
    most_owed: int = 0
    metadata: dict[str, str] = field(default_factory=dict)


class SalesforcePubsubSim(pb_grpc.PubSubServicer):
    def __init__(self, org: SalesforceSim, host: str = "127.0.0.1", port: int = 0, *, keepalive: float = 270.0,
                 tls: tuple[bytes, bytes] | None = None, headers_at_once: bool = True):
        """`keepalive`: seconds between keepalives on an idle stream (270 s on the real API); `tls`: (private
        key PEM, certificate chain PEM) to serve TLS, as the real endpoint does (`url` is then https://);
        `headers_at_once=False` holds the response headers until the first message, as a gRPC server may."""
        self.headers_at_once = headers_at_once
        self.org = org
        self.tls = tls
        self.host, self.port = host, port
        self.keepalive = keepalive
        self.topics: dict[str, _Topic] = {}
        for name, schema in (("/event/Order__e", ORDER_SCHEMA), ("/data/AccountChangeEvent", ACCOUNT_CHANGE_SCHEMA)):
            self.add_topic(name, schema)
        self._replay = itertools.count(1)
        self.purged_upto = 0
        self.streams: list[StreamStats] = []
        self.schema_requests = 0
        self.refused: list[tuple[str, str]] = []  # (status code, error-code) of every error answered
        self._silent = False
        self._drops = 0  # drop_streams() calls: a stream older than the last one ends
        self._server: grpc.aio.Server | None = None

    # ------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    async def start(self) -> SalesforcePubsubSim:
        self._server = grpc.aio.server()
        pb_grpc.add_PubSubServicer_to_server(self, self._server)
        address = f"{self.host}:{self.port}"
        self.port = (self._server.add_secure_port(address, grpc.ssl_server_credentials([self.tls])) if self.tls
                     else self._server.add_insecure_port(address))
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0)
            self._server = None

    async def __aenter__(self) -> SalesforcePubsubSim:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # ------------------------------------------------------------ the org's event bus

    def add_topic(self, name: str, schema: dict[str, Any]) -> _Topic:
        topic = _Topic(name, schema, secrets.token_urlsafe(16)[:22], fastavro.parse_schema(schema))
        self.topics[name] = topic
        return topic

    def publish(self, topic_name: str, record: dict[str, Any]) -> int:
        """Encode `record` with the topic's schema (missing fields get their defaults) and append it."""
        topic = self.topics[topic_name]
        full = {f["name"]: record.get(f["name"], f.get("default")) for f in topic.schema["fields"]}
        if topic.schema is ORDER_SCHEMA:
            full["CreatedDate"] = record.get("CreatedDate", int(time.time() * 1000))
            full["CreatedById"] = record.get("CreatedById", "0055g000000SimAAA")
        buffer = io.BytesIO()
        fastavro.schemaless_writer(buffer, topic.parsed, full)
        return self._append(topic, buffer.getvalue())

    def publish_change(self, entity: str, change_type: str, values: dict[str, Any], *, record_id: str = "",
                       changed: list[str] | None = None, nulled: list[str] | None = None) -> int:
        """A Change Data Capture event on `/data/<entity>ChangeEvent`, its bitmaps built from field names."""
        topic = self.topics[f"/data/{entity}ChangeEvent"]
        header = {"entityName": entity, "recordIds": [record_id or "0015g00000SimAAA"], "changeType": change_type,
                  "changeOrigin": "com/salesforce/api/rest/58.0", "transactionKey": secrets.token_hex(16),
                  "sequenceNumber": 1, "commitTimestamp": int(time.time() * 1000),
                  "commitNumber": next(self._replay) * 1000, "commitUser": "0055g000000SimAAA",
                  "nulledFields": bitmap_of(topic.schema, nulled or []), "diffFields": [],
                  "changedFields": bitmap_of(topic.schema, changed or [])}
        return self.publish(topic.name, {**values, "ChangeEventHeader": header})

    async def send_raw(self, topic_name: str, payload: bytes) -> int:
        """An event whose payload is exactly these bytes (e.g. ones its schema cannot decode)."""
        return self._append(self.topics[topic_name], payload)

    def _append(self, topic: _Topic, payload: bytes) -> int:
        replay = next(self._replay)
        event = pb.ConsumerEvent(event=pb.ProducerEvent(id=secrets.token_hex(8), schema_id=topic.schema_id,
                                                        payload=payload), replay_id=replay_bytes(replay))
        topic.events.append((replay, event))
        topic.wake.set()
        return replay

    def purge(self, upto: int) -> None:
        """Events up to and including `upto` leave the retention window (72 h on the real bus)."""
        self.purged_upto = max(self.purged_upto, upto)
        for topic in self.topics.values():
            topic.events = [(r, e) for r, e in topic.events if r > upto]

    def silence(self, on: bool = True) -> None:
        """Send nothing at all, keepalives included (a stream that hangs)."""
        self._silent = on
        for topic in self.topics.values():
            topic.wake.set()

    def drop_streams(self) -> None:
        """End every live Subscribe stream with UNAVAILABLE (a server-side reset); new ones are served."""
        self._drops += 1
        for topic in self.topics.values():
            topic.wake.set()

    # ------------------------------------------------------------ RPCs

    def _refuse(self, code: grpc.StatusCode, error_code: str, message: str) -> NoReturn:
        self.refused.append((code.name, error_code))
        raise Refused(code, error_code, message)

    def _authenticate(self, context: grpc.aio.ServicerContext) -> dict[str, str]:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        if not (self.org.valid_token(metadata.get("accesstoken", ""))
                and metadata.get("instanceurl", "").rstrip("/") == self.org.url
                and metadata.get("tenantid") == self.org.org_id):
            self._refuse(grpc.StatusCode.UNAUTHENTICATED, AUTH_ERROR,
                         "An authentication exception occurred. Provide valid authentication via metadata headers.")
        return metadata

    async def GetSchema(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802 - the RPC's name
        try:
            self._authenticate(context)
            self.schema_requests += 1
            for topic in self.topics.values():
                if topic.schema_id == request.schema_id:
                    return pb.SchemaInfo(schema_json=orjson.dumps(topic.schema).decode(), schema_id=topic.schema_id,
                                         rpc_id=secrets.token_hex(8))
            self._refuse(grpc.StatusCode.NOT_FOUND, "sfdc.platform.eventbus.grpc.schema.not.found",
                         f"Schema {request.schema_id} not found.")
        except Refused as refused:
            await refused.abort(context)

    async def GetTopic(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        try:
            self._authenticate(context)
            topic = self.topics.get(request.topic_name)
            if topic is None:
                self._refuse(grpc.StatusCode.NOT_FOUND, TOPIC_ERROR,
                             f"The topic {request.topic_name} does not exist or you lack access.")
            return pb.TopicInfo(topic_name=topic.name, tenant_guid=self.org.org_id, can_publish=True,
                                can_subscribe=True, schema_id=topic.schema_id, rpc_id=secrets.token_hex(8))
        except Refused as refused:
            await refused.abort(context)

    async def Subscribe(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
        """The stream, ended by a refusal as a status with trailers (set, then return: no abort inside a generator)."""
        try:
            async for response in self._subscribe(request_iterator, context):
                yield response
        except Refused as refused:
            refused.end(context)

    async def _subscribe(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        # The first FetchRequest is read before anything is refused: a stream ended before the client's first
        # message is taken makes grpc's client report INTERNAL ("Internal error from Core") now and then.
        first = await anext(aiter(request_iterator), None)
        stats = StreamStats(metadata=self._authenticate(context))
        self.streams.append(stats)
        if first is None:
            return
        topic = self.topics.get(first.topic_name)
        if topic is None:
            self._refuse(grpc.StatusCode.NOT_FOUND, TOPIC_ERROR,
                         f"The topic {first.topic_name} does not exist or you lack access.")
        assert topic is not None
        stats.topic = topic.name
        position = await self._start(context, topic, first)  # the last replay id already sent (or skipped)
        if self.headers_at_once:
            await context.send_initial_metadata((("rpc-id", secrets.token_hex(8)),))  # accepted: headers now
        stats.requested = owed = max(0, first.num_requested)
        stats.most_owed = owed
        problems: list[str] = []

        async def more_requests() -> None:
            nonlocal owed
            async for request in request_iterator:
                if request.topic_name and request.topic_name != topic.name:
                    problems.append(request.topic_name)
                else:
                    owed += max(0, request.num_requested)
                    stats.requested += max(0, request.num_requested)
                    stats.most_owed = max(stats.most_owed, owed)
                topic.wake.set()

        reader = asyncio.create_task(more_requests())
        generation = self._drops
        last_sent = time.monotonic()
        try:
            while True:
                if problems:
                    self._refuse(grpc.StatusCode.INVALID_ARGUMENT,
                                 "sfdc.platform.eventbus.grpc.subscription.fetch.topic.mismatch",
                                 f"A FetchRequest named topic {problems[0]} on a stream of {topic.name}.")
                if self._drops != generation:
                    raise Refused(grpc.StatusCode.UNAVAILABLE, "", "RST_STREAM closed stream")
                start = bisect.bisect_right(topic.events, position, key=lambda item: item[0])  # in replay order
                pending = [e for _, e in topic.events[start:start + min(owed, MAX_PER_RESPONSE)]]
                now = time.monotonic()
                if not self._silent and pending:
                    owed -= len(pending)
                    position = int.from_bytes(pending[-1].replay_id, "big")
                    stats.sent += len(pending)
                    stats.responses += 1
                    last_sent = now
                    yield pb.FetchResponse(events=pending, latest_replay_id=self._latest(topic),
                                           rpc_id=secrets.token_hex(8), pending_num_requested=owed)
                    continue
                if not self._silent and now - last_sent >= self.keepalive:
                    stats.keepalives += 1
                    last_sent = now
                    yield pb.FetchResponse(latest_replay_id=self._latest(topic), rpc_id=secrets.token_hex(8),
                                           pending_num_requested=owed)
                    continue
                topic.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.01, self.keepalive - (now - last_sent))):
                        await topic.wake.wait()
        finally:
            reader.cancel()

    async def _start(self, context: grpc.aio.ServicerContext, topic: _Topic, first: Any) -> int:
        if first.replay_preset == pb.LATEST:
            return topic.events[-1][0] if topic.events else self._newest()
        if first.replay_preset == pb.EARLIEST:
            return 0
        replay = int.from_bytes(first.replay_id, "big") if len(first.replay_id) == 8 else -1
        if replay < self.purged_upto or replay > self._newest() or replay < 0:
            self._refuse(grpc.StatusCode.INVALID_ARGUMENT, REPLAY_ERROR,
                         "The Replay ID validation failed. Ensure that the Replay ID is valid.")
        return replay

    def _newest(self) -> int:
        return max((t.events[-1][0] for t in self.topics.values() if t.events), default=self.purged_upto)

    def _latest(self, topic: _Topic) -> bytes:
        return replay_bytes(topic.events[-1][0] if topic.events else self.purged_upto)


# ---------------------------------------------------------------- standalone


async def _serve(args: Any) -> None:
    org = SalesforceSim(args.host, args.login_port, users={args.username: args.password},
                        clients={args.consumer_key: args.consumer_secret})
    async with org, SalesforcePubsubSim(org, args.host, args.port) as sim:
        print(f"Salesforce simulator at {org.url} (login-url), Pub/Sub API at {sim.url} (pubsub-url)", flush=True)
        for n in itertools.count(1):
            await asyncio.sleep(1 / args.rate if args.rate > 0 else 3600)
            if args.rate > 0:
                sim.publish("/event/Order__e", {"OrderNumber__c": f"O-{n:05d}", "Amount__c": 10.0 * n,
                                                "Status__c": "Placed"})


def main(argv: list[str] | None = None) -> None:
    """`python -m listenerd.sim.salesforce_pubsub --rate 1`: an org (login) and its Pub/Sub API publishing orders."""
    import argparse

    parser = argparse.ArgumentParser(description="Salesforce Pub/Sub API simulator (gRPC, Avro, replay)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--login-port", type=int, default=0)
    parser.add_argument("--username", default="user@example.com")
    parser.add_argument("--password", default="passwordTOKEN", help="password + security token")
    parser.add_argument("--consumer-key", default="consumer-key")
    parser.add_argument("--consumer-secret", default="consumer-secret")
    parser.add_argument("--rate", type=float, default=1.0, help="demo Order__e events per second (0: none)")
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
