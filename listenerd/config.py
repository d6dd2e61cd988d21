"""Load a TOML config into the one validated `Config` model, or a list of `location: problem`.

Before validation the raw tree is walked once: `${VAR}` is expanded from the environment and
every `<secret>-file` key is replaced by the file's content (systemd credentials), each problem
recorded at the key that caused it. After validation, cross-object rules (unique ids, each
listener's integration present, tokens naming known tenants) are checked the same way.
"""

from __future__ import annotations

import os
import re
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from listenerd.model import (
    INTEGRATION_TYPES,
    LISTENER_TYPES,
    SOURCE_TYPES,
    Config,
    Limits,
    Server,
    integration_type,
    reserved_listener_id,
)

DEFAULT_PATH = "/etc/listenerd/listenerd.toml"
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_FILE_SUFFIX = "-file"
_TAGS = set(LISTENER_TYPES)
_UNSET = "<unset-value-reported-above>"  # stands in for a missing value so validation can go on
MAX_SECRET_FILE_BYTES = 65_536
MAX_CONFIG_BYTES = 16 * 1_048_576
MAX_DEPTH = 32  # tables and arrays nested deeper than any listenerd config: refused before validation
# the keys a `<key>-file` may stand for: secrets only (every other `-file` key is a key of its own)
SECRET_FIELDS = frozenset({"token", "private-key"} | {s for t in INTEGRATION_TYPES.values() for s in t.SECRETS})
_MAPPING_PROBLEM = re.compile(r"^mapping\.(?P<field>[^:]+): (?P<problem>.*)$", re.S)


@dataclass(frozen=True)
class Problem:
    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(Exception):
    """A config that does not validate; `problems` holds every finding, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def default_path() -> str:
    return os.environ.get("LISTENERD_CONFIG") or DEFAULT_PATH


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate; raise ConfigError with every problem found."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read config: {exc.strerror or exc}")]) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError([Problem(str(path), f"larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError([Problem(f"{path}:{line}", f"not UTF-8 text (byte {exc.start})")]) from None
    return parse(text, environ, base_dir=Path(path).parent, name=str(path))


def load_server(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Server:
    """Only the `[server]` table (address and tokens), for clients of a running daemon such as
    `listenerd status`: an operator's shell need not hold the integrations' secrets to read it."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read config: {exc.strerror or exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(str(path), f"not valid TOML: {exc}")]) from None
    problems: list[Problem] = []
    server = _expand(raw.get("server", {}), ("server",), os.environ if environ is None else environ,
                     Path(path).parent, problems)
    if problems:
        raise ConfigError(problems)
    try:
        return Server.model_validate(server)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, ("server",))) from None


