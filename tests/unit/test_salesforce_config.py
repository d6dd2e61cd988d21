"""Salesforce config: each login flow's required fields named with their location, the JWT key checked
(parses, RSA, 2048 bits, unencrypted) naming the field and never quoting it, channel kinds by topic,
`private-key-file`, secrets registered and masked, and the `$` metadata of each channel kind."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from listenerd import config
from listenerd.cli import main
from listenerd.model import SECRET_MASK, SalesforceIntegration
from listenerd.sim.salesforce import throwaway_certificate
from listenerd.sources.salesforce import event_key, event_of

KEY_PEM, CERT_PEM = throwaway_certificate("unit")
WHERE = "tenants[0].integrations.salesforce"


def cfg(fields: str, topic: str = "Invoices", extra_options: str = "") -> str:
    return f"""
[[tenants]]
id = "t1"

[tenants.integrations.salesforce]
consumer-key = "ck"
{fields}

[[tenants.listeners]]
id = "L1"
type = "salesforce"
options = {{ topic = "{topic}" {extra_options} }}
"""


def problems(text: str) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(text, {})
    return [str(p) for p in caught.value.problems]


def pem(key, encryption=None) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             encryption or serialization.NoEncryption()).decode()


@pytest.mark.parametrize("auth, fields, missing", [
    ("password", 'consumer-secret = "cs"\nusername = "u"', ["password"]),
    ("password", "", ["consumer-secret"]),  # the first missing one, named
    ("jwt", 'username = "u"', ["private-key"]),
    ("jwt", f'private-key = """{KEY_PEM}"""', ["username"]),
    ("client-credentials", 'username = "u"', ["consumer-secret"]),
])
def test_each_flow_names_its_missing_field(auth, fields, missing):
    text = cfg(f'auth = "{auth}"\n{fields}' if auth != "password" else fields)
    assert problems(text) == [f'{WHERE}.{missing[0]}: required when auth is "{auth}"']


def test_each_flow_validates_with_its_fields():
    password = config.parse(cfg('consumer-secret = "cs"\nusername = "u"\npassword = "p"'), {})
    assert password.tenants[0].integrations.salesforce.auth == "password"
    jwt = config.parse(cfg(f'auth = "jwt"\nusername = "u"\nprivate-key = """{KEY_PEM}"""'), {})
    assert jwt.tenants[0].integrations.salesforce.private_key.startswith("-----BEGIN PRIVATE KEY-----")
    client = config.parse(cfg('auth = "client-credentials"\nconsumer-secret = "cs"\n'
                              'login-url = "https://acme.my.salesforce.com"'), {})
    assert client.tenants[0].integrations.salesforce.consumer_secret == "cs"
    assert problems(cfg('auth = "oauth"\nconsumer-secret = "cs"'))[0].startswith(f"{WHERE}.auth: Input should be")


def test_private_key_file_and_secrets(tmp_path):
    (tmp_path / "app.key").write_text(KEY_PEM)
    path = tmp_path / "l.toml"
    path.write_text(cfg('auth = "jwt"\nusername = "u"\nprivate-key-file = "app.key"'))
    loaded = config.load(path, {})
    creds = loaded.tenants[0].integrations.salesforce
    assert creds.private_key == KEY_PEM.strip()
    assert KEY_PEM.strip() in loaded.secret_values()
    assert creds.redacted()["private-key"] == SECRET_MASK
    path.write_text(cfg('auth = "jwt"\nusername = "u"\nprivate-key-file = "missing.key"'))
    with pytest.raises(config.ConfigError) as caught:
        config.load(path, {})
    (only,) = caught.value.problems  # the stand-in value is not reported as a bad key besides
    assert str(only).startswith(f"{WHERE}.private-key-file: cannot read secret file")


@pytest.mark.parametrize("key, words", [
    ("not a key at all", "must be a PEM private key"),
    ("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----", "is not a readable PEM private key"),
    (pem(ec.generate_private_key(ec.SECP256R1())), "must be an RSA key"),
    (pem(rsa.generate_private_key(65537, 1024)), "the RSA key has 1024 bits"),
    (pem(rsa.generate_private_key(65537, 2048), serialization.BestAvailableEncryption(b"pw")), "is encrypted"),
    (CERT_PEM, "is not a readable PEM private key"),  # the certificate given where the key belongs
])
def test_private_key_is_checked_naming_the_field_without_quoting_it(key, words, tmp_path, capsys):
    text = cfg(f'auth = "jwt"\nusername = "u"\nprivate-key = """{key}"""')
    (found,) = problems(text)
    assert found.startswith(f"{WHERE}.private-key: ") and words in found
    body = key.strip().splitlines()[1] if "\n" in key.strip() else key
    assert body not in found
    path = tmp_path / "l.toml"
    path.write_text(text)
    assert main(["check", "--config", str(path)]) == 2
    out = capsys.readouterr()
    assert "private-key" in out.err + out.out and body not in out.err + out.out


@pytest.mark.parametrize("topic", ["Invoices", "/topic/Invoices", "/topic/Invoices?Status__c=Open&Type=A",
                                   "/event/Order__e", "/data/ChangeEvents", "/data/AccountChangeEvent",
                                   "/data/Employee__ChangeEvent", "/data/Sales__chn", "/u/Notes"])
def test_channel_kinds_accepted(topic):
    parsed = config.parse(cfg('consumer-secret = "cs"\nusername = "u"\npassword = "p"', topic), {})
    expected = topic if topic.startswith("/") else f"/topic/{topic}"
    assert parsed.tenants[0].listeners[0].options.topic == expected


@pytest.mark.parametrize("topic, words", [
    ("/event/Order", "expected /event/Name__e"),
    ("/data/Account", "expected /data/ChangeEvents"),
    ("/topic/Invoices?Status", "expected /topic/Name or /topic/Name?Field=value"),
    ("/chatter/x", "must be /topic/Name"),
    ("/u/", "expected /u/Name"),
])
def test_bad_channels_named(topic, words):
    (found,) = problems(cfg('consumer-secret = "cs"\nusername = "u"\npassword = "p"', topic))
    assert found.startswith("tenants[0].listeners[0].options.topic: ") and words in found


def test_query_only_for_pushtopics():
    (found,) = problems(cfg('consumer-secret = "cs"\nusername = "u"\npassword = "p"', "/event/Order__e",
                            ', query = "SELECT Id FROM Order__c"'))
    assert found.startswith("tenants[0].listeners[0].options.query: only a PushTopic")


def test_secret_values_of_each_flow():
    jwt = SalesforceIntegration.model_validate({"auth": "jwt", "consumer-key": "ck", "username": "u",
                                                "private-key": KEY_PEM})
    assert jwt.secret_values()[0] == KEY_PEM
    assert set(jwt.secret_values()[1:]) == {line for line in KEY_PEM.splitlines() if not line.startswith("-----")}
    client = SalesforceIntegration.model_validate({"auth": "client-credentials", "consumer-key": "ck",
                                                   "consumer-secret": "cs-1"})
    assert client.secret_values() == ["cs-1"] and client.redacted()["consumer-secret"] == SECRET_MASK


def test_metadata_of_each_channel_kind():
    pushtopic = {"event": {"type": "created", "replayId": 3, "createdDate": "2026-01-01T00:00:00.000Z"},
                 "sobject": {"Id": "a1"}}
    assert event_of("/topic/X?A=b", pushtopic) == ({"Id": "a1"}, {"$event": pushtopic["event"],
                                                                   "$channel": "/topic/X?A=b"})
    platform = {"schema": "s", "payload": {"A__c": 1}, "event": {"replayId": 4, "EventUuid": "u"}}
    assert event_of("/event/E__e", platform) == ({"A__c": 1}, {"$event": platform["event"], "$channel": "/event/E__e"})
    header = {"changeType": "UPDATE", "recordIds": ["001"], "entityName": "Account"}
    cdc = {"schema": "s", "payload": {"ChangeEventHeader": header, "Name": "n"}, "event": {"replayId": 5}}
    payload, meta = event_of("/data/ChangeEvents", cdc)
    assert payload["Name"] == "n" and meta["$header"] is header and meta["$event"] == {"replayId": 5}
    generic = {"event": {"replayId": 6, "createdDate": "x"}, "payload": '{"k": 1}'}
    assert event_of("/u/N", generic)[0] == {"k": 1}
    assert event_of("/u/N", {**generic, "payload": "words"})[0] == "words"
    # each kind without its parts is not an event (counted malformed by the source)
    assert event_of("/topic/X", {"event": {"replayId": 1}}) is None
    assert event_of("/event/E__e", {"event": {"replayId": 1}}) is None
    assert event_of("/data/ChangeEvents", {"event": {"replayId": 1}, "payload": {"Name": "no header"}}) is None
    assert event_of("/event/E__e", {"payload": {}}) is None
    assert event_of("channel-of-no-kind", platform) is None  # a wire message of no known kind: not mapped so
    # ids: PushTopics keep their form (filtered or not), the other kinds carry their channel
    assert event_key("00D", "/topic/X?A=b", "7") == event_key("00D", "/topic/X", "7") == "00D/X/7"
    assert event_key("00D", "/data/ChangeEvents", "7") == "00D/data/ChangeEvents/7"


def test_pushtopic_differences_name_the_fields_to_update():
    from listenerd.model import SalesforceOptions
    from listenerd.sources.salesforce_auth import topic_differences, topic_fields, topic_name

    options = SalesforceOptions(topic="/topic/Inv?Status__c=Open", query="SELECT Id, Name FROM Inv__c")
    assert topic_name(options.topic) == "Inv"
    wanted = topic_fields(options)
    same = {**wanted, "Query": "SELECT  Id,\n Name FROM Inv__c ", "ApiVersion": 58}
    assert topic_differences(same, wanted) == []
    stale = {**wanted, "Query": "SELECT Id FROM Inv__c", "ApiVersion": "45.0", "NotifyForOperationDelete": False}
    assert topic_differences(stale, wanted) == ["Query", "ApiVersion", "NotifyForOperationDelete"]
    assert topic_differences({}, wanted) == list(wanted)


def test_redactor_hides_the_whole_key_and_any_line_of_it():
    from listenerd.observability import REDACTED, SecretRedactor

    creds = SalesforceIntegration.model_validate({"auth": "jwt", "consumer-key": "ck", "username": "u",
                                                  "private-key": KEY_PEM})
    redactor = SecretRedactor()
    redactor.register(*creds.secret_values())
    line = KEY_PEM.splitlines()[3]
    out = redactor(None, "info", {"event": "x", "error": f"bad key {KEY_PEM}", "detail": {"chunk": f"..{line}.."}})
    assert REDACTED in out["error"] and line not in repr(out)
    body = [text for text in KEY_PEM.splitlines() if not text.startswith("-----")]
    assert not [text for text in body if text in out["error"]]  # only the BEGIN/END markers may remain
