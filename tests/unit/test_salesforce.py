"""The Salesforce source's pure helpers: replay start, org id, secret scrubbing, URL rebasing for REST."""

import asyncio

import orjson
import pytest

from listenerd.model import SalesforceOptions
from listenerd.sources.salesforce import start_replay
from listenerd.sources.salesforce_auth import org_id_of, rest_words, scrub
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


def test_rest_errors_read_as_salesforce_words_else_the_status():
    answer = [{"errorCode": "INVALID_FIELD", "message": "The query must select the Id field"},
              {"errorCode": "DUPLICATE_VALUE", "message": "duplicate value found"}]
    assert rest_words(400, answer) == ("INVALID_FIELD: The query must select the Id field; "
                                       "DUPLICATE_VALUE: duplicate value found")
    assert rest_words(503, None) == "HTTP 503"
    assert rest_words(500, {"unexpected": "shape"}) == "HTTP 500"


# ---------------------------------------------------------------- the shared login


def sources_settings():
    from listenerd.model import Config

    return Config.model_validate({"store": {"path": "unused.db"}}).sources


def sf_creds():
    return integration("salesforce", **{"consumer-key": "ck", "consumer-secret": "cs", "username": "u",
                                        "password": "p", "login-url": "https://login.example.com"})


@pytest.fixture
def logins(monkeypatch):
    """Replaces the OAuth POST: each call is counted and answers a new token after a pause."""
    from listenerd.sources import salesforce_auth

    calls = []

    async def fake_login(http, integration_, sslctx, timeout, egress=None):
        calls.append(integration_.username)
        await asyncio.sleep(0.01)  # the others arrive while the first login is in flight
        if isinstance(calls_behaviour[0], Exception):
            raise calls_behaviour[0]
        return salesforce_auth.Session(f"00D!token{len(calls)}", "https://na1.example.com", "00D")

    calls_behaviour: list = [None]
    monkeypatch.setattr(salesforce_auth, "login", fake_login)
    return calls, calls_behaviour


async def test_one_login_however_many_ask_at_once(logins):
    from listenerd.sources.salesforce_auth import Login

    calls, _ = logins
    login = Login(sf_creds(), sources_settings())
    sessions = await asyncio.gather(*(login.current() for _ in range(50)))
    assert len(calls) == 1 and len({s.access_token for s in sessions}) == 1
    assert await login.current() is sessions[0] and len(calls) == 1  # cached


async def test_a_stale_session_is_refreshed_once_for_every_listener_that_saw_it(logins):
    from listenerd.sources.salesforce_auth import Login

    calls, _ = logins
    login = Login(sf_creds(), sources_settings())
    stale = await login.current()
    fresh = await asyncio.gather(*(login.refresh(stale) for _ in range(200)))
    assert len(calls) == 2 and {s.access_token for s in fresh} == {"00D!token2"}
    assert await login.refresh(stale) is fresh[0] and len(calls) == 2  # a late one finds the new token


async def test_the_login_rate_limit_is_a_long_named_retry_for_everyone_waiting(logins):
    from listenerd.outcome import Ended, Retry
    from listenerd.sources.salesforce_auth import LIMIT_BACKOFF_INITIAL, Login, LoginRateExceeded

    calls, behaviour = logins
    behaviour[0] = LoginRateExceeded("invalid_grant: LOGIN_RATE_EXCEEDED")
    login = Login(sf_creds(), sources_settings())
    outcomes = await asyncio.gather(*(login.current() for _ in range(5)), return_exceptions=True)
    assert len(calls) == 1 and all(isinstance(o, Ended) for o in outcomes)
    retry = outcomes[0].outcome
    assert isinstance(retry, Retry) and "login rate limit" in retry.reason and "LOGIN_RATE_EXCEEDED" in retry.reason
    assert retry.delay >= 0.8 * LIMIT_BACKOFF_INITIAL
    assert login.limited() > retry.delay * 1.2  # a second hit in a row backs off longer


class FakeTokenEndpoint:
    """Just enough of aiohttp.ClientSession.post for `login()`: one canned answer."""

    def __init__(self, status, body):
        self.status, self.body = status, body

    def post(self, *args, **kwargs):
        endpoint = self

        class Response:
            status = endpoint.status

            async def __aenter__(self):
                return self

            async def __aexit__(self, *exc):
                return False

            async def read(self):
                return endpoint.body

        return Response()


@pytest.mark.parametrize("description", ["LOGIN_RATE_EXCEEDED", "Login Rate Exceeded"])
async def test_login_rate_exceeded_is_told_apart_from_bad_credentials(description):
    from listenerd.outcome import Ended, Fail
    from listenerd.sources.salesforce_auth import LoginRateExceeded, login

    body = orjson.dumps({"error": "invalid_grant", "error_description": description})
    with pytest.raises(LoginRateExceeded):
        await login(FakeTokenEndpoint(400, body), sf_creds(), None, 1.0)
    body = orjson.dumps({"error": "invalid_grant", "error_description": "authentication failure"})
    with pytest.raises(Ended) as info:
        await login(FakeTokenEndpoint(400, body), sf_creds(), None, 1.0)
    assert isinstance(info.value.outcome, Fail)
