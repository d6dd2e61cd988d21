"""The validated shapes of everything listenerd runs: config sections, integrations, listeners.

One model serves the config file, the store and the API, so a listener is validated the same way
wherever it comes from, and errors carry pydantic locations that `config.format_errors` turns into
`tenants[0].listeners[1].options.hash: required`.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
import socket
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from listenerd.mapping import check_bounds, compile_mapping

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SOURCE_TYPES = ("datasift", "pusher", "salesforce")  # integration types (one per provider)
# listener types, and the integration each one runs on (a provider may offer more than one API)
LISTENER_INTEGRATIONS = {"datasift": "datasift", "pusher": "pusher", "salesforce": "salesforce",
                         "salesforce-pubsub": "salesforce"}
LISTENER_TYPES = tuple(LISTENER_INTEGRATIONS)
# a listener id the API's routes take for something else: refused in the config file and by the API alike
RESERVED_LISTENER_IDS = {"status": "GET .../listeners/status is the tenant's summary"}


def reserved_listener_id(listener_id: object) -> str | None:
    """The problem with a reserved listener id (`'status' is reserved (...)`), None for any other."""
    why = RESERVED_LISTENER_IDS.get(listener_id) if isinstance(listener_id, str) else None
    return None if why is None else f"{listener_id!r} is reserved ({why})"


def integration_type(listener_type: str) -> str:
    """The integration a listener type runs on (`salesforce-pubsub` shares the `salesforce` one)."""
    return LISTENER_INTEGRATIONS.get(listener_type, listener_type)


def _hyphenate(name: str) -> str:
    return name.replace("_", "-")


class Model(BaseModel):
    """Base: hyphenated keys as in the CxEngage API, unknown keys refused."""

    model_config = ConfigDict(alias_generator=_hyphenate, populate_by_name=True, extra="forbid",
                              frozen=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


def _check_id(value: str) -> str:
    if not SAFE_ID.match(value):
        raise ValueError("must be 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    return value


Id = Annotated[str, Field(min_length=1, max_length=64)]


# ---------------------------------------------------------------- daemon sections


class Token(Model):
    name: str = Field(min_length=1)
    token: str = Field(min_length=8)
    tenants: list[str] = Field(default_factory=lambda: ["*"])

    def allows(self, tenant_id: str) -> bool:
        return "*" in self.tenants or tenant_id in self.tenants


class Egress(Model):
    """`[server.egress]`: what integrations made through the API may connect to beyond their provider's hosts
    (`listenerd.egress`). Config-file integrations are the operator's and are not checked."""

    hosts: list[str] = Field(default_factory=list)  # exact host names, e.g. "streams.example.com"
    suffixes: list[str] = Field(default_factory=list)  # "example.net" allows example.net and *.example.net
    networks: list[str] = Field(default_factory=list)  # CIDRs an IP literal or a resolved address may be in
    plaintext: bool = False  # http:// and ws:// URLs, Pusher tls = false

    @field_validator("networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for index, network in enumerate(value):
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"[{index}] {network!r} is not an address or CIDR network") from None
        return value


class Server(Model):
    listen: str = "127.0.0.1:8088"
    tokens: list[Token] = Field(default_factory=list)
    egress: Egress = Field(default_factory=Egress)
    max_body_bytes: int = Field(default=1_048_576, gt=0)
    tap_queue: int = Field(default=1000, gt=0)
    # slow clients: a request's line and headers must arrive within header-timeout, an idle kept-alive
    # connection closes after idle-timeout, and past max-connections new connections are closed at once
    header_timeout: float = Field(default=10.0, gt=0)
    idle_timeout: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=256, gt=0)
    metrics_token: str | None = Field(default=None, min_length=8)  # bearer token /metrics asks for, when set
    # per-listener labels on /metrics: true, false, or a listener count above which they are dropped
    metrics_per_listener: bool | int = 1000

    @field_validator("metrics_per_listener")
    @classmethod
    def _per_listener(cls, value: bool | int) -> bool | int:
        if not isinstance(value, bool) and value < 0:
            raise ValueError("must be true, false or a listener count (>= 0)")
        return value

    def labels_per_listener(self, listeners: int) -> bool:
        """Whether /metrics shows per-listener series with this many listeners loaded."""
        if isinstance(self.metrics_per_listener, bool):
            return self.metrics_per_listener
        return listeners <= self.metrics_per_listener

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError("must be HOST:PORT, e.g. 127.0.0.1:8088")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])


