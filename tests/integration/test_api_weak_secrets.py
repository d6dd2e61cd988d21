"""Issue 17 finding 3, through the HTTP API: a secret too short or too common to be one (which, registered
with the redactor, would erase words such as `error` or a tenant id from every log line) is refused with a
400 naming the field, and nothing is stored or registered."""

import pytest

from listenerd.observability import redactor
from listenerd.sim.engine import EngineSim
from tests.daemon import base_config, running_daemon

TENANT = """
[[tenants]]
id = "acme"
"""
GOOD = {
    "salesforce": {"consumer-key": "ck", "consumer-secret": "cs-secret-value", "username": "user@example.com",
                   "password": "password-value"},
    "pusher": {"key": "app-key", "secret": "app-secret-value"},
    "datasift": {"username": "u", "api-key": "datasift-key-1"},
}


@pytest.fixture
async def api(tmp_path):
    async with EngineSim() as engine, running_daemon(tmp_path, base_config(tmp_path, engine.url, TENANT)) as (_, api):
        yield api


@pytest.mark.parametrize(("kind", "field", "value"), [
    ("salesforce", "consumer-secret", "error"),  # the review's poison: a log level
    ("salesforce", "password", "listener"),  # a structural field's name
    ("salesforce", "secret-token", "acme"),  # the tenant's own id
    ("pusher", "secret", "password"),  # a common password
    ("pusher", "secret", "aaaaaaaaaaaa"),  # repetitive
    ("pusher", "secret", "[REDACTED]"),  # the redactor's own mark
    ("datasift", "api-key", "12345678"),
])
async def test_a_weak_secret_is_a_400_naming_the_field_and_nothing_is_stored(api, kind, field, value):
    code, body = await api.call("POST", f"/1.0/tenants/acme/integrations/{kind}", {**GOOD[kind], field: value})
    assert code == 400, body
    assert body["fields"] == [field] and body["error"].startswith(f"{field}: ") and "secret" in body["error"]
    assert value not in body["error"]
    assert (await api.call("GET", f"/1.0/tenants/acme/integrations/{kind}"))[0] == 404
    assert redactor.scrub(f"level {value} here") == f"level {value} here"  # not registered: the logs keep it


async def test_a_weak_secret_does_not_replace_the_stored_integration(api):
    code, body = await api.call("POST", "/1.0/tenants/acme/integrations/pusher", GOOD["pusher"])
    assert code == 200, body
    code, body = await api.call("POST", "/1.0/tenants/acme/integrations/pusher", {"key": "new-key", "secret": "error"})
    assert code == 400 and body["fields"] == ["secret"], body
    code, body = await api.call("GET", "/1.0/tenants/acme/integrations/pusher")
    assert code == 200 and body["key"] == "app-key", body
