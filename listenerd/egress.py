"""Where a tenant may make the daemon connect: the egress policy for provider URLs set through the API.

Why: a tenant token can set `login-url`, `stream-url`, `pubsub-url` and Pusher `host`/`port`/`tls`.
Without a policy these turn the daemon into a port scanner and response oracle for the operator's
internal network (the daemon POSTs wherever `login-url` points). So a URL set through the API must
use TLS and name a host of its provider (`*.salesforce.com`, `*.force.com`, `*.pusher.com`,
`*.datasift.com`), unless `[server.egress]` allows more (hosts, suffixes, networks, plaintext).

The name is checked when the integration is set (a 400 naming the field) and the address when the
daemon connects (after DNS resolution, so a name that later resolves, or re-binds, to loopback, a
private range, link-local, the cloud metadata address or an IPv6 ULA is refused and the listener is
`failed`). Config-file integrations are the operator's and are used as given: no policy.

`Policy` holds no I/O but `resolve`/`open_socket`/`connector`, which connect through the same check.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from yarl import URL

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

# a provider's hosts: the name itself or any name below it
PROVIDER_DOMAINS: dict[str, tuple[str, ...]] = {
    "salesforce": ("salesforce.com", "force.com"),
    "pusher": ("pusher.com",),
    "datasift": ("datasift.com",),
}
TLS_SCHEMES = {"http": "https", "ws": "wss"}  # plaintext scheme -> the TLS one to use instead
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*$")
_LEGACY_IPV4 = re.compile(r"^[0-9a-fx.]+$")  # 2130706433, 0x7f.1, 0177.0.0.1, 127.1: inet_aton forms


class EgressRefused(OSError):
    """A connection the egress policy does not allow; `field` names the setting at fault, when known."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


def literal_address(host: str) -> IPAddress | None:
    """The address a host written as an IP literal means, in any form a resolver accepts (dotted, decimal,
    hex, octal, shortened IPv4; bracketed IPv6); None for a name."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def _unwrapped(address: IPAddress) -> IPAddress:
    """An IPv4 address carried in IPv6 (`::ffff:127.0.0.1`, 6to4, NAT64 well-known prefix) as that address."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address.sixtofour is not None:
            return address.sixtofour
        if address in ipaddress.IPv6Network("64:ff9b::/96"):
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def why_internal(address: IPAddress) -> str | None:
    """Why an address is not a public internet one (loopback, private, ...), or None when it is."""
    address = _unwrapped(address)
    if address.is_loopback:
        return "loopback"
    if str(address) == "169.254.169.254" or str(address) == "fd00:ec2::254":
        return "the cloud metadata address"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.IPv6Network("fc00::/7"):
        return "a unique local (ULA) address"
    if address.is_private:
        return "a private (RFC 1918 or reserved) address"
    if not address.is_global:
        return "not a public internet address"
    return None


def normal_host(host: str) -> str:
    """Lower case, no trailing dot, IDNA for non-ASCII names (so a look-alike cannot pass as a suffix)."""
    host = host.strip().rstrip(".").lower()
    try:
        return host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise ValueError(f"{host!r} is not a valid host name") from None


