"""Salesforce login and REST for the streaming source: one OAuth session per integration, shared.

Why its own module: the token is a resource of the integration, not of a listener or a CometD client.
`Login` caches it, shares it with every listener and client of the integration, and logs in again
only when Salesforce says the session is invalid, once however many notice at the same moment (single
flight). Salesforce limits logins per user (3,600 an hour, then `LOGIN_RATE_EXCEEDED`, help article
000381578), and a login per listener or per reconnect spends that quota in a restart storm
(restforce/restforce#744 met it with JWT logins per call).

1. Login (OAuth 2.0: username-password, JWT bearer or client credentials, by `auth`) with aiohttp
   against `{login-url}/services/oauth2/token`, any host and scheme, TLS verified (optionally against
   `sources.ca-bundle`). `invalid_grant` / `invalid_client` are `failed` with Salesforce's own words
   (short, printable); the secrets (password, consumer secret, private key, assertion) never appear.
   `LOGIN_RATE_EXCEEDED` is `retrying`, named, after the long limit back-off.
2. PushTopic lookup, creation and update (when its query differs from the listener's) over REST, per
   listener, with the same aiohttp and TLS as the login,
   to the instance URL exactly as the login answered it (plain http for simulators). These were
   simple-salesforce calls in a thread: two requests did not need a synchronous client, `requests`,
   a SOAP stack and a thread pool, about 17 MiB of a daemon that runs Salesforce listeners.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from listenerd.backoff import backoff_delay
from listenerd.egress import EgressRefused, Policy, refusal, session_options
from listenerd.model import SalesforceIntegration, SalesforceOptions, Sources
from listenerd.net import client_tls, describe, kind_of, mask, sanitised
from listenerd.net import user_agent as net_user_agent
from listenerd.outcome import Ended, Fail, Retry

# OAuth errors that stay until someone changes the credentials or the connected app: `failed`, with
# Salesforce's words (OAuth 2.0 error codes as its token endpoint answers them, e.g. `invalid_grant`
# "user hasn't approved this consumer", `invalid_client_id` "client identifier invalid",
# `invalid_app_access` "user is not admin approved to access this app").
FATAL_LOGIN_ERRORS = ("invalid_grant", "invalid_client", "invalid_client_id", "unsupported_grant_type",
                      "invalid_app_access", "inactive_user", "inactive_org", "invalid_request")
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# The assertion's lifetime: Salesforce accepts an `exp` at most 3 minutes ahead (OAuth 2.0 JWT Bearer
# Flow for Server-to-Server Integration); it is made afresh for each login.
ASSERTION_LIFETIME = 180
WORDS_LIMIT = 300  # Salesforce's error text, as quoted in a status message
# Salesforce's words when a user's logins pass 3,600 an hour (help article 000381578); matched anywhere
# in the OAuth error, before `invalid_grant` counts as bad credentials.
LOGIN_RATE_WORDS = ("login_rate_exceeded", "login rate exceeded")
# Back-off after the org's client limit or the login rate limit: they clear in minutes (a client
# expires, an hour's logins age), and each early retry spends more of the same quota.
LIMIT_BACKOFF_INITIAL = 60.0
LIMIT_BACKOFF_MAX = 300.0


@dataclass(frozen=True)
class Session:
    """The answer of a login; `repr` never shows the token."""

    access_token: str = field(repr=False)
    instance_url: str
    org_id: str


class LoginRateExceeded(Exception):
    """Salesforce refused the login for the user's hourly login limit; carries its words."""


def scrub(text: str, integration: SalesforceIntegration, *also: str) -> str:
    """Salesforce's words, short and printable, minus any secret they might echo (the joined password first)."""
    text = "".join(c if c.isprintable() else " " for c in text)
    text = mask(text, integration.password + integration.secret_token, *also, *integration.secret_values(),
                shortest=4)
    return text if len(text) <= WORDS_LIMIT else text[: WORDS_LIMIT - 3] + "..."


def org_id_of(answer: dict[str, Any]) -> str:
    """The org from the identity URL `.../id/<orgId>/<userId>`, else the token's `<orgId>!` prefix."""
    parts = urlsplit(str(answer.get("id", ""))).path.strip("/").split("/")
    if len(parts) >= 3 and parts[-3] == "id":
        return parts[-2]
    token = str(answer.get("access_token", ""))
    return token.split("!", 1)[0] if "!" in token else "org"


