"""What every connection to a provider or to the engine shares: TLS contexts, error words, masking."""

from __future__ import annotations

import functools
import re
import ssl

from listenerd import version
from listenerd.model import SECRET_MASK

# aiohttp's connection errors name the TLS context by its repr (`ssl:<ssl.SSLContext object at 0x7f..>`):
# an address in our memory and no help to anyone reading a status
_SSL_REPR = re.compile(r" ?ssl:<[^>]*>")
_REPR = re.compile(r"<([\w.]+) object at 0x[0-9a-fA-F]+>")


@functools.lru_cache(maxsize=8)
def client_tls(ca_bundle: str | None = None) -> ssl.SSLContext:
    """A verifying client context, against `ca_bundle` or the system's CAs; one per bundle, shared by every
    connection (a context costs memory, and they are many)."""
    return ssl.create_default_context(cafile=ca_bundle) if ca_bundle else ssl.create_default_context()


@functools.lru_cache(maxsize=8)
def user_agent(node: str | None = None) -> str:
    """The `User-Agent` of every provider connection: the product and version, and in a cluster the node, so a
    provider (and our simulators) can tell which node holds a connection."""
    return f"listenerd/{version()} (node {node})" if node else f"listenerd/{version()}"


def describe(exc: BaseException, limit: int | None = None) -> str:
    """A connection error in a few words for a status message: no traceback, no class zoo."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = _REPR.sub(lambda m: m.group(1).rsplit(".", 1)[-1], _SSL_REPR.sub("", str(exc))) or type(exc).__name__
    return text[:limit] if limit is not None else text


def sanitised(text: str, limit: int = 160) -> str:
    """An upstream's words as a short, printable reason: control characters and markup runs collapsed, cut at
    `limit`. A status message may quote a provider, never relay an arbitrary server's answer."""
    cleaned = " ".join("".join(c if c.isprintable() and c not in "<>" else " " for c in text).split())
    return cleaned if len(cleaned) <= limit else cleaned[:limit - 1] + "…"


def kind_of(exc: BaseException) -> str:
    """The outcome kind of a connection error: "timeout" when nothing answered in time, else "network"."""
    return "timeout" if isinstance(exc, TimeoutError) else "network"


def mask(text: str, *secrets: str, shortest: int = 1) -> str:
    """`text` with every secret of at least `shortest` characters replaced by the mask."""
    for secret in secrets:
        if secret and len(secret) >= shortest and secret in text:
            text = text.replace(secret, SECRET_MASK)
    return text
