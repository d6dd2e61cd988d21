"""A Pub/Sub API client made of code written by others, run in its own process by test_salesforce_pubsub_peers.

aiosfpubsub's stubs (compiled from Salesforce's own pubsub_api.proto), its `make_fetch_request` and its
Apache Avro `decode`. Its `Client` logs in with SOAP and opens TLS channels only, so this script drives
its stubs over a plaintext channel with the metadata the test gives (protocol notes, "Peers"); in its own
process because listenerd's stubs register the same `eventbus.v1` symbols.

    python aiosfpubsub_client.py <target host:port> <accesstoken> <instanceurl> <tenantid>
prints one JSON object of what it saw.
"""

import asyncio
import json
import sys

import grpc
from aiosfpubsub import pubsub_api_pb2 as pb2
from aiosfpubsub import pubsub_api_pb2_grpc as pb2_grpc
from aiosfpubsub.client import Client


def client_with(metadata):
    client = Client.__new__(Client)  # no SOAP login, no TLS channel: the parts that work against any server
    client.metadata = metadata
    client.json_schema_dict = {}
    return client


def refusal(exc):
    trailers = dict(exc.trailing_metadata() or ())
    return {"code": exc.code().name, "error-code": trailers.get("error-code"), "rpc-id": bool(trailers.get("rpc-id")),
            "details": exc.details()}


async def subscribe(stub, client, metadata, topic, replay_type, replay_id, asks, want, quiet=0.6):
    """Ask for `asks[0]` events, then each later ask once the previous ones arrived; note what came when."""
    queue = asyncio.Queue()
    for ask in asks[:1]:
        queue.put_nowait(client.make_fetch_request(topic, replay_type, replay_id, ask))

    async def requests():
        while True:
            yield await queue.get()

    call = stub.Subscribe(requests(), metadata=metadata)
    seen, over_sent, pending = [], False, list(asks[1:])
    asked = asks[0]
    schema_cache = {}
    read = asyncio.ensure_future(call.read())  # never cancelled while waiting: that would cancel the call
    try:
        while len(seen) < want:
            done, _ = await asyncio.wait({read}, timeout=quiet)
            if not done:
                if not pending:
                    break
                more = pending.pop(0)
                asked += more
                queue.put_nowait(pb2.FetchRequest(num_requested=more))
                continue
            response = read.result()
            read = asyncio.ensure_future(call.read())
            for event in response.events:
                sid = event.event.schema_id
                if sid not in schema_cache:
                    info = await stub.GetSchema(pb2.SchemaRequest(schema_id=sid), metadata=metadata)
                    schema_cache[sid] = info.schema_json
                record = client.decode(schema_cache[sid], event.event.payload)
                seen.append({"replay": event.replay_id.hex(), "record": record})
            over_sent = over_sent or len(seen) > asked
        return {"events": seen, "over_sent": over_sent, "asked": asked}
    except grpc.aio.AioRpcError as exc:
        return {"refused": refusal(exc), "events": seen}
    finally:
        call.cancel()
        read.cancel()


async def main(target, token, instance_url, tenant_id):
    metadata = (("accesstoken", token), ("instanceurl", instance_url), ("tenantid", tenant_id))
    client = client_with(metadata)
    out = {}
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb2_grpc.PubSubStub(channel)
        topic = await stub.GetTopic(pb2.TopicRequest(topic_name="/event/Order__e"), metadata=metadata)
        out["topic"] = {"schema_id": topic.schema_id, "can_subscribe": topic.can_subscribe}
        # flow control: ask for 2, then 5 more once they came; 3 are published
        out["earliest"] = await subscribe(stub, client, metadata, "/event/Order__e", "EARLIEST", b"", [2, 5], 3)
        first = bytes.fromhex(out["earliest"]["events"][0]["replay"])
        out["custom"] = await subscribe(stub, client, metadata, "/event/Order__e", "CUSTOM", first, [10], 2)
        out["latest"] = await subscribe(stub, client, metadata, "/event/Order__e", "LATEST", b"", [10], 1, 0.3)
        out["cdc"] = await subscribe(stub, client, metadata, "/data/AccountChangeEvent", "EARLIEST", b"", [10], 1)
        bad = (("accesstoken", "00Dxx!not-a-token"),) + metadata[1:]
        out["bad_token"] = await subscribe(stub, client, bad, "/event/Order__e", "LATEST", b"", [1], 1)
        out["unknown_topic"] = await subscribe(stub, client, metadata, "/event/Nope__e", "LATEST", b"", [1], 1)
        out["bad_replay"] = await subscribe(stub, client, metadata, "/event/Order__e", "CUSTOM", b"\x01\x02", [1], 1)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