def jwt_assertion(integration: SalesforceIntegration, now: float | None = None) -> str:
    """The JWT bearer flow's assertion: RS256 over `iss` consumer key, `sub` username, `aud` login URL,
    `exp` a few minutes ahead, signed with the key whose certificate is on the connected app."""
    import jwt  # PyJWT, with cryptography for RS256

    issued = int(time.time() if now is None else now)
    claims = {"iss": integration.consumer_key, "sub": integration.username,
              "aud": integration.login_url.rstrip("/"), "exp": issued + ASSERTION_LIFETIME}
    return jwt.encode(claims, signing_key(integration.private_key), algorithm="RS256")


@functools.lru_cache(maxsize=64)
def signing_key(pem: str) -> Any:
    """The parsed RSA key, once per key: loading a PEM checks the key's consistency, about 35 ms of CPU on
    this project's machine (bench/salesforce_kinds.py), against 1-2 ms to sign; a login storm across many
    integrations would pay it at every login."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(pem.encode(), password=None)


def token_form(integration: SalesforceIntegration) -> dict[str, str]:
    """The token request of the integration's flow (`auth`), as Salesforce's OAuth endpoint reads it."""
    if integration.auth == "jwt":
        return {"grant_type": JWT_BEARER, "assertion": jwt_assertion(integration)}
    if integration.auth == "client-credentials":
        return {"grant_type": "client_credentials", "client_id": integration.consumer_key,
                "client_secret": integration.consumer_secret}
    return {"grant_type": "password", "client_id": integration.consumer_key,
            "client_secret": integration.consumer_secret, "username": integration.username,
            "password": integration.password + integration.secret_token}


async def login(http: aiohttp.ClientSession, integration: SalesforceIntegration, sslctx: ssl.SSLContext,
                timeout: float, egress: Policy | None = None) -> Session:
    """One OAuth login with the integration's flow (`password`, `jwt`, `client-credentials`).

    With `egress` (an API-made integration), the login URL and the instance URL Salesforce answers must
    both be hosts the policy allows, and every address they resolve to is checked at connect time.

    Raises `Ended(Fail)` when Salesforce refuses the credentials or the app (its words, scrubbed),
    `Ended(Retry)` when it cannot be reached or answers oddly, `LoginRateExceeded` for the hourly limit.
    Shared by every Salesforce source (CometD streaming here, the Pub/Sub API beside it).
    """
    url = integration.login_url.rstrip("/") + "/services/oauth2/token"
    if egress is not None:
        try:
            egress.check_url("salesforce", integration.login_url, "login-url", ("https",))
        except EgressRefused as exc:
            raise Ended(Fail(str(exc))) from None
    form = token_form(integration)
    try:
        async with http.post(url, data=form, ssl=sslctx, timeout=aiohttp.ClientTimeout(total=timeout),
                             headers={"Accept": "application/json"}) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if (refused := refusal(exc)) is not None:
            raise Ended(Fail(f"login-url: {refused}")) from None
        raise Ended(Retry(kind_of(exc), f"Cannot reach {integration.login_url}: {describe(exc)}")) from None
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        answer = None
    if status == 200 and isinstance(answer, dict) and answer.get("access_token") and answer.get("instance_url"):
        if egress is not None:
            try:
                egress.check_url("salesforce", str(answer["instance_url"]), "instance_url", ("https",))
            except EgressRefused as exc:
                raise Ended(Fail(f"the login answered {sanitised(exc.message)}")) from None
        return Session(answer["access_token"], str(answer["instance_url"]).rstrip("/"), org_id_of(answer))
    if isinstance(answer, dict) and answer.get("error"):
        words = sanitised(scrub(f"{answer['error']}: {answer.get('error_description', '')}".rstrip(": "),
                                integration, form.get("assertion", "")), WORDS_LIMIT)
        if any(w in words.lower() for w in LOGIN_RATE_WORDS):
            raise LoginRateExceeded(words)
        if answer["error"] in FATAL_LOGIN_ERRORS:
            raise Ended(Fail(f"Salesforce rejected the login: {words}"))
        raise Ended(Retry("refused", f"Login failed: {words}"))
    raise Ended(Retry("refused", f"Login failed: HTTP {status} from {integration.login_url}"))


# ---------------------------------------------------------------- PushTopic over REST


class SessionExpired(Exception):  # noqa: N818 - Salesforce's word for it
    """The REST API answered 401: the shared token is stale; `ensure_topic_for` refreshes it once."""


# What listenerd creates a PushTopic with, and keeps it at: every operation, fields referenced in the query.
TOPIC_NOTIFY: dict[str, Any] = {"NotifyForOperationCreate": True, "NotifyForOperationUpdate": True,
                                "NotifyForOperationDelete": True, "NotifyForOperationUndelete": True,
                                "NotifyForFields": "Referenced"}


def topic_name(topic: str) -> str:
    """The PushTopic's record name: `/topic/Name?Field=value` -> `Name` (a filter is not part of the name)."""
    return topic.removeprefix("/topic/").split("?", 1)[0]


