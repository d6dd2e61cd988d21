"""`listenerd status`: the running daemon's listeners as a table, read through its API like any client.

Where to ask, and with what, in this order: `--url`, else `http://<server.listen>` of the config
(`--config`, else $LISTENERD_CONFIG, else /etc/listenerd/listenerd.toml; only its `[server]` table is
read, so the integrations' secrets need not be in the shell); `--token`, else $LISTENERD_TOKEN, else
the config's first token that may use `--tenant` (the first token without `--tenant`). The tenants
shown are those `GET /1.0/tenants` lists for the token, or `--tenant` alone.

What it costs at thousands of listeners: per tenant one summary (`GET .../listeners/status`: the
counts, the exit code, and every listener not `started` with its status), then the `started` ones
a page at a time (`?status=started`, following `Link: rel="next"`), each one's status asked only
when its row is shown: at most `--rows` per tenant unless `--all` (or `--json`, which is complete).

Exit codes: 0 every enabled listener `started`, 3 not, 1 the daemon is unreachable or refuses the
token, 2 bad usage or config.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote, urljoin, urlsplit

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from listenerd import config as config_module

EXIT_OK, EXIT_FATAL, EXIT_USAGE, EXIT_NOT_STARTED = 0, 1, 2, 3
TOKEN_ENV = "LISTENERD_TOKEN"
ORDER = {"failed": 0, "retrying": 1, "starting": 2, "stopped": 3, "started": 4}  # trouble first
STYLES = {"failed": "bold red", "retrying": "yellow", "starting": "cyan", "started": "green", "stopped": "dim"}
_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')
DEFAULT_ROWS = 100  # started listeners shown per tenant; those not started are always shown
PAGE_SIZE = 1000  # the API's largest page: the fewest list requests


class Unusable(Exception):
    """The daemon cannot be asked (unreachable, token refused, answer not understood): one line, exit 1."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.code = code  # the HTTP status that said no, when one did


class Usage(Exception):
    """Nothing to ask with (no URL or token to be found): one line, exit 2."""


@dataclass
class Target:
    url: str
    token: str


def find_target(config_path: str | None, url: str | None, token: str | None, tenant: str | None,
                environ: dict[str, str] | None = None) -> Target:
    """The daemon's base URL and a token, from the options, the environment and the config (see the module doc)."""
    env = dict(os.environ if environ is None else environ)
    token = token or env.get(TOKEN_ENV) or None
    if url and token:
        return Target(url.rstrip("/"), token)
    path = config_path or env.get("LISTENERD_CONFIG") or config_module.DEFAULT_PATH
    try:
        server = config_module.load_server(path, env)
    except config_module.ConfigError as exc:
        missing = " and ".join(name for name, value in (("--url", url), ("--token", token)) if not value)
        raise Usage(f"{exc.problems[0]} (give {missing}, or a readable --config)") from None
    if not url:
        host = server.host
        host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        url = f"http://[{host}]:{server.port}" if ":" in host else f"http://{host}:{server.port}"
    if not token:
        usable = [t for t in server.tokens if tenant is None or t.allows(tenant)]
        if not usable:
            raise Usage(f"{path}: no token in server.tokens" + (f" may use tenant {tenant!r}" if tenant else "")
                        + f" (give --token or ${TOKEN_ENV})")
        token = usable[0].token
    return Target(url.rstrip("/"), token)