def parse(text: str, environ: Mapping[str, str] | None = None, *, base_dir: Path | None = None,
          name: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([Problem(name, f"not valid TOML: {exc}")]) from None
    except RecursionError:
        raise ConfigError([Problem(name, f"nested too deeply to be a listenerd config (over {MAX_DEPTH} levels)")]) \
            from None
    if (deep := _too_deep(raw, ())) is not None:
        raise ConfigError([Problem(location(deep), f"nested too deeply to be a listenerd config "
                                                   f"(over {MAX_DEPTH} levels)")])
    problems: list[Problem] = []
    expanded = _expand(raw, (), os.environ if environ is None else environ, base_dir or Path("."), problems)
    try:
        config = validate(expanded)  # validated even when a value is missing: every problem in one report
    except ConfigError as exc:
        reported = {p.location for p in problems}  # `x-file` unreadable: its stand-in for `x` is not a finding
        reported |= {p.location.removesuffix(_FILE_SUFFIX) for p in problems if p.location.endswith(_FILE_SUFFIX)}
        raise ConfigError(problems + [p for p in exc.problems if p.location not in reported]) from None
    if problems:
        raise ConfigError(problems)
    return config


def _too_deep(node: Any, loc: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if len(loc) > MAX_DEPTH:
        return loc
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if (found := _too_deep(value, loc + (key,))) is not None:
            return found
    return None


def validate(data: dict[str, Any]) -> Config:
    try:
        limits = Limits.model_validate(data.get("limits") or {})
    except (ValidationError, TypeError):
        limits = Limits()  # its own problems are reported by the validation below
    try:
        config = Config.model_validate(data, context={"limits": limits})
    except ValidationError as exc:
        raise ConfigError(format_errors(exc)) from None
    problems = list(cross_check(config))
    if problems:
        raise ConfigError(problems)
    return config


def location(loc: Iterable[Any]) -> str:
    """('tenants', 0, 'listeners', 1, 'options', 'hash') -> 'tenants[0].listeners[1].options.hash'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def format_errors(exc: ValidationError, prefix: tuple[Any, ...] = ()) -> list[Problem]:
    problems = []
    for error in exc.errors(include_url=False):
        loc = list(prefix) + list(error["loc"])
        # A discriminated union puts the tag in the location (listeners[0].datasift.options): drop it.
        loc = [p for i, p in enumerate(loc) if not (p in _TAGS and (i == 0 or isinstance(loc[i - 1], int)))]
        kind, message = error["type"], error["msg"]
        if kind == "missing":
            message = "required"
        elif kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "union_tag_invalid":
            loc.append("type")
            message = f"unknown listener type {error['input'].get('type')!r} (expected one of: " \
                      f"{', '.join(LISTENER_TYPES)})"
        elif kind == "union_tag_not_found":
            loc.append("type")
            message = "required"
        elif kind == "field_problem":  # a whole-object rule naming one field (model.field_problem)
            loc.append(error["ctx"]["field"])
            message = error["ctx"]["problem"]
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        if loc and loc[-1] == "mapping" and (found := _MAPPING_PROBLEM.match(message)):
            loc.append(found["field"])  # the mapping's field belongs in the location, not the message
            message = found["problem"]
        problems.append(Problem(location(loc), message))
    return problems


def cross_check(config: Config) -> Iterable[Problem]:
    tenant_ids = set()
    for t_index, tenant in enumerate(config.tenants):
        if tenant.id in tenant_ids:
            yield Problem(f"tenants[{t_index}].id", f"duplicate tenant id {tenant.id!r}")
        tenant_ids.add(tenant.id)
        listener_ids = set()
        for l_index, listener in enumerate(tenant.listeners):
            where = f"tenants[{t_index}].listeners[{l_index}]"
            if (reserved := reserved_listener_id(listener.id)) is not None:
                yield Problem(f"{where}.id", reserved)
            elif listener.id in listener_ids:
                yield Problem(f"{where}.id", f"duplicate listener id {listener.id!r} in tenant {tenant.id!r}")
            listener_ids.add(listener.id)
            kind = integration_type(listener.type)
            if tenant.integrations.get(kind) is None:
                yield Problem(f"{where}.type", f"no {kind} integration: add "
                                               f"[tenants.integrations.{kind}] to tenant {tenant.id!r}")
    names = set()
    for index, token in enumerate(config.server.tokens):
        if token.name in names:
            yield Problem(f"server.tokens[{index}].name", f"duplicate token name {token.name!r}")
        names.add(token.name)
        for t_index, tenant_id in enumerate(token.tenants):
            if tenant_id != "*" and tenant_id not in tenant_ids:
                yield Problem(f"server.tokens[{index}].tenants[{t_index}]", f"unknown tenant {tenant_id!r}")


def _expand(node: Any, loc: tuple[Any, ...], environ: Mapping[str, str], base_dir: Path,
            problems: list[Problem]) -> Any:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, str) and _is_secret_file_key(key):
                target = key.removesuffix(_FILE_SUFFIX)
                where = location(loc + (key,))
                if target in node:
                    problems.append(Problem(where, f"give either {target} or {key}, not both"))
                    continue
                file_path = Path(_expand(value, loc + (key,), environ, base_dir, problems))
                file_path = file_path if file_path.is_absolute() else base_dir / file_path
                try:
                    out[target] = read_secret_file(file_path)
                except (OSError, ValueError) as exc:
                    problems.append(Problem(where, f"cannot read secret file {str(file_path)!r}: "
                                                   f"{getattr(exc, 'strerror', None) or exc}"))
                    out[target] = _UNSET  # reported above; a stand-in lets the rest be validated
                continue
            out[key] = _expand(value, loc + (key,), environ, base_dir, problems)
        return out
    if isinstance(node, list):
        return [_expand(item, loc + (i,), environ, base_dir, problems) for i, item in enumerate(node)]
    if isinstance(node, str) and "$" in node:
        return _substitute(node, loc, environ, problems)
    return node


def _is_secret_file_key(key: str) -> bool:
    return key.endswith(_FILE_SUFFIX) and key.removesuffix(_FILE_SUFFIX) in SECRET_FIELDS


def read_secret_file(path: Path) -> str:
    """A secret file's text: a regular file (a FIFO would block, a device never ends), at most
    MAX_SECRET_FILE_BYTES, UTF-8. Opened without following a FIFO's open-blocking, then checked by fstat."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file (a FIFO, device or directory cannot hold a secret)")
        if info.st_size > MAX_SECRET_FILE_BYTES:
            raise ValueError(f"larger than {MAX_SECRET_FILE_BYTES} bytes; a secret is smaller")
        data = os.read(fd, MAX_SECRET_FILE_BYTES + 1)
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None


def file_warnings(path: str | os.PathLike[str]) -> list[Problem]:
    """`secret_file_warnings` of a config file that loads."""
    try:
        raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    return secret_file_warnings(raw, Path(path).parent)


def secret_file_warnings(raw: Any, base_dir: Path, loc: tuple[Any, ...] = ()) -> list[Problem]:
    """What `listenerd check` warns about secret files: readable by group or others, or a symlink."""
    found: list[Problem] = []
    if isinstance(raw, dict):
        for key, value in raw.items():
            where = loc + (key,)
            if key.endswith(_FILE_SUFFIX) and isinstance(value, str) and "$" not in value \
                    and key.removesuffix(_FILE_SUFFIX) in SECRET_FIELDS:
                path = Path(value) if Path(value).is_absolute() else base_dir / value
                try:
                    if path.is_symlink():
                        found.append(Problem(location(where), f"{path} is a symlink; point at the file itself"))
                    mode = path.stat().st_mode
                except OSError:
                    continue
                if mode & 0o077:
                    found.append(Problem(location(where), f"{path} is readable by group or others "
                                                          f"(mode {stat.S_IMODE(mode):04o}); chmod 600 it"))
            else:
                found += secret_file_warnings(value, base_dir, where)
    elif isinstance(raw, list):
        for index, item in enumerate(raw):
            found += secret_file_warnings(item, base_dir, loc + (index,))
    return found


def _substitute(text: str, loc: tuple[Any, ...], environ: Mapping[str, str], problems: list[Problem]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1)
        if name not in environ:
            problems.append(Problem(location(loc), f"environment variable {name} is not set"))
            return _UNSET
        return environ[name]

    return _VAR.sub(replace, text)


def summary(config: Config) -> str:
    """What `listenerd check` prints on success."""
    lines = [f"config ok: {len(config.tenants)} tenant(s), "
             f"{sum(len(t.listeners) for t in config.tenants)} listener(s), "
             f"{len(config.server.tokens)} API token(s)",
             f"  api: http://{config.server.listen}  engine: {config.engine.public_url}  store: {config.store.path}"]
    for tenant in config.tenants:
        kinds = [k for k in SOURCE_TYPES if tenant.integrations.get(k)]
        lines.append(f"  tenant {tenant.id} ({tenant.name or '-'}): integrations {', '.join(kinds) or 'none'}")
        for listener in tenant.listeners:
            state = "enabled" if listener.status else "disabled"
            lines.append(f"    {listener.id} {listener.type} {state}: {_describe(listener)}"
                         f", mapping {len(listener.mapping)} field(s)")
    return "\n".join(lines)


def _describe(listener: Any) -> str:
    options = listener.options
    match listener.type:
        case "datasift":
            return f"stream {options.hash}"
        case "salesforce":
            return f"topic {options.topic} (replay {options.replay})"
        case "salesforce-pubsub":
            return f"Pub/Sub topic {options.topic} (replay {options.replay}, batch {options.batch})"
        case _:
            return f"channel {options.channel}"