def topic_fields(options: SalesforceOptions) -> dict[str, Any]:
    return {"Query": options.query, "ApiVersion": float(options.version), **TOPIC_NOTIFY}


def topic_differences(record: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """The PushTopic fields whose value in the org is not what the listener wants (the query compared
    with its whitespace collapsed, the API version as a number)."""
    changed = []
    for key, value in wanted.items():
        have = record.get(key)
        if key == "Query":
            same = " ".join(str(have or "").split()) == " ".join(str(value).split())
        elif key == "ApiVersion":
            try:
                same = float(have) == float(value)
            except (TypeError, ValueError):
                same = False
        else:
            same = have == value
        if not same:
            changed.append(key)
    return changed


async def ensure_topic(http: aiohttp.ClientSession, session: Session, options: SalesforceOptions,
                       sslctx: ssl.SSLContext, timeout: float) -> str:
    """Find the PushTopic; with a query, create it when missing and update it when it differs.

    'found', 'created', or 'updated: Query, ApiVersion' (the fields changed). The REST calls
    simple-salesforce makes (`query/?q=SELECT ... FROM PushTopic WHERE Name = '...'`,
    `POST sobjects/PushTopic/`, `PATCH sobjects/PushTopic/<Id>`), on aiohttp, against the instance URL
    exactly as the login gave it. A topic whose query changed is updated rather than kept: a listener
    whose config says one query and whose org runs another would forward the wrong records, silently.
    """
    name = topic_name(options.topic)
    base = f"{session.instance_url}/services/data/v{options.version}"
    quoted = name.replace("\\", "\\\\").replace("'", "\\'")
    soql = (f"SELECT Id, Name, Query, ApiVersion, IsActive, NotifyForOperationCreate, NotifyForOperationUpdate, "
            f"NotifyForOperationDelete, NotifyForOperationUndelete, NotifyForFields FROM PushTopic "
            f"WHERE Name = '{quoted}'")
    found = await _rest(http, session, sslctx, timeout, name, "GET", f"{base}/query/", params={"q": soql})
    records = found.get("records") if isinstance(found.get("records"), list) else []
    if found.get("totalSize", 0) > 0:
        record = records[0] if records and isinstance(records[0], dict) else {}
        if not options.query or not record.get("Id"):
            return "found"
        wanted = topic_fields(options)
        changed = topic_differences(record, wanted)
        if not changed:
            return "found"
        await _rest(http, session, sslctx, timeout, name, "PATCH",
                    f"{base}/sobjects/PushTopic/{record['Id']}", json={k: wanted[k] for k in changed})
        return "updated: " + ", ".join(changed)
    if not options.query:
        raise Ended(Fail(f"PushTopic {name} does not exist in the org, and the listener has no query "
                         f"to create it with (set options.query, or create the PushTopic)"))
    await _rest(http, session, sslctx, timeout, name, "POST", f"{base}/sobjects/PushTopic/",
                json={"Name": name, **topic_fields(options)})
    return "created"


async def _rest(http: aiohttp.ClientSession, session: Session, sslctx: ssl.SSLContext, timeout: float,
                name: str, method: str, url: str, **kwargs: Any) -> dict[str, Any]:
    """One REST call's JSON answer. As simple-salesforce classed them: 401 is an expired session; 300, 400,
    403 and 404 are Salesforce refusing (`failed`, with its words); any other status is transient."""
    headers = {"Authorization": f"Bearer {session.access_token}", "Accept": "application/json"}
    try:
        async with http.request(method, url, headers=headers, ssl=sslctx, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout), **kwargs) as response:
            status, body = response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        if (refused := refusal(exc)) is not None:
            raise Ended(Fail(f"instance_url: {refused}")) from None
        raise Ended(Retry(kind_of(exc), f"Cannot reach {session.instance_url}: {describe(exc, limit=200)}")) from None
    try:
        answer = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        answer = None
    if status == 401:
        raise SessionExpired()
    if 200 <= status < 300 and isinstance(answer, dict):
        return answer
    words = rest_words(status, answer)
    if status in (300, 400, 403, 404):
        raise Ended(Fail(f"Salesforce refused PushTopic {name}: {words}"))
    raise Ended(Retry("refused", f"Salesforce REST error for PushTopic {name}: {words}"))


