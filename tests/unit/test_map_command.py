"""`listenerd map`: a listener's mapping applied to sample payloads of each source, unresolved paths marked."""

import io
import json
from pathlib import Path

from listenerd.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
CONFIG = """
[[tenants]]
id = "tenant1"
[tenants.integrations.datasift]
username = "u"
api-key = "k-1234567"
[tenants.integrations.salesforce]
consumer-key = "ck"
consumer-secret = "cs-1234567"
username = "u@example.com"
password = "pw-1234567"
[tenants.integrations.pusher]
key = "k"
secret = "s-1234567"

[[tenants.listeners]]
id = "LI1"
type = "datasift"
options = { hash = "abc" }
[tenants.listeners.mapping]
username = "interaction.author.username"
sentiment = "salience.content.sentiment"
id = "twitter.user.screen_name"
hash = "$hash"
deleted = "$deleted"
klout = "klout.score"

[[tenants.listeners]]
id = "LI2"
type = "salesforce"
options = { topic = "InvoiceStatementUpdates" }
[tenants.listeners.mapping]
invoice = "Name"
state = "Status__c"
change = "$event.type"
replay = "$event.replayId"
channel = "$channel"
owner = "Owner.Name"

[[tenants.listeners]]
id = "LI4"
type = "salesforce"
options = { topic = "/event/Order_Placed__e" }
mapping = { order = "Order_Number__c", amount = "Amount__c", uuid = "$event.EventUuid", replay = "$event.replayId" }

[[tenants.listeners]]
id = "LI5"
type = "salesforce"
options = { topic = "/data/AccountChangeEvent" }
mapping = { account = "Name", change = "$header.changeType", first = "$header.recordIds.0", replay = "$event.replayId" }

[[tenants.listeners]]
id = "LI3"
type = "pusher"
options = { channel = "orders" }
mapping = { order = "id", state = "state", kind = "$event", channel = "$channel" }
"""


def run_map(tmp_path, capsys, listener, sample=None, stdin=None, monkeypatch=None):
    path = tmp_path / "c.toml"
    path.write_text(CONFIG)
    args = ["map", "--config", str(path), "--listener", listener]
    if sample:
        args.append(str(SAMPLES / sample))
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_datasift_sample_with_an_unresolved_path(tmp_path, capsys):
    code, out, err = run_map(tmp_path, capsys, "tenant1/LI1", "datasift.json")
    assert code == 0
    assert json.loads(out) == {"username": "johndoe", "sentiment": 4, "id": "johndoe",
                               "hash": "4f3af38ad1c31646561bc814c3e69af5", "deleted": False}
    assert err.strip() == "unresolved: klout <- klout.score"


def test_salesforce_sample(tmp_path, capsys):
    code, out, err = run_map(tmp_path, capsys, "tenant1/LI2", "salesforce.json")
    assert code == 0
    assert json.loads(out) == {"invoice": "INV-0001", "state": "Open", "change": "created", "replay": 13,
                               "channel": "/topic/InvoiceStatementUpdates"}
    assert err.strip() == "unresolved: owner <- Owner.Name"


def test_salesforce_platform_event_and_change_event_samples(tmp_path, capsys):
    code, out, err = run_map(tmp_path, capsys, "tenant1/LI4", "salesforce-platform-event.json")
    assert code == 0 and err == ""
    assert json.loads(out) == {"order": "ORD-00042", "amount": 129.5, "replay": 4127,
                               "uuid": "0d9c7d3e-8f3a-4a34-9d9f-4e1c2b6a7f10"}
    code, out, err = run_map(tmp_path, capsys, "tenant1/LI5", "salesforce-cdc.json")
    assert code == 0 and err == ""
    assert json.loads(out) == {"account": "Acme Ltd", "change": "UPDATE", "first": "001D000000AbCdEIAV",
                               "replay": 6012}


def test_pusher_sample_from_stdin_decodes_data_twice(tmp_path, capsys, monkeypatch):
    code, out, err = run_map(tmp_path, capsys, "tenant1/LI3", stdin=(SAMPLES / "pusher.json").read_text(),
                             monkeypatch=monkeypatch)
    assert code == 0 and err == ""
    assert json.loads(out) == {"order": 42, "state": "paid", "kind": "order.updated", "channel": "orders"}


def test_bare_payload_and_errors(tmp_path, capsys, monkeypatch):
    code, out, _ = run_map(tmp_path, capsys, "tenant1/LI2", stdin='{"Name": "INV-9"}', monkeypatch=monkeypatch)
    assert code == 0 and json.loads(out) == {"invoice": "INV-9"}
    code, _, err = run_map(tmp_path, capsys, "tenant1/NOPE", "pusher.json")
    assert code == 2 and "no listener 'tenant1/NOPE'" in err
    code, _, err = run_map(tmp_path, capsys, "tenant1/LI3", stdin="{nope", monkeypatch=monkeypatch)
    assert code == 2 and "not valid JSON" in err
