"""The Salesforce source's pure helpers: replay start, org id, secret scrubbing, URL rebasing for REST."""

import pytest

from listenerd.model import SalesforceOptions
from listenerd.sources.salesforce import start_replay
from listenerd.sources.salesforce_auth import RebasedSession, org_id_of, scrub
from tests.harness import integration


@pytest.mark.parametrize("replay,stored,attempts,expected", [
    ("resume", None, 0, -1),       # nothing stored: new events only
    ("resume", "42", 0, 42),       # after the last durable event
    ("resume", "-2", 0, -2),       # an operator set -2 through the API
    ("resume", "junk", 0, -1),
    ("new", "42", 0, -1),          # each launch starts at new events ...
    ("new", "42", 3, 42),          # ... but a retry within the launch never skips events
    ("new", None, 3, -1),
    ("all", "42", 0, -2),
    ("all", "42", 1, 42),
    ("all", None, 2, -2),
])
def test_start_replay(replay, stored, attempts, expected):
    options = SalesforceOptions(topic="X", replay=replay)
    assert start_replay(options, stored, attempts) == expected


@pytest.mark.parametrize("replay", ["new", "all"])
def test_a_checkpoint_set_through_the_api_is_honoured(replay):
    options = SalesforceOptions(topic="X", replay=replay)
    assert start_replay(options, "42", 0) == (-1 if replay == "new" else -2)  # ours: the option
    assert start_replay(options, "7", 0, replay_from="7") == 7  # set through the API: "restarts from there"
    assert start_replay(options, "-2", 0, replay_from="-2") == -2
    assert start_replay(options, "9", 2, replay_from="7") == 7  # the API's point wins for the run it is given to


def test_org_id_from_the_identity_url_else_the_token():
    assert org_id_of({"id": "https://login.salesforce.com/id/00D5g0000000001AAA/0055g0000000001AAA"}) == (
        "00D5g0000000001AAA")
    assert org_id_of({"id": "", "access_token": "00DXX!AQ0Abc"}) == "00DXX"
    assert org_id_of({}) == "org"


def test_scrub_removes_every_secret_and_the_joined_password():
    creds = integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "the-consumer-secret",
                                         "username": "u", "password": "hunter22", "secret-token": "TOK123"})
    text = scrub("echo: hunter22TOK123 / the-consumer-secret / TOK123", creds)
    assert "hunter22" not in text and "TOK123" not in text and "the-consumer-secret" not in text


def test_rebased_session_keeps_scheme_host_and_port_as_configured():
    sent = []

    class Capture(RebasedSession):
        def send(self, request, **kwargs):  # the last step before the network
            sent.append((request.url, kwargs.get("verify"), kwargs.get("timeout")))
            raise RuntimeError("captured")

    http = Capture("http://localhost:8123", "/ca.pem", 7.0)
    with pytest.raises(RuntimeError):
        http.request("GET", "https://localhost:8123/services/data/v58.0/query/?q=x")
    with pytest.raises(RuntimeError):
        http.request("GET", "https://elsewhere.example.com/x")
    assert sent[0] == ("http://localhost:8123/services/data/v58.0/query/?q=x", "/ca.pem", 7.0)
    assert sent[1][0] == "https://elsewhere.example.com/x"  # only the instance is rebased