def rest_words(status: int, answer: Any) -> str:
    """Salesforce's error list (`[{"errorCode", "message"}]`) as text, else the status."""
    if isinstance(answer, list):
        return sanitised("; ".join(f"{c.get('errorCode', '')}: {c.get('message', '')}"
                                   for c in answer if isinstance(c, dict)))
    return f"HTTP {status}"


class Login:
    """One integration's OAuth session, shared by its listeners and its Bayeux clients.

    `current()` logs in once and caches the token; `refresh(stale)` logs in again only if the token
    Salesforce refused is still the cached one, and concurrent callers share one login (single
    flight), so a session expiry under any number of listeners costs exactly one login.
    """

    def __init__(self, integration: SalesforceIntegration, settings: Sources, egress: Policy | None = None,
                 user_agent: str = ""):
        self.integration = integration
        self.egress = egress
        self.user_agent = user_agent or net_user_agent()  # names the node in a cluster
        self.ssl = client_tls(settings.ca_bundle)
        self.timeout = settings.connect_timeout
        self.session: Session | None = None
        self._flight: asyncio.Task[Session] | None = None
        self._limit_hits = 0
        self.topics_found: set[str] = set()  # PushTopics seen to exist: a retry does not look them up again

    def http_options(self, **more: Any) -> dict[str, Any]:
        """`ClientSession` keyword arguments for every HTTP request of this integration (OAuth, REST, CometD):
        its egress policy and the `User-Agent` that names the node."""
        return {**session_options(self.egress), "headers": {"User-Agent": self.user_agent}, **more}

    async def current(self) -> Session:
        return self.session if self.session is not None else await self._login()

    async def refresh(self, stale: Session | None) -> Session:
        if self.session is not None and self.session is not stale:
            return self.session  # another listener already logged in again
        self.session = None
        return await self._login()

    def limited(self) -> float:
        """A limit was hit (org clients, login rate): the long back-off, longer at each hit in a row."""
        self._limit_hits += 1
        return backoff_delay(self._limit_hits, LIMIT_BACKOFF_INITIAL, LIMIT_BACKOFF_MAX)

    def unlimited(self) -> None:
        self._limit_hits = 0

    async def _login(self) -> Session:
        if self._flight is None:
            self._flight = asyncio.create_task(self._post(), name=f"salesforce-login:{self.integration.login_url}")
            self._flight.add_done_callback(self._landed)
        return await asyncio.shield(self._flight)  # a waiter cancelled does not cancel the others' login

    def _landed(self, flight: asyncio.Task[Session]) -> None:
        if self._flight is flight:
            self._flight = None
        if not flight.cancelled():
            flight.exception()  # retrieved here: a login nobody waits for any more is not an error to log

    async def _post(self) -> Session:
        try:
            async with aiohttp.ClientSession(**self.http_options()) as http:
                session = await login(http, self.integration, self.ssl, self.timeout, egress=self.egress)
        except LoginRateExceeded as exc:
            raise Ended(Retry("refused", f"Salesforce's login rate limit for this user is reached "
                                         f"(LOGIN_RATE_EXCEEDED; Salesforce said: {exc}); logging in again later",
                              delay=self.limited())) from None
        self.session = session
        return session


async def ensure_topic_for(login: Login, options: SalesforceOptions, settings: Sources) -> str:
    """`ensure_topic` with the shared token; a 401 there refreshes it once (single flight)."""
    session = await login.current()
    async with aiohttp.ClientSession(**login.http_options()) as http:
        for attempt in (1, 2):
            try:
                return await ensure_topic(http, session, options, login.ssl, settings.connect_timeout)
            except SessionExpired:
                if attempt == 2:
                    raise Ended(Retry("refused", "Salesforce refused a fresh session for the REST API")) from None
                session = await login.refresh(session)
    raise AssertionError("unreachable")