class Engine(Model):
    url: str = "http://127.0.0.1:9000/1.0/events"
    token: str | None = None
    batch_max: int = Field(default=500, ge=1, le=100_000)
    linger_ms: float = Field(default=20, ge=0)
    timeout: float = Field(default=10.0, gt=0)
    retry_initial: float = Field(default=0.5, gt=0)
    retry_max: float = Field(default=30.0, gt=0)
    ca_bundle: str | None = None
    max_event_bytes: int = Field(default=1_048_576, ge=1024)  # a larger envelope is set aside, never sent

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @property
    def public_url(self) -> str:
        """The URL as printed and logged: user information (`user:password@`) replaced by `***@`."""
        parts = urlsplit(self.url)
        if "@" not in parts.netloc:
            return self.url
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))

    def userinfo(self) -> list[str]:
        """The secrets a URL's user information carries (so the redactor knows them)."""
        parts = urlsplit(self.url)
        return [v for v in (parts.password, unquote(parts.password or "")) if v]


class Store(Model):
    path: str = "/var/lib/listenerd/listenerd.db"
    create_directory: bool = False  # else a missing directory is an error (a volume that did not mount), unless
    # it is systemd's StateDirectory
    synchronous: Literal["FULL", "NORMAL"] = "NORMAL"
    outbox_max_events: int = Field(default=1_000_000, gt=0)
    outbox_max_bytes: int = Field(default=1_073_741_824, gt=0)
    # the key that seals API-set secrets at rest (sealing.py); None: a key generated beside the store
    secrets_key_file: str | None = None
    secrets_old_key_files: list[str] = Field(default_factory=list)  # still open, never seal: for rotation
    url: str | None = None  # postgresql://user@host/db instead of `path`: the PostgreSQL store (store_pg.py)

    @field_validator("url")
    @classmethod
    def _postgresql_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("postgresql", "postgres"):
            raise ValueError("a postgresql://user@host/database URL")
        return value

    @model_validator(mode="after")
    def _one_backend(self) -> Store:
        if self.url is not None and "path" in self.model_fields_set:
            raise ValueError("give either path (SQLite) or url (PostgreSQL), not both")
        return self


