"""Issue 17 finding 8: what the store file gives away. It is 0600 in a 0700 directory; config-file secrets
are not in it at all; API-set secrets are sealed, and a rotation re-seals them with the new key."""

import base64
import json
import os
import sqlite3
import stat

from listenerd.sim.engine import EngineSim
from tests.daemon import base_config, running_daemon

CONFIG_SECRET = "config-file-pusher-secret-0001"
API_SECRET = "api-made-datasift-key-0002"
TENANT = f"""
[[tenants]]
id = "t1"
[tenants.integrations.pusher]
key = "app-key"
secret = "{CONFIG_SECRET}"
"""


def stored_bytes(directory):
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.name.startswith("listenerd.db"))


async def test_the_store_file_holds_no_secret_in_plain_text(tmp_path):
    store_dir = tmp_path / "state"
    async with EngineSim() as engine:
        text = base_config(store_dir, engine.url, TENANT).replace("[store]", "[store]\ncreate-directory = true")
        async with running_daemon(tmp_path, text) as (_, api):
            code, body = await api.call("POST", "/1.0/tenants/other/integrations/datasift",
                                        {"username": "u", "api-key": API_SECRET})
            assert code == 200, body
            code, body = await api.call("GET", "/1.0/tenants/t1/integrations/pusher")
            assert code == 200 and body["managed-by"] == "config"
        assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE((store_dir / "listenerd.db").stat().st_mode) == 0o600
        assert stat.S_IMODE((store_dir / "secrets.key").stat().st_mode) == 0o600
        data = stored_bytes(store_dir)
        assert CONFIG_SECRET.encode() not in data and API_SECRET.encode() not in data
        assert b"sealed:v1:" in data

        # rotation: the new key seals, the old one still opens; after the restart the old key is not needed
        new_key = tmp_path / "new.key"
        new_key.write_bytes(base64.b64encode(os.urandom(32)))
        rotated = text.replace("[store]", f'[store]\nsecrets-key-file = "{new_key}"\n'
                                          f'secrets-old-key-files = ["{store_dir / "secrets.key"}"]')
        async with running_daemon(tmp_path, rotated) as (_, api):
            assert (await api.call("GET", "/1.0/tenants/other/integrations/datasift"))[0] == 200
        (store_dir / "secrets.key").unlink()
        only_new = text.replace("[store]", f'[store]\nsecrets-key-file = "{new_key}"')
        async with running_daemon(tmp_path, only_new) as (_, api):
            code, body = await api.call("GET", "/1.0/tenants/other/integrations/datasift")
            assert code == 200 and body["api-key"] == "********"
        assert API_SECRET.encode() not in stored_bytes(store_dir)

        # a key that opens nothing: the daemon runs, the integration counts as absent until it is set again
        wrong_key = tmp_path / "wrong.key"
        wrong_key.write_bytes(base64.b64encode(os.urandom(32)))
        wrong = text.replace("[store]", f'[store]\nsecrets-key-file = "{wrong_key}"')
        async with running_daemon(tmp_path, wrong) as (_, api):
            code, body = await api.call("GET", "/1.0/tenants/other/integrations/datasift")
            assert code == 404 and "set it again" in body["error"]
            code, _ = await api.call("POST", "/1.0/tenants/other/integrations/datasift",
                                     {"username": "u", "api-key": API_SECRET})
            assert code == 200


async def test_plain_secrets_an_older_version_stored_are_sealed_or_dropped(tmp_path):
    async with EngineSim() as engine:
        text = base_config(tmp_path, engine.url, TENANT)
        async with running_daemon(tmp_path, text):
            pass
        with sqlite3.connect(tmp_path / "listenerd.db") as db:  # what listenerd wrote before sealing
            db.execute("UPDATE integrations SET fields = ? WHERE tenant_id = 't1'",
                       (json.dumps({"key": "app-key", "secret": CONFIG_SECRET}),))
            db.execute("INSERT INTO integrations VALUES ('other', 'datasift', ?, 'api', 0)",
                       (json.dumps({"username": "u", "api-key": API_SECRET}),))
        db.close()
        assert API_SECRET.encode() in stored_bytes(tmp_path)
        async with running_daemon(tmp_path, text) as (_, api):
            assert (await api.call("GET", "/1.0/tenants/other/integrations/datasift"))[0] == 200
        data = stored_bytes(tmp_path)
        assert CONFIG_SECRET.encode() not in data and API_SECRET.encode() not in data


async def test_an_existing_world_readable_store_is_narrowed(tmp_path):
    async with EngineSim() as engine:
        (tmp_path / "listenerd.db").touch(mode=0o644)
        os.chmod(tmp_path / "listenerd.db", 0o644)
        async with running_daemon(tmp_path, base_config(tmp_path, engine.url)):
            assert stat.S_IMODE((tmp_path / "listenerd.db").stat().st_mode) == 0o600