@dataclass(frozen=True)
class Policy:
    """What API-made integrations may connect to beyond their provider: `[server.egress]`."""

    hosts: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()
    plaintext: bool = False

    @classmethod
    def from_settings(cls, settings: Any) -> Policy:
        """From the `[server.egress]` model (hosts, suffixes, networks, plaintext)."""
        return cls(hosts=frozenset(normal_host(h) for h in settings.hosts),
                   suffixes=tuple(normal_host(s).lstrip(".") for s in settings.suffixes),
                   networks=tuple(ipaddress.ip_network(n, strict=False) for n in settings.networks),
                   plaintext=settings.plaintext)

    # -- names (when the integration is set, and again before connecting)

    def allows_host(self, provider: str, host: str) -> bool:
        domains = (*PROVIDER_DOMAINS.get(provider, ()), *self.suffixes)
        return host in self.hosts or any(host == d or host.endswith("." + d) for d in domains)

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in n or _unwrapped(address) in n for n in self.networks)

    def check_host(self, provider: str, host: str, where: str) -> None:
        """Refuse a host that is neither the provider's nor allowed; an IP literal must be in `networks`."""
        try:
            host = normal_host(host)
        except ValueError as exc:
            raise EgressRefused(f"{where}: {exc}", where) from None
        address = literal_address(host)
        if address is not None:
            if not self.allows_address(address):
                raise EgressRefused(f"{where}: an IP address ({address}) is not a {provider} host; "
                                    f"[server.egress] networks does not allow it", where)
            return
        if not _HOST_NAME.match(host):
            raise EgressRefused(f"{where}: {host[:80]!r} is not a valid host name", where)
        if not self.allows_host(provider, host):
            domains = ", ".join(f"*.{d}" for d in PROVIDER_DOMAINS.get(provider, ()))
            raise EgressRefused(f"{where}: host {host!r} is not a {provider} host ({domains}) and "
                                f"[server.egress] does not allow it", where)

    def check_url(self, provider: str, url: str, where: str, schemes: tuple[str, ...]) -> None:
        """`url` must be a plain base URL (no user info, query or fragment) with a TLS scheme of `schemes`
        (or its plaintext twin when `plaintext`), on an allowed host."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise EgressRefused(f"{where}: not a valid URL ({exc})", where) from None
        scheme = parts.scheme.lower()
        allowed = set(schemes) | ({k for k, v in TLS_SCHEMES.items() if v in schemes} if self.plaintext else set())
        if scheme not in allowed:
            raise EgressRefused(f"{where}: must be an {' or '.join(sorted(schemes))} URL "
                                f"(plaintext is allowed only by [server.egress] plaintext)", where)
        if parts.username is not None or parts.password is not None or "@" in parts.netloc:
            raise EgressRefused(f"{where}: must not carry user information", where)
        if parts.query or parts.fragment or "#" in url or "?" in url:
            raise EgressRefused(f"{where}: must not carry a query or fragment", where)
        if not parts.hostname:
            raise EgressRefused(f"{where}: has no host", where)
        if port == 0:
            raise EgressRefused(f"{where}: port 0 is not a port", where)
        self.check_host(provider, parts.hostname, where)

    def check_pusher(self, host: str | None, cluster: str, tls: bool, where: str = "host") -> None:
        if not tls and not self.plaintext:
            raise EgressRefused("tls: must be true (plaintext is allowed only by [server.egress] plaintext)", "tls")
        if host is None and not re.fullmatch(r"[a-z0-9-]{1,32}", cluster):
            raise EgressRefused("cluster: must be a Pusher cluster name (letters, digits, '-')", "cluster")
        self.check_host("pusher", host or f"ws-{cluster}.pusher.com", where if host else "cluster")

    # -- addresses (when connecting)

    def check_address(self, host: str, address: IPAddress) -> None:
        if self.allows_address(address):
            return
        why = why_internal(address)
        if why is not None:
            raise EgressRefused(f"egress refused: {host} resolves to {address}, {why}, which [server.egress] "
                                f"networks does not allow")

    async def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """`getaddrinfo` for a TCP connection, refused when any answer is an internal address: a name that
        re-binds between answers must not get one connection through."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        for info in infos:
            self.check_address(host, ipaddress.ip_address(info[4][0].split("%", 1)[0]))
        return infos

    async def open_socket(self, host: str, port: int, infos: list[tuple[Any, ...]] | None = None) -> socket.socket:
        """A connected, non-blocking TCP socket to a checked address of `host` (for websockets' `sock=`), the
        first of `infos` (`resolve`'s answer, resolved now when not given) that accepts."""
        loop = asyncio.get_running_loop()
        last: OSError = OSError(f"{host} has no address")
        for family, kind, proto, _, address in infos if infos is not None else await self.resolve(host, port):
            sock = socket.socket(family, kind, proto)
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, address)
                return sock
            except OSError as exc:
                sock.close()
                last = exc
            except BaseException:
                sock.close()
                raise
        raise last

    def connector(self, **kwargs: Any) -> Any:
        """An aiohttp connector whose resolver checks every address (IP literals are checked by `check_url`,
        as aiohttp does not resolve them)."""
        import aiohttp

        return aiohttp.TCPConnector(resolver=_CheckedResolver(self), **kwargs)


