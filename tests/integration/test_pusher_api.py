"""Pusher's own rules at the API: channel names as Pusher validates them (400 naming `options.channel`),
and the integration's `encryption-master-key`: checked, kept secret, masked."""

import base64

import pytest

from listenerd.model import SECRET_MASK
from listenerd.sim.engine import EngineSim
from tests.daemon import base_config, running_daemon

TENANT = """
[[tenants]]
id = "t1"
"""


@pytest.fixture
async def api(tmp_path):
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as (_, api):
        yield api


@pytest.mark.parametrize(("channel", "problem"), [
    ("a" * 165, "at most 164 characters"),
    ("orders room", "only letters, digits and _ - = @ , . ;"),
    ("orders/1", "only letters, digits and _ - = @ , . ;"),
    ("", "required"),
])
async def test_a_channel_pusher_would_refuse_is_a_400_naming_the_field(api, channel, problem):
    body = {"type": "pusher", "options": {"channel": channel}}
    code, body = await api.call("POST", "/1.0/tenants/t1/listeners", body)
    assert code == 400 and body["error"].startswith("options.channel: ") and problem in body["error"]


async def test_encryption_master_key_is_checked_and_masked(api):
    code, body = await api.call("POST", "/1.0/tenants/t1/integrations/pusher",
                                {"key": "k", "secret": "pusher-secret-1", "encryption-master-key": "bm90LTMyLWJ5dGVz"})
    assert code == 400 and body["error"].startswith("encryption-master-key: must be base64 of 32 bytes")
    master = base64.b64encode(b"m" * 32).decode()
    code, body = await api.call("POST", "/1.0/tenants/t1/integrations/pusher",
                                {"key": "k", "secret": "pusher-secret-1", "encryption-master-key": master})
    assert code == 200 and body["encryption-master-key"] == SECRET_MASK and master not in str(body)
