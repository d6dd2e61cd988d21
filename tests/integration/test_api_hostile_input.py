"""Issue 17 finding 9, the API side: hostile bytes get a JSON 4xx naming what is wrong, never a 500."""

import asyncio

import pytest

from listenerd.net import describe
from listenerd.sim.engine import EngineSim
from tests.daemon import TOKEN, base_config, running_daemon

TENANT = """
[[tenants]]
id = "t1"
[[tenants.listeners]]
id = "SF1"
type = "salesforce"
options = { topic = "Orders" }
status = false
[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "cs-secret-value"
username = "u@example.com"
password = "password-value"
"""


@pytest.fixture
async def api(tmp_path):
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as (_, api):
        yield api


async def raw(api, request: bytes) -> tuple[int, bytes, bytes]:
    host, port = api.base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), head, body


async def test_a_non_ascii_bearer_token_is_401(api):
    code, head, body = await raw(api, b"GET /1.0/tenants/t1/listeners HTTP/1.1\r\nHost: x\r\n"
                                      b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n")
    assert code == 401 and b"application/json" in head and b"missing or invalid bearer token" in body


async def test_aiohttps_own_400_is_json(api):
    code, head, body = await raw(api, b"GET /1.0/tenants/t1/listeners HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
    assert code == 400 and b"application/json" in head and body.startswith(b'{"error": "malformed HTTP request')


@pytest.mark.parametrize("field", ["name", "description"])
async def test_a_lone_surrogate_is_a_400_naming_the_field(api, field):
    body = b'{"type": "pusher", "options": {"channel": "c"}, "%s": "x\\ud800y"}' % field.encode()
    async with api.session.post(api.base_url + "/1.0/tenants/t1/listeners", data=body,
                                headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}) as r:
        assert r.status == 400 and (await r.json())["fields"] == [field]


@pytest.mark.parametrize("replay", [10**29, 2**63, -3])
async def test_a_checkpoint_outside_64_bits_is_a_400(api, replay):
    code, body = await api.call("PUT", "/1.0/tenants/t1/listeners/SF1/checkpoint", {"replay": replay})
    assert code == 400 and body["fields"] == ["replay"]
    code, body = await api.call("PUT", "/1.0/tenants/t1/listeners/SF1/checkpoint", {"replay": 2**63 - 1})
    assert code == 200


def test_status_messages_show_no_object_reprs():
    class Wrapped(OSError):
        def __str__(self):
            return ("Cannot connect to host h:443 ssl:<ssl.SSLContext object at 0x7f2a1c> [refused] "
                    "<Foo object at 0xdead>")
    words = describe(Wrapped())
    assert "0x" not in words and "object at" not in words and "Cannot connect to host h:443" in words
