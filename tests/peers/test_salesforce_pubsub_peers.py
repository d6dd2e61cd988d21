"""The Pub/Sub API simulator checked by a client written by others (aiosfpubsub), in its own process.

aiosfpubsub compiles Salesforce's own `pubsub_api.proto` and decodes with Apache Avro (not fastavro):
if the simulator's wire messages, its Avro payloads, its flow control, its replay or its errors and
trailers differed from the published API, this client would see it. It runs in a subprocess because its
stubs and ours register the same `eventbus.v1` symbols (protobuf refuses duplicates in one process).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import aiohttp
import pytest

from listenerd.sim.salesforce import SalesforceSim
from listenerd.sim.salesforce_pubsub import SalesforcePubsubSim

CLIENT = Path(__file__).parent / "aiosfpubsub_client.py"
if importlib.util.find_spec("aiosfpubsub") is None:  # found, never imported here (see the docstring)
    pytest.fail("aiosfpubsub (test extra) is the independent client: pip install -e '.[test]'")


async def token_from(org: SalesforceSim) -> dict:
    form = {"grant_type": "password", "client_id": "ck", "client_secret": "cs", "username": "u@example.com",
            "password": "pwTOKEN"}
    async with aiohttp.ClientSession() as http, http.post(org.token_url, data=form) as response:
        return await response.json()


async def test_aiosfpubsub_subscribes_replays_decodes_and_is_refused_as_documented():
    async with SalesforceSim(users={"u@example.com": "pwTOKEN"}, clients={"ck": "cs"}) as org, \
            SalesforcePubsubSim(org, keepalive=30) as bus:
        ids = [bus.publish("/event/Order__e", {"OrderNumber__c": f"O-{i}", "Amount__c": 1.5 * i}) for i in range(3)]
        bus.publish_change("Account", "UPDATE", {"Name": "Acme"}, changed=["Name", "BillingAddress.City"])
        answer = await token_from(org)
        target = bus.url.removeprefix("http://")
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(CLIENT), target, answer["access_token"], answer["instance_url"], org.org_id,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode == 0, err.decode()[-2000:]
        seen = json.loads(out)

    assert seen["topic"] == {"schema_id": bus.topics["/event/Order__e"].schema_id, "can_subscribe": True}
    earliest = seen["earliest"]
    assert [e["record"]["OrderNumber__c"] for e in earliest["events"]] == ["O-0", "O-1", "O-2"]
    assert earliest["events"][1]["record"]["Amount__c"] == 1.5
    assert earliest["over_sent"] is False and earliest["asked"] == 7  # 2 first; the 3rd only after 5 more
    assert [int(e["replay"], 16) for e in earliest["events"]] == ids
    assert all(len(e["replay"]) == 16 for e in earliest["events"])  # 8-byte replay ids
    assert [e["record"]["OrderNumber__c"] for e in seen["custom"]["events"]] == ["O-1", "O-2"]  # after the 1st
    assert seen["latest"]["events"] == []  # LATEST: only what comes after subscribing
    header = seen["cdc"]["events"][0]["record"]["ChangeEventHeader"]
    assert header["entityName"] == "Account" and header["changeType"] == "UPDATE"
    assert header["changedFields"] == ["0x2", "4-0x2"]  # Name is field 1; City is field 1 of BillingAddress (4)
    refused = {case: seen[case]["refused"] for case in ("bad_token", "unknown_topic", "bad_replay")}
    details = {case: answer.pop("details") for case, answer in refused.items()}
    assert refused["bad_token"] == {"code": "UNAUTHENTICATED", "rpc-id": True,
                                    "error-code": "sfdc.platform.eventbus.grpc.service.auth.error"}, details
    assert details["bad_token"].startswith("An authentication exception occurred.")
    assert refused["unknown_topic"]["code"] == "NOT_FOUND" and "/event/Nope__e" in details["unknown_topic"]
    assert refused["bad_replay"] == {"code": "INVALID_ARGUMENT", "rpc-id": True, "error-code":
                                     "sfdc.platform.eventbus.grpc.subscription.fetch.replayid.corrupted"}, details
    assert all("rpcId: " in words for words in details.values())  # as the API appends it
