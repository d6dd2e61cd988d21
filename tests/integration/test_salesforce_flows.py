"""Salesforce login flows (password, JWT bearer, client credentials) against the simulator's token endpoint.

Each flow's success drives a real PushTopic subscription; each refusal is the simulator answering as
Salesforce does, and must end `failed` with Salesforce's words and no secret anywhere (status, logs,
API answers).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import jwt
import pytest
import structlog

from listenerd.model import SECRET_MASK, Config
from listenerd.sim.engine import EngineSim
from listenerd.sim.salesforce import SalesforceSim, throwaway_certificate
from listenerd.sources.salesforce_auth import JWT_BEARER, jwt_assertion, token_form
from tests.daemon import base_config, running_daemon
from tests.harness import Harness, desired, integration, listener, wait_for

USER, PASSWORD, TOKEN = "u@example.com", "pa55-word", "SECTOKEN123"
RUN_AS = "integration@example.com"
SECRET = "cs-secret-value"
KEY = ("t1", "LS1")
PRIVATE_KEY, CERTIFICATE = throwaway_certificate("listenerd-tests")
OTHER_KEY, OTHER_CERTIFICATE = throwaway_certificate("someone-else")


@pytest.fixture
async def sim():
    s = SalesforceSim(users={USER: PASSWORD + TOKEN, RUN_AS: "unused"}, clients={"ck": SECRET, "cc": SECRET},
                      certificates={"ck": CERTIFICATE, "other": OTHER_CERTIFICATE}, run_as={"cc": RUN_AS},
                      approved={"other": set()}, long_poll=0.5)
    s.create_topic("Invoices", "SELECT Id, Name FROM Invoice__c")
    async with s:
        yield s


def flow(sim: SalesforceSim, auth: str, **over: str):
    fields = {"password": {"consumer-key": "ck", "consumer-secret": SECRET, "username": USER,
                           "password": PASSWORD, "secret-token": TOKEN},
              "jwt": {"auth": "jwt", "consumer-key": "ck", "username": USER, "private-key": PRIVATE_KEY},
              "client-credentials": {"auth": "client-credentials", "consumer-key": "cc", "consumer-secret": SECRET},
              }[auth]
    return integration("salesforce", **{**fields, "login-url": sim.url, **over})


@contextlib.asynccontextmanager
async def running(tmp_path, creds):
    config = Config.model_validate({"store": {"path": str(tmp_path / "t.db")},
                                    "supervisor": {"backoff-initial": 0.05, "backoff-max": 0.3}})
    async with Harness(tmp_path, config) as h:
        sup = h.supervisor()
        spec = listener(id=KEY[1], type="salesforce", options={"topic": "Invoices"}, mapping={"name": "Name"})
        await sup.start({KEY: desired(spec, creds)})
        yield h, sup.status(KEY)


@pytest.mark.parametrize("auth, grant", [("password", "password"), ("jwt", JWT_BEARER),
                                         ("client-credentials", "client_credentials")])
async def test_each_flow_logs_in_and_streams(tmp_path, sim, auth, grant):
    async with running(tmp_path, flow(sim, auth)) as (h, record):
        await wait_for(lambda: record.status == "started", what="started")
        sim.publish("Invoices", {"Id": "a1", "Name": "INV-1"})
        await wait_for(lambda: record.received == 1, what="an event")
        assert [e["event"] for e in await h.events()] == [{"name": "INV-1"}]
    assert sim.flows == [grant]


def test_jwt_assertion_claims_and_signature():
    creds = integration("salesforce", auth="jwt", **{"consumer-key": "ck", "username": USER,
                                                     "private-key": PRIVATE_KEY,
                                                     "login-url": "https://login.example.test/"})
    form = token_form(creds)
    assert form["grant_type"] == JWT_BEARER and set(form) == {"grant_type", "assertion"}
    claims = jwt.decode(form["assertion"], _public(), algorithms=["RS256"], audience="https://login.example.test")
    assert claims["iss"] == "ck" and claims["sub"] == USER
    assert 0 < claims["exp"] - time.time() <= 180
    assert jwt.get_unverified_header(form["assertion"])["alg"] == "RS256"
    assert jwt_assertion(creds, now=1000)  # a fresh one per login, never cached


def _public():
    from cryptography import x509
    return x509.load_pem_x509_certificate(CERTIFICATE.encode()).public_key()


REFUSALS = [
    ("password", {"password": "wrong-password"}, "invalid_grant: authentication failure"),
    ("password", {"consumer-key": "nope"}, "invalid_client_id: client identifier invalid"),
    ("password", {"consumer-secret": "bad-secret"}, "invalid_client: invalid client credentials"),
    ("jwt", {"private-key": OTHER_KEY}, "invalid_grant: invalid assertion"),  # signed with another key
    ("jwt", {"consumer-key": "unknown"}, "invalid_client_id: client identifier invalid"),
    ("jwt", {"username": "nobody@example.com"}, "invalid_grant: user hasn't approved this consumer"),
    ("jwt", {"consumer-key": "other", "private-key": OTHER_KEY}, "invalid_grant: user hasn't approved this consumer"),
    ("jwt", {"login-url": "AUD"}, "invalid_grant: audience is invalid"),
    ("client-credentials", {"consumer-secret": "bad-secret"}, "invalid_client: invalid client credentials"),
    ("client-credentials", {"consumer-key": "ck"}, "invalid_grant: no client credentials user enabled"),
    ("client-credentials", {"consumer-key": "nope"}, "invalid_client_id: client identifier invalid"),
]


@pytest.mark.parametrize("auth, over, words", REFUSALS)
async def test_each_refusal_fails_with_salesforce_words_and_no_secret(tmp_path, sim, auth, over, words):
    if over.get("login-url") == "AUD":  # the same server, reached under another name: the audience differs
        over = {"login-url": sim.url.replace("localhost", "127.0.0.1")}
    creds = flow(sim, auth, **over)
    with structlog.testing.capture_logs() as logs:
        async with running(tmp_path, creds) as (_, record):
            await wait_for(lambda: record.status == "failed", what="failed")
            await asyncio.sleep(0.2)  # a retry would have happened by now at a 0.05 s back-off
            assert record.attempts == 0
            assert record.message == f"Salesforce rejected the login: {words}"
            answers = repr((record.message, record.last_error))
    for secret in creds.secret_values():
        assert secret not in repr(logs) and secret not in answers
    assert sim.logins == 0


async def test_expired_assertion_is_refused(sim):
    import aiohttp

    creds = flow(sim, "jwt")
    async with aiohttp.ClientSession() as http:
        stale = jwt_assertion(creds, now=time.time() - 600)
        async with http.post(sim.token_url, data={"grant_type": JWT_BEARER, "assertion": stale}) as response:
            assert response.status == 400
            assert await response.json() == {"error": "invalid_grant", "error_description": "expired assertion"}
        async with http.post(sim.token_url, data={"grant_type": JWT_BEARER, "assertion": "not.a.jwt"}) as response:
            assert (await response.json())["error_description"] == "invalid assertion"


async def test_secrets_of_every_flow_absent_from_logs_and_api_answers(tmp_path, sim):
    """A daemon with one tenant per flow: the API masks every secret, logs and statuses never show one."""
    tenants = ""
    for n, auth in enumerate(("password", "jwt", "client-credentials")):
        creds = flow(sim, auth)
        fields = "\n".join(f"{k} = {_toml(v)}" for k, v in creds.dump().items())
        tenants += f"""