class Client:
    """A small keep-alive HTTP client for the API: GET and JSON, errors as `Unusable` with the daemon's words."""

    def __init__(self, target: Target, timeout: float = 10.0):
        self.target = target
        parts = urlsplit(target.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise Usage(f"--url: {target.url!r} is not an http:// or https:// URL")
        self._parts = parts
        self._timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self._parts.scheme == "https" else http.client.HTTPConnection
            self._conn = kind(self._parts.hostname, self._parts.port, timeout=self._timeout)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def get(self, path: str) -> tuple[Any, str | None]:
        """(JSON body, URL of the next page from a `Link: rel="next"` header or None)."""
        headers = {"Authorization": f"Bearer {self.target.token}", "Accept": "application/json"}
        for attempt in (1, 2):  # a kept-alive connection the daemon closed meanwhile: once more on a new one
            try:
                conn = self._connection()
                conn.request("GET", self._parts.path.rstrip("/") + path, headers=headers)
                response = conn.getresponse()
                body = response.read()
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if attempt == 2:
                    raise Unusable(f"cannot reach the daemon at {self.target.url}: {exc}") from None
            except OSError as exc:
                self.close()
                reason = exc.strerror or str(exc) or type(exc).__name__
                raise Unusable(f"cannot reach the daemon at {self.target.url}: {reason} "
                               f"(is it running? --url or the config's server.listen say where)") from None
        if response.status == 401:
            raise Unusable(f"the daemon at {self.target.url} refused the token (401): give a token from its "
                           f"server.tokens (--token or ${TOKEN_ENV})")
        if response.status >= 400:
            try:
                reason = json.loads(body)["error"]
            except (ValueError, KeyError, TypeError):
                reason = body[:200].decode("utf-8", "replace")
            raise Unusable(f"GET {path}: {response.status} {reason}", response.status)
        try:
            data = json.loads(body)
        except ValueError:
            raise Unusable(f"GET {path}: the answer is not JSON (is {self.target.url} a listenerd?)") from None
        link = response.getheader("Link")
        found = _NEXT.search(link) if link else None
        return data, (urljoin(self.target.url + path, found.group(1)) if found else None)

    def pages(self, path: str) -> Iterator[Any]:
        """A list route's items, page after page through `Link: rel="next"`; stop early, and no more pages are read."""
        while True:
            page, following = self.get(path)
            yield from page
            if following is None:
                return
            parts = urlsplit(following)
            path = parts.path.removeprefix(self._parts.path.rstrip("/")) + (f"?{parts.query}" if parts.query else "")


@dataclass
class Snapshot:
    """What one look at the daemon found: the rows shown, and the tenants' counts (shown or not)."""

    rows: list[dict[str, Any]] = field(default_factory=list)  # {"tenant-id", "listener", "status"}
    taken_at: float = field(default_factory=time.time)
    counts: dict[str, int] | None = None  # per status, every listener of the tenants (None: count the rows)
    hidden: int = 0  # `started` listeners not shown (beyond --rows)

    @property
    def all_started(self) -> bool:
        # every listener not started is a row (the summary lists them all), so the rows decide
        return all(row["status"]["status"] == "started" for row in self.rows if row["listener"].get("status"))

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.all_started else EXIT_NOT_STARTED


def take(client: Client, tenant: str | None, rows: int | None = DEFAULT_ROWS, complete: bool = False) -> Snapshot:
    """Per tenant: the summary, then `started` listeners' statuses for the rows shown (see the module doc).

    `rows` bounds the started rows per tenant (None: all); `complete` lists every listener with its
    whole object (for --json), statuses of those not started still from the summary.
    """
    tenants = [tenant] if tenant else [t["id"] for t in client.get("/1.0/tenants")[0]]
    snapshot = Snapshot(counts={})
    for tid in tenants:
        base = f"/1.0/tenants/{quote(tid, safe='')}/listeners"
        health, _ = client.get(f"{base}/status")
        for state, count in health["counts"].items():
            snapshot.counts[state] = snapshot.counts.get(state, 0) + count
        trouble = {entry["id"]: entry for entry in health["not-started"]}
        if not complete:
            snapshot.rows.extend(_trouble_row(tid, entry) for entry in trouble.values())
        bound = None if complete else rows
        shown = 0
        if bound != 0:
            size = PAGE_SIZE if bound is None else max(1, min(PAGE_SIZE, bound))
            query = f"?limit={size}" + ("" if complete else "&status=started")
            for listener in client.pages(base + query):
                if listener["id"] in trouble:
                    if complete:
                        snapshot.rows.append({**_trouble_row(tid, trouble[listener["id"]]), "listener": listener})
                    continue
                status = _status(client, base, listener["id"])
                if status is not None:
                    snapshot.rows.append({"tenant-id": tid, "listener": listener, "status": status})
                    shown += 1
                if bound is not None and shown >= bound:
                    break  # before the generator asks for a page nobody will see
        snapshot.hidden += max(0, health["counts"].get("started", 0) - shown)
    return snapshot


def _trouble_row(tid: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A row from a summary's `not-started` entry: its status is the entry's, no request of its own."""
    listener = {"id": entry["id"], "name": entry.get("name"), "type": entry.get("type"), "status": entry["enabled"]}
    status = {key: value for key, value in entry.items() if key not in ("id", "name", "type", "enabled")}
    return {"tenant-id": tid, "listener": listener, "status": status}


def _status(client: Client, base: str, listener_id: str) -> dict[str, Any] | None:
    try:
        status, _ = client.get(f"{base}/{quote(listener_id, safe='')}/status")
    except Unusable as exc:
        if exc.code == 404:  # deleted since the list was read
            return None
        if exc.code != 503:
            raise
        # created a moment ago (not loaded yet), or the store fails: shown, and not `started`
        status = {"status": "starting", "message": str(exc), "last-error": str(exc)}
    return status


def ordered(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Grouped by tenant (in the daemon's order), `failed` then `retrying` first within each, then by id."""
    tenant_rank: dict[str, int] = {}
    for row in rows:
        tenant_rank.setdefault(row["tenant-id"], len(tenant_rank))
    return sorted(rows, key=lambda r: (tenant_rank[r["tenant-id"]], ORDER.get(r["status"]["status"], 9),
                                       _natural(r["listener"]["id"])))


def _natural(text: str) -> tuple[Any, ...]:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text))