class Cluster(Model):
    """Several nodes sharing one PostgreSQL store (`cluster.py`); only with `[store] url`."""

    node_id: str = Field(default_factory=lambda: socket.gethostname() or "node", pattern=r"^[A-Za-z0-9._-]{1,64}$")
    lease_ttl: float = 10.0  # seconds; "10s", "500ms", "1m" or a number
    advertise: str | None = None  # how other nodes reach this node's API (the tap is proxied there)

    @field_validator("lease_ttl", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m)?\s*", value)
            if not match:
                raise ValueError('a duration such as "10s", "500ms" or "1m"')
            number, unit = float(match[1]), match[2] or "s"
            value = number / 1000 if unit == "ms" else number * 60 if unit == "m" else number
        return value

    @field_validator("lease_ttl")
    @classmethod
    def _ttl_bounds(cls, value: float) -> float:
        if not 1.0 <= value <= 600.0:
            raise ValueError("must be between 1s and 10m (a node renews at a third of it)")
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise_url(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError("an http(s) base URL such as http://10.0.0.5:8088")
        return value


class Supervisor(Model):
    backoff_initial: float = Field(default=1.0, gt=0)
    backoff_max: float = Field(default=30.0, gt=0)
    healthy_after: float = Field(default=60.0, ge=0)
    stop_timeout: float = Field(default=10.0, gt=0)


class Sources(Model):
    """Protocol tuning shared by the sources; defaults follow each protocol's documented bounds."""

    ca_bundle: str | None = None
    max_frame_bytes: int = Field(default=1_048_576, gt=0)
    connect_timeout: float = Field(default=15.0, gt=0)
    pusher_activity_timeout: float = Field(default=120.0, gt=0)
    pusher_pong_timeout: float = Field(default=30.0, gt=0)
    datasift_silence_timeout: float = Field(default=65.0, gt=0)
    salesforce_poll_margin: float = Field(default=1.2, ge=1.0)
    # Pub/Sub API: the server's keepalive interval (Salesforce: an empty FetchResponse at least every 270 s);
    # a stream silent past it x salesforce-poll-margin is dead
    salesforce_pubsub_keepalive: float = Field(default=270.0, gt=0)


class Limits(Model):
    """What one tenant may ask of the shared daemon (API writes and listener definitions)."""

    mapping_max_fields: int = Field(default=500, gt=0)
    mapping_max_path_length: int = Field(default=512, gt=0)  # characters
    mapping_max_path_segments: int = Field(default=32, gt=0)
    tenant_max_listeners: int = Field(default=10_000, ge=0)  # 0: no bound
    tenant_write_rate: float = Field(default=20.0, ge=0)  # API writes per second per tenant; 0: no bound
    tenant_write_burst: int = Field(default=200, gt=0)  # writes a tenant may make at once


class Log(Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


# ---------------------------------------------------------------- integrations

SECRET_MASK = "********"


class Integration(Model):
    """Credentials for one source type of one tenant. `SECRETS` names the fields never shown."""

    TYPE: ClassVar[str] = ""
    SECRETS: ClassVar[tuple[str, ...]] = ()
    managed_by: Literal["config", "api"] = Field(default="config", exclude=True)

    @property
    def type(self) -> str:
        return self.TYPE

    def secret_values(self) -> list[str]:
        return [v for name in self.SECRETS if (v := getattr(self, name.replace("-", "_")))]

    def redacted(self) -> dict[str, Any]:
        body = {"id": self.type, "type": self.type, **self.dump()}
        for name in self.SECRETS:
            if body.get(name):
                body[name] = SECRET_MASK
        body["managed-by"] = self.managed_by
        return body


class DatasiftIntegration(Integration):
    TYPE: ClassVar[str] = "datasift"
    SECRETS: ClassVar[tuple[str, ...]] = ("api-key",)
    username: str = Field(min_length=1)
    api_key: str = Field(min_length=1)
    stream_url: str = "wss://websocket.datasift.com/multi"


SALESFORCE_AUTH = ("password", "jwt", "client-credentials")
# The fields each login flow needs besides `consumer-key` (CONTRACT "Integrations"; Salesforce's
# OAuth flows: username-password, JWT bearer, client credentials).
SALESFORCE_FLOW_FIELDS: dict[str, tuple[str, ...]] = {
    "password": ("consumer-secret", "username", "password"),
    "jwt": ("username", "private-key"),
    "client-credentials": ("consumer-secret",),
}


class SalesforceIntegration(Integration):
    """One org's connected app and the login flow that uses it (`auth`).

    `password` (the default, so older configs keep working), `jwt` (a certificate-signed assertion: no
    password, the flow Salesforce recommends for servers) or `client-credentials` (a run-as user set on
    the connected app). Each flow's fields are required by name; the JWT key must parse and be RSA.
    """

    TYPE: ClassVar[str] = "salesforce"
    SECRETS: ClassVar[tuple[str, ...]] = ("consumer-secret", "password", "secret-token", "private-key")
    auth: Literal["password", "jwt", "client-credentials"] = "password"
    consumer_key: str = Field(min_length=1)
    consumer_secret: str = ""
    username: str = ""
    password: str = ""
    secret_token: str = ""
    private_key: str = ""  # PEM (PKCS#1 or PKCS#8, unencrypted); `private-key-file` in the config file
    login_url: str = "https://login.salesforce.com"
    pubsub_url: str = "https://api.pubsub.salesforce.com:7443"  # Pub/Sub API; http:// is plaintext gRPC (simulators)

    @field_validator("pubsub_url")
    @classmethod
    def _pubsub_url(cls, value: str) -> str:
        if not re.match(r"^https?://[^/?#\s]+(:\d+)?/?$", value):
            raise ValueError("must be https://host[:port] (or http:// for a local plaintext simulator)")
        return value.rstrip("/")

    def secret_values(self) -> list[str]:
        """The secrets, and each base64 line of a PEM key too: a line quoted alone (a traceback, a diff) is
        redacted as well."""
        values = super().secret_values()
        if self.private_key:
            values += [line.strip() for line in self.private_key.splitlines()
                       if len(line.strip()) >= 16 and not line.startswith("-----")]
        return values

    @model_validator(mode="after")
    def _flow_fields(self) -> SalesforceIntegration:
        for name in SALESFORCE_FLOW_FIELDS[self.auth]:
            if not getattr(self, name.replace("-", "_")):
                raise field_problem(name, f'required when auth is "{self.auth}"')
        if self.auth == "jwt":
            problem = rsa_key_problem(self.private_key)
            if problem:
                raise field_problem("private-key", problem)
        return self


def field_problem(name: str, problem: str) -> PydanticCustomError:
    """A whole-object rule's finding about one field: `config.format_errors` puts `name` in the location."""
    return PydanticCustomError("field_problem", "{field}: {problem}", {"field": name, "problem": problem})


def rsa_key_problem(pem: str) -> str | None:
    """Why `pem` is not an unencrypted RSA private key in PEM, in words that never quote the key; None when it is."""
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if "-----BEGIN" not in pem:
        return "must be a PEM private key (-----BEGIN PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)"
    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except TypeError:
        return "the PEM private key is encrypted: give it unencrypted (openssl pkey -in key.pem -out plain.pem)"
    except Exception:  # cryptography's parse errors vary by key format and backend
        return "is not a readable PEM private key"
    if not isinstance(key, RSAPrivateKey):
        return f"must be an RSA key (Salesforce signs JWT bearer assertions with RS256), not {type(key).__name__}"
    if key.key_size < 2048:
        return f"the RSA key has {key.key_size} bits; Salesforce requires at least 2048"
    return None


class PusherIntegration(Integration):
    TYPE: ClassVar[str] = "pusher"
    SECRETS: ClassVar[tuple[str, ...]] = ("secret", "encryption-master-key")
    key: str = Field(min_length=1)
    secret: str = Field(min_length=1)
    app_id: str | None = None
    cluster: str = "mt1"
    host: str | None = None
    port: int | None = Field(default=None, gt=0, le=65535)
    tls: bool = True
    encryption_master_key: str | None = None  # base64 of 32 bytes, for private-encrypted- channels

    @field_validator("encryption_master_key")
    @classmethod
    def _master_key(cls, value: str | None) -> str | None:
        """32 bytes in base64, as pusher-http-python's `crypto.parse_master_key` requires."""
        if value is None:
            return value
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("must be base64") from None
        if len(decoded) != 32:
            raise ValueError(f"must be base64 of 32 bytes (it decodes to {len(decoded)})")
        return value


INTEGRATION_TYPES: dict[str, type[Integration]] = {
    "datasift": DatasiftIntegration,
    "salesforce": SalesforceIntegration,
    "pusher": PusherIntegration,
}


class Integrations(Model):
    datasift: DatasiftIntegration | None = None
    salesforce: SalesforceIntegration | None = None
    pusher: PusherIntegration | None = None

    def get(self, source_type: str) -> Integration | None:
        return getattr(self, source_type, None)


# ---------------------------------------------------------------- listeners


class DatasiftOptions(Model):
    hash: str = Field(min_length=1, max_length=128)


# The Streaming API's channel kinds (Streaming API guide): PushTopic, optionally filtered
# (`?Field=value&...`); Platform Event (`__e`); Change Data Capture (all objects, one object's
# `<Object>ChangeEvent` / `<Object>__ChangeEvent`, or a custom channel `__chn`); generic streaming.
_NAME = r"[A-Za-z][A-Za-z0-9_]*"
_LOOSE = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # PushTopic and generic names as stored before channel kinds were checked
SALESFORCE_CHANNELS = {
    "topic": re.compile(rf"^/topic/{_LOOSE}(\?[A-Za-z][A-Za-z0-9_.]*=[^&=?]*(&[A-Za-z][A-Za-z0-9_.]*=[^&=?]*)*)?$"),
    "event": re.compile(rf"^/event/{_NAME}__e$"),
    "data": re.compile(rf"^/data/(ChangeEvents|{_NAME}ChangeEvent|{_NAME}__chn)$"),
    "u": re.compile(rf"^/u/{_LOOSE}$"),
}


def salesforce_channel_kind(topic: str) -> str:
    """`topic`, `event`, `data` or `u`: what the channel's messages look like and map from ("" for none)."""
    parts = topic.split("/", 2)
    return parts[1] if len(parts) == 3 and not parts[0] else ""


class SalesforceOptions(Model):
    topic: str = Field(min_length=1)
    version: str = "58.0"
    replay: Literal["resume", "new", "all"] = "resume"
    query: str | None = None

    @field_validator("topic")
    @classmethod
    def _topic_path(cls, value: str) -> str:
        """A bare name is a PushTopic (as before channel kinds); a path must be one of the kinds' shapes."""
        if not value.startswith("/"):
            value = "/topic/" + value
        kind = value.split("/", 2)[1] if value.count("/") >= 2 else ""
        pattern = SALESFORCE_CHANNELS.get(kind)
        if pattern is None:
            raise ValueError("must be /topic/Name (or a bare PushTopic name), /topic/Name?Field=value, "
                             "/event/Name__e, /data/ChangeEvents, /data/<Object>ChangeEvent or /u/Name")
        if not pattern.match(value):
            examples = {"topic": "/topic/Name or /topic/Name?Field=value", "event": "/event/Name__e",
                        "data": "/data/ChangeEvents, /data/<Object>ChangeEvent or /data/Name__chn", "u": "/u/Name"}
            raise ValueError(f"{value!r} is not a valid /{kind}/ channel (expected {examples[kind]})")
        return value

    @field_validator("version")
    @classmethod
    def _version(cls, value: str) -> str:
        if not re.match(r"^\d+\.\d$", value):
            raise ValueError("must look like 58.0")
        return value

    @model_validator(mode="after")
    def _query_for_pushtopics(self) -> SalesforceOptions:
        if self.query is not None and not self.topic.startswith("/topic/"):
            raise field_problem("query", "only a PushTopic (/topic/...) is created from a query; "
                                         f"{self.topic} is defined in the org")
        return self


class SalesforcePubsubOptions(Model):
    topic: str = Field(min_length=1)
    replay: Literal["resume", "new", "all"] = "resume"
    batch: int = Field(default=100, ge=1, le=100)  # Salesforce takes at most 100 per FetchRequest

    @field_validator("topic")
    @classmethod
    def _topic_path(cls, value: str) -> str:
        if not re.match(r"^/(event|data)/[A-Za-z][A-Za-z0-9_]*$", value):
            raise ValueError("must be /event/<Name>__e (Platform Event) or /data/<Object>ChangeEvent, "
                             "/data/ChangeEvents (Change Data Capture)")
        return value


PUSHER_CHANNEL_MAX = 164  # Pusher's limit, prefixes included (docs: "Invalid channel name")
_PUSHER_CHANNEL = re.compile(r"[-A-Za-z0-9_=@,.;]+")  # pusher-http-python `util.channel_name_re`


class PusherOptions(Model):
    channel: str
    event: str | list[str] | None = None
    members: bool = False  # forward presence member_added / member_removed

    @field_validator("channel")
    @classmethod
    def _channel(cls, value: str) -> str:
        """Pusher's own rule, checked at `check` and in the API rather than refused by the server later."""
        if not value:
            raise ValueError("required: a Pusher channel name")
        if len(value) > PUSHER_CHANNEL_MAX:
            raise ValueError(f"at most {PUSHER_CHANNEL_MAX} characters, as Pusher allows (got {len(value)})")
        if not _PUSHER_CHANNEL.fullmatch(value):
            raise ValueError("only letters, digits and _ - = @ , . ; may be used in a Pusher channel name")
        return value

    def wants(self, event_name: str) -> bool:
        if event_name.startswith(("pusher:", "pusher_internal:")):
            return False
        if self.event is None or self.event == "*":
            return True
        return event_name in ([self.event] if isinstance(self.event, str) else self.event)


class ListenerBase(Model):
    id: Id
    name: str = ""
    description: str = ""
    status: bool = True
    mapping: dict[str, str] = Field(default_factory=dict)
    managed_by: Literal["config", "api"] = "config"

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return _check_id(value)

    @field_validator("mapping")
    @classmethod
    def _mapping(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        compile_mapping(value)  # raises ValueError naming the bad field
        limits = (info.context or {}).get("limits")
        if limits is not None:  # the config file and the API check the bounds; a stored listener is not re-judged
            check_bounds(value, limits.mapping_max_fields, limits.mapping_max_path_length,
                         limits.mapping_max_path_segments)
        return value

    def definition(self) -> dict[str, Any]:
        """What a running listener depends on; a change here means a restart."""
        return {"type": self.type, "options": self.options.dump(), "mapping": self.mapping,  # type: ignore
                "status": self.status}


class DatasiftListener(ListenerBase):
    type: Literal["datasift"]
    options: DatasiftOptions


class SalesforceListener(ListenerBase):
    type: Literal["salesforce"]
    options: SalesforceOptions


class SalesforcePubsubListener(ListenerBase):
    type: Literal["salesforce-pubsub"]
    options: SalesforcePubsubOptions


class PusherListener(ListenerBase):
    type: Literal["pusher"]
    options: PusherOptions


Listener = Annotated[DatasiftListener | SalesforceListener | SalesforcePubsubListener | PusherListener,
                     Field(discriminator="type")]


class Tenant(Model):
    id: Id
    name: str = ""
    integrations: Integrations = Field(default_factory=Integrations)
    listeners: list[Listener] = Field(default_factory=list)

    @field_validator("id")
    @classmethod
    def _safe_id(cls, value: str) -> str:
        return _check_id(value)


class Config(Model):
    server: Server = Field(default_factory=Server)
    engine: Engine = Field(default_factory=Engine)
    store: Store = Field(default_factory=Store)
    supervisor: Supervisor = Field(default_factory=Supervisor)
    sources: Sources = Field(default_factory=Sources)
    log: Log = Field(default_factory=Log)
    limits: Limits = Field(default_factory=Limits)
    tenants: list[Tenant] = Field(default_factory=list)
    cluster: Cluster | None = None

    @field_validator("cluster")
    @classmethod
    def _cluster_needs_postgresql(cls, value: Cluster | None, info: ValidationInfo) -> Cluster | None:
        store = info.data.get("store")
        if value is not None and (store is None or store.url is None):
            raise ValueError("only with a PostgreSQL store: set [store] url (a cluster's nodes share it)")
        return value

    @model_validator(mode="after")
    def _backoff_order(self) -> Config:
        if self.supervisor.backoff_max < self.supervisor.backoff_initial:
            raise ValueError("supervisor.backoff-max must not be below supervisor.backoff-initial")
        return self

    def tenant(self, tenant_id: str) -> Tenant | None:
        return next((t for t in self.tenants if t.id == tenant_id), None)

    def secret_values(self) -> list[str]:
        values = [t.token for t in self.server.tokens]
        if self.server.metrics_token:
            values.append(self.server.metrics_token)
        if self.engine.token:
            values.append(self.engine.token)
        values.extend(self.engine.userinfo())
        if self.store.url and (password := urlsplit(self.store.url).password):
            values.append(password)
        for tenant in self.tenants:
            for source_type in SOURCE_TYPES:
                integration = tenant.integrations.get(source_type)
                if integration:
                    values.extend(integration.secret_values())
        return values


# ---------------------------------------------------------------- the stored form
# The store keeps `managed-by` in a column of its own, beside the body; these add and remove it.

_LISTENER: TypeAdapter[ListenerBase] = TypeAdapter(Listener)


def stored_listener(spec: ListenerBase) -> dict[str, Any]:
    body = spec.dump()
    body.pop("managed-by", None)
    return body


def load_listener(body: dict[str, Any], managed_by: str, limits: Limits | None = None) -> ListenerBase:
    """A listener from its stored or requested form; with `limits`, its mapping is held to their bounds."""
    return _LISTENER.validate_python({**body, "managed-by": managed_by},
                                     context={"limits": limits} if limits is not None else None)


def without_secrets(integration: Integration) -> dict[str, Any]:
    """A config-file integration as the store keeps it: its secrets stay in the config."""
    return {k: v for k, v in integration.dump().items() if k not in integration.SECRETS}


def load_integration(kind: str, body: dict[str, Any], managed_by: str) -> Integration:
    return INTEGRATION_TYPES[kind].model_validate({**body, "managed-by": managed_by})