[[tenants]]
id = "f{n}"
[tenants.integrations.salesforce]
{fields}
[[tenants.listeners]]
id = "SF"
type = "salesforce"
options = {{ topic = "Invoices" }}
"""
    secrets = [SECRET, PASSWORD, TOKEN, PRIVATE_KEY, *PRIVATE_KEY.strip().splitlines()[1:-1]]
    async with EngineSim() as engine:
        with structlog.testing.capture_logs() as logs:
            # the simulator is on loopback, over http: the operator allows that for API-made integrations
            egress = '[server.egress]\nhosts = ["localhost"]\nnetworks = ["127.0.0.0/8", "::1/128"]\nplaintext = true'
            text = base_config(tmp_path, engine.url, tenants).replace("[engine]", f"{egress}\n\n[engine]", 1)
            async with running_daemon(tmp_path, text) as (_, api):
                seen = []
                for n in range(3):
                    await api.wait_status(f"f{n}", "SF", "started")
                    seen.append(await api.call("GET", f"/1.0/tenants/f{n}/integrations/salesforce"))
                    seen.append(await api.call("GET", f"/1.0/tenants/f{n}/integrations"))
                    seen.append(await api.status(f"f{n}", "SF"))
                sim.publish("Invoices", {"Id": "a1", "Name": "INV-1"})
                await wait_for(lambda: len(engine.received) >= 3, what="an event per tenant")
                # an integration through the API: a bad key is refused naming the field, a good one masked
                body = {"auth": "jwt", "consumer-key": "ck", "username": USER, "login-url": sim.url}
                code, err = await api.call("POST", "/1.0/tenants/other/integrations/salesforce",
                                           {**body, "private-key": PRIVATE_KEY.replace("A", "B")})
                seen.append((code, err))
                assert code == 400 and err["error"].startswith("private-key: "), err
                code, err = await api.call("POST", "/1.0/tenants/other/integrations/salesforce", body)
                seen.append((code, err))
                assert code == 400 and err["error"] == 'private-key: required when auth is "jwt"', err
                code, made = await api.call("POST", "/1.0/tenants/other/integrations/salesforce",
                                            {**body, "private-key": PRIVATE_KEY})
                seen.append((code, made))
                assert code == 200 and made["private-key"] == SECRET_MASK, made
    password, jwt_flow, client = seen[0][1], seen[3][1], seen[6][1]  # GET .../integrations/salesforce of each
    assert [password[k] for k in ("consumer-secret", "password", "secret-token")] == [SECRET_MASK] * 3
    assert jwt_flow["auth"] == "jwt" and jwt_flow["private-key"] == SECRET_MASK and jwt_flow["username"] == USER
    assert client["auth"] == "client-credentials" and client["consumer-secret"] == SECRET_MASK
    text = repr(seen) + repr(logs)
    for secret in secrets:
        assert len(secret) < 4 or secret not in text, secret[:8]


def _toml(value):
    if isinstance(value, str):
        return '"""' + value + '"""' if "\n" in value else f'"{value}"'
    return "true" if value is True else "false" if value is False else str(value)