def session_options(policy: Policy | None) -> dict[str, Any]:
    """aiohttp `ClientSession` keyword arguments that make its connections obey `policy` (none: as given): the
    checking resolver for names, and a check of every request's URL and redirect target for IP literals,
    which aiohttp connects to without asking a resolver."""
    if policy is None:
        return {}
    import aiohttp

    def check(url: Any) -> None:
        host = url.host or ""
        address = literal_address(host)
        if address is not None:
            policy.check_address(host, address)

    async def on_start(session: Any, context: Any, params: Any) -> None:
        check(params.url)

    async def on_redirect(session: Any, context: Any, params: Any) -> None:
        location = params.response.headers.get("Location")
        if location:
            check(params.url.join(URL(location)))

    trace = aiohttp.TraceConfig()
    trace.on_request_start.append(on_start)
    trace.on_request_redirect.append(on_redirect)
    return {"connector": policy.connector(), "trace_configs": [trace]}


async def websocket_options(policy: Policy | None, provider: str, url: str, where: str,
                            timeout: float) -> dict[str, Any]:
    """websockets `connect` keyword arguments that make its connection obey `policy`: a socket already
    connected to a checked address (the host is checked by name first); none without a policy."""
    if policy is None:
        return {}
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme in ("wss", "https") else 80)
    policy.check_host(provider, host, where)
    async with asyncio.timeout(timeout):
        return {"sock": await policy.open_socket(host, port)}


async def grpc_target(policy: Policy | None, provider: str, url: str, where: str,
                      timeout: float) -> tuple[str, list[tuple[str, Any]]]:
    """A gRPC channel's target and options that make its connections obey `policy`.

    gRPC resolves names itself (its own resolver, out of our reach), so with a policy the host is checked
    by name, resolved and checked here, and the channel dials those addresses (`ipv4:`/`ipv6:` target,
    the first one that accepts a TCP connection first, others of its family after it) while TLS verifies
    and names (SNI) the host (`grpc.ssl_target_name_override`) and `:authority` stays `host:port`
    (`grpc.default_authority`): a name re-bound to an internal address is refused before a byte is sent.
    The addresses are pinned for the channel's life; a channel that becomes unreachable is replaced, and
    its successor resolves again. Without a policy: `host:port`, resolved by gRPC.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if policy is None:
        return authority, []
    policy.check_host(provider, host, where)
    async with asyncio.timeout(timeout):
        infos = await policy.resolve(host, port)
        sock = await policy.open_socket(host, port, infos)
    with sock:
        family, first = sock.family, sock.getpeername()[0]
    addresses = [first, *dict.fromkeys(i[4][0] for i in infos if i[0] == family and i[4][0] != first)]
    if family == socket.AF_INET6:
        target = "ipv6:" + ",".join(f"[{a}]:{port}" for a in addresses)
    else:
        target = "ipv4:" + ",".join(f"{a}:{port}" for a in addresses)
    return target, [("grpc.default_authority", authority), ("grpc.ssl_target_name_override", host)]


def refusal(exc: BaseException | None) -> EgressRefused | None:
    """The egress refusal inside a connection error (aiohttp wraps its resolver's errors), if any."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, EgressRefused):
            return exc
        exc = getattr(exc, "os_error", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


class _CheckedResolver:
    """aiohttp's resolver interface around its threaded resolver, answering only checked addresses."""

    def __init__(self, policy: Policy):
        from aiohttp.resolver import ThreadedResolver

        self.policy = policy
        self._inner = ThreadedResolver()

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[dict[str, Any]]:
        answers = await self._inner.resolve(host, port, family)
        for answer in answers:
            self.policy.check_address(host, ipaddress.ip_address(answer["host"].split("%", 1)[0]))
        return answers

    async def close(self) -> None:
        await self._inner.close()


def integration_urls(kind: str, fields: Any) -> Iterable[tuple[str, str, tuple[str, ...]]]:
    """(field, url, TLS schemes) of an integration's URL fields, for `check_integration`."""
    if kind == "salesforce":
        yield "login-url", fields.login_url, ("https",)
        if getattr(fields, "pubsub_url", None):
            yield "pubsub-url", fields.pubsub_url, ("https",)
    elif kind == "datasift":
        yield "stream-url", fields.stream_url, ("wss",)


def check_integration(policy: Policy, integration: Any) -> None:
    """Every URL an API-made integration would connect to, checked by name; EgressRefused names the field."""
    kind = integration.type
    for where, url, schemes in integration_urls(kind, integration):
        policy.check_url(kind, url, where, schemes)
    if kind == "pusher":
        policy.check_pusher(integration.host, integration.cluster, integration.tls)
