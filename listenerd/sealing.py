"""Secrets at rest: the secret fields of API-made integrations are sealed with AES-GCM in the store.

Why: the store holds every tenant's credentials; a copied database file, a backup or a stray
`sqlite3` session must not hand them out. Each secret field is sealed on its own, bound (associated
data) to its tenant, type and field, so a sealed value cannot be moved to another row or field.

The key is 32 random bytes (base64 or raw) in `[store] secrets-key-file`, made for systemd
credentials (`LoadCredential=`); without one, a key is generated beside the store (0600) and the log
says so. Rotation: put the new key in `secrets-key-file` and the old one in `secrets-old-key-files`,
restart (every row is re-sealed with the new key at start), then drop the old file. Config-file
secrets are never stored at all (the config is their home): see `daemon.apply_config_objects`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from listenerd.model import INTEGRATION_TYPES

log = structlog.get_logger("listenerd.store")
PREFIX = "sealed:v1:"
KEY_BYTES = 32
GENERATED_NAME = "secrets.key"


class SealError(ValueError):
    """A sealed value no configured key opens (a key rotated away without keeping the old one)."""


def key_id(key: bytes) -> str:
    return hashlib.sha256(key).hexdigest()[:8]


def parse_key(data: bytes, where: str) -> bytes:
    """32 bytes, given raw or in base64 (one line, as `head -c 32 /dev/urandom | base64` writes it)."""
    text = data.strip()
    if len(data) == KEY_BYTES and not text.isascii():
        return data
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"{where}: must hold {KEY_BYTES} random bytes, raw or in base64")
    return key


def read_key(path: str | Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the secrets key: {exc.strerror or exc}") from None
    return parse_key(data, str(path))


def generated_key(directory: Path) -> tuple[bytes, Path, bool]:
    """The key beside the store (made 0600 when missing); (key, path, made now)."""
    path = directory / GENERATED_NAME
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_key(path), path, False
    with os.fdopen(fd, "wb") as out:
        out.write(base64.b64encode(os.urandom(KEY_BYTES)) + b"\n")
        out.flush()
        os.fsync(out.fileno())
    return read_key(path), path, True


class Sealer:
    """Seals and opens the secret fields of integration bodies; `keys[0]` seals, every key opens."""

    def __init__(self, keys: list[bytes]):
        if not keys:
            raise ValueError("a sealer needs at least one key")
        self.current = key_id(keys[0])
        self._keys = {key_id(k): AESGCM(k) for k in reversed(keys)}
        self._current = self._keys[self.current]

    @classmethod
    def ephemeral(cls) -> Sealer:
        """For an in-memory store: nothing outlives the process, so neither does the key."""
        return cls([os.urandom(KEY_BYTES)])

    @staticmethod
    def _aad(tenant_id: str, kind: str, field: str) -> bytes:
        return f"{tenant_id}\0{kind}\0{field}".encode()

    def seal(self, tenant_id: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        out = dict(body)
        for field in _secret_fields(kind):
            value = out.get(field)
            if isinstance(value, str) and value and not value.startswith(PREFIX):
                nonce = os.urandom(12)
                sealed = self._current.encrypt(nonce, value.encode(), self._aad(tenant_id, kind, field))
                out[field] = f"{PREFIX}{self.current}:{base64.b64encode(nonce + sealed).decode()}"
        return out

    def open(self, tenant_id: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        out = dict(body)
        for field in _secret_fields(kind):
            value = out.get(field)
            if isinstance(value, str) and value.startswith(PREFIX):
                kid, _, data = value.removeprefix(PREFIX).partition(":")
                aead = self._keys.get(kid)
                if aead is None:
                    raise SealError(f"{field} of tenant {tenant_id!r} {kind} integration is sealed with key {kid}, "
                                    f"which is neither [store] secrets-key-file nor in secrets-old-key-files")
                try:
                    raw = base64.b64decode(data)
                    out[field] = aead.decrypt(raw[:12], raw[12:], self._aad(tenant_id, kind, field)).decode()
                except (InvalidTag, ValueError, binascii.Error):
                    raise SealError(f"{field} of tenant {tenant_id!r} {kind} integration does not open with key "
                                    f"{kid}: damaged, or moved from another row") from None
        return out

    def stale(self, kind: str, body: dict[str, Any]) -> bool:
        """Whether a stored body has a secret in plain text or sealed with an old key."""
        return any(isinstance(v := body.get(f), str) and v and not v.startswith(f"{PREFIX}{self.current}:")
                   for f in _secret_fields(kind))


def _secret_fields(kind: str) -> tuple[str, ...]:
    model = INTEGRATION_TYPES.get(kind)
    return model.SECRETS if model is not None else ()


def sealer_for(settings: Any, store_path: str) -> Sealer:
    """The store's sealer from `[store]`: the key file and old key files, else a key beside the store."""
    if store_path == ":memory:":
        return Sealer.ephemeral()
    old = [read_key(p) for p in settings.secrets_old_key_files]
    if settings.secrets_key_file:
        return Sealer([read_key(settings.secrets_key_file), *old])
    key, path, made = generated_key(Path(store_path).parent)
    if made:
        log.warning("generated a secrets key beside the store; keep it with the store's backups, or set "
                    "[store] secrets-key-file (e.g. a systemd credential)", path=str(path))
    return Sealer([key, *old])