def age(since: str | None, now: float) -> str:
    """'3m12s' since an RFC 3339 time; '-' when there is none."""
    if not since:
        return "-"
    try:
        seconds = max(0, int(now - datetime.fromisoformat(since.replace("Z", "+00:00")).timestamp()))
    except ValueError:
        return since
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def table(snapshot: Snapshot) -> Table:
    """The listeners as a rich table: one section per tenant, long cells cut with an ellipsis to fit."""
    grid = Table(box=None, header_style="bold", pad_edge=False, expand=True)  # the error column takes what is left
    grid.add_column("TENANT", no_wrap=True)
    grid.add_column("ID", no_wrap=True)
    grid.add_column("TYPE", no_wrap=True)
    grid.add_column("STATUS", no_wrap=True)
    grid.add_column("SINCE", no_wrap=True, justify="right")
    grid.add_column("RECEIVED", no_wrap=True, justify="right")
    grid.add_column("FORWARDED", no_wrap=True, justify="right")
    grid.add_column("RATE/S", no_wrap=True, justify="right")
    grid.add_column("LAST ERROR", no_wrap=True, overflow="ellipsis", ratio=1, min_width=10)
    previous = None
    for row in ordered(snapshot.rows):
        listener, status = row["listener"], row["status"]
        if previous is not None and row["tenant-id"] != previous:
            grid.add_section()
        previous = row["tenant-id"]
        state = status["status"] if listener.get("status") else f"{status['status']} (disabled)"
        rate = status.get("rate")
        grid.add_row(row["tenant-id"], listener["id"], listener.get("type", "?"),
                     Text(state, style=STYLES.get(status["status"], "")), age(status.get("since"), snapshot.taken_at),
                     str(status.get("received", 0)), str(status.get("forwarded", 0)),
                     "-" if rate is None else f"{rate:.2f}", Text(status.get("last-error") or "-", style="red"
                                                                 if status.get("last-error") else "dim"))
    return grid


def summary(snapshot: Snapshot) -> Text:
    counts = snapshot.counts
    if counts is None:
        counts = {}
        for row in snapshot.rows:
            counts[row["status"]["status"]] = counts.get(row["status"]["status"], 0) + 1
    parts = [f"{counts[s]} {s}" for s in ORDER if counts.get(s)]
    verdict = ("all enabled listeners started" if snapshot.all_started else "not every enabled listener is started")
    hidden = f"; {snapshot.hidden} started not shown (--rows N or --all shows them)" if snapshot.hidden else ""
    return Text(f"{sum(counts.values())} listener(s): {', '.join(parts) or 'none'}; {verdict}{hidden}",
                style="green" if snapshot.all_started else "yellow")


def view(snapshot: Snapshot) -> Group:
    return Group(table(snapshot), summary(snapshot))


def status(config_path: str | None, url: str | None, token: str | None, tenant: str | None, *, watch: bool = False,
           as_json: bool = False, interval: float = 2.0, rows: int | None = DEFAULT_ROWS,
           console: Console | None = None, err: TextIO | None = None) -> int:
    """The `listenerd status` command; returns its exit code. Problems go to `err` (stderr) as one plain line."""
    console = console or Console()
    err = err or sys.stderr
    try:
        client = Client(find_target(config_path, url, token, tenant))
    except Usage as exc:
        print(f"listenerd status: {exc}", file=err)
        return EXIT_USAGE
    try:
        if watch and not as_json:
            return _watch(client, tenant, interval, rows, console)
        snapshot = take(client, tenant, rows, complete=as_json)
    except Unusable as exc:
        print(f"listenerd status: {exc}", file=err)
        return EXIT_FATAL
    finally:
        client.close()
    if as_json:
        print(json.dumps(snapshot.rows, indent=2, ensure_ascii=False), file=console.file)
    else:
        console.print(view(snapshot))
    return snapshot.exit_code


def _watch(client: Client, tenant: str | None, interval: float, rows: int | None, console: Console) -> int:
    """Refresh in place until Ctrl-C; a daemon that goes away is shown, and asked again, not an exit."""
    code = EXIT_FATAL
    with Live(console=console, auto_refresh=False, transient=False) as live:
        try:
            while True:
                try:
                    snapshot = take(client, tenant, rows)
                    code = snapshot.exit_code
                    live.update(Group(view(snapshot), Text(f"every {interval:g}s; Ctrl-C to stop", style="dim")),
                                refresh=True)
                except Unusable as exc:
                    code = EXIT_FATAL
                    live.update(Text(f"listenerd status: {exc} (asking again every {interval:g}s)", style="red"),
                                refresh=True)
                time.sleep(interval)
        except KeyboardInterrupt:
            pass
    return code


def main_args(args: Any) -> int:
    return status(args.config, args.url, args.token, args.tenant, watch=args.watch, as_json=args.json,
                  interval=args.interval, rows=None if args.all else args.rows)
