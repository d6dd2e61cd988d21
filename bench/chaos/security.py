"""Chaos 6, security checks: every route without a token, with another tenant's token, with path
traversal and oversized ids; then every secret value searched for in every log line and answer.
Then one tenant against another (issue 17): mapping amplification with two tenants, slowloris,
a /metrics flood and the quotas, each measured by what the other tenant still gets.
Part A of that issue adds `ssrf` (a tenant pointing the daemon at an internal service, in every form) and
`poisoning` (secrets that would blind the log, and 2,000 integration updates).

Why: the API is the daemon's only door and holds credentials. A route that forgets the token check,
lets one tenant read another's objects, turns `..` into something meaningful, or answers a 500 to a
silly id, is found here by brute enumeration, not by reading the code. The secrets are fresh random
values for each run (tokens, engine token, every integration secret), so any hit is a real leak.

    .venv/bin/python -m bench.chaos.security [--write] [--only routes|part-a|amplification|slowloris|metrics|quota]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json  # noqa: E402
import secrets as secret_values  # noqa: E402

from aiohttp import web  # noqa: E402

from bench.chaos.rig import OTHER_TENANT, TENANT, Rig, header, loadavg, sample, write_section  # noqa: E402
from listenerd.observability import SecretRedactor  # noqa: E402
from listenerd.testing import wait_for  # noqa: E402

# (method, path template, body) for every route of CONTRACT section 3 below /1.0
ROUTES: list[tuple[str, str, Any]] = [
    ("GET", "/1.0/tenants/{t}/listeners", None),
    ("POST", "/1.0/tenants/{t}/listeners", {"name": "x", "type": "pusher", "options": {"channel": "c"}}),
    ("GET", "/1.0/tenants/{t}/listeners/{id}", None),
    ("PUT", "/1.0/tenants/{t}/listeners/{id}", {"name": "y"}),
    ("DELETE", "/1.0/tenants/{t}/listeners/{id}", None),
    ("GET", "/1.0/tenants/{t}/listeners/{id}/status", None),
    ("POST", "/1.0/tenants/{t}/listeners/{id}/restart", None),
    ("GET", "/1.0/tenants/{t}/listeners/{id}/checkpoint", None),
    ("PUT", "/1.0/tenants/{t}/listeners/{id}/checkpoint", {"replay": -1}),
    ("GET", "/1.0/tenants/{t}/listeners/{id}/tap", None),
    ("GET", "/1.0/tenants/{t}/dead-letters", None),
    ("POST", "/1.0/tenants/{t}/dead-letters/{id}/retry", None),
    ("DELETE", "/1.0/tenants/{t}/dead-letters/{id}", None),
    ("GET", "/1.0/tenants/{t}/integrations", None),
    ("GET", "/1.0/tenants/{t}/integrations/{id}", None),
    ("POST", "/1.0/tenants/{t}/integrations/{id}", {"key": "k", "secret": "s"}),
]
TRAVERSAL = ["..", "%2e%2e", "..%2f..%2fetc%2fpasswd", "..%2F..%2F..%2Fetc%2Fshadow", "%2e%2e%5c%2e%2e%5cwindows",
             "....%2f%2f", "%00", "P0%00.json", "%252e%252e%252f", "..;", "%c0%ae%c0%ae", "~root"]
OVERSIZED = ["a" * 65, "L" * 1_000, "x" * 8_000]


async def call(rig: Rig, method: str, path: str, token: Any, body: Any = None) -> tuple[int, Any]:
    """One request; the tap route is an endless stream, so only its status line and first bytes are read."""
    assert rig.api is not None
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    session = rig.api.session
    async with session.request(method, rig.api.base_url + path, json=body, headers=headers) as response:
        if response.content_type == "text/event-stream":
            return response.status, "(event stream)"
        text = await response.text()
    rig.responses.append(text)
    return response.status, text


async def run(workdir: Path, say: Any = print) -> dict[str, Any]:
    rig = Rig(workdir)
    findings: list[str] = []
    labels = ("no token", "wrong token", "other tenant's token", "path traversal", "oversized id")
    table: dict[str, Counter[int]] = {label: Counter() for label in labels}
    try:
        await rig.start()
        await rig.start_daemon()
        await rig.wait_all_started()
        s = rig.secrets
        for method, template, body in ROUTES:
            ident = "pusher" if "integrations/{id}" in template else ("1" if "dead-letters" in template else "P0")
            path = template.format(t=TENANT, id=ident)
            for label, token, want in (("no token", None, 401), ("wrong token", "not-a-token-at-all", 401),
                                       ("other tenant's token", s.other_token, 403)):
                code, text = await call(rig, method, path, token, body)
                table[label][code] += 1
                if code != want:
                    findings.append(f"{label}: {method} {path} -> {code} (want {want}) {text[:120]}")
            for label, idents in (("path traversal", TRAVERSAL), ("oversized id", OVERSIZED)):
                for bad in idents:
                    for where in ("id", "tenant"):
                        if where == "id" and "{id}" not in template:
                            continue
                        p = template.format(t=bad if where == "tenant" else TENANT, id=bad if where == "id" else ident)
                        code, text = await call(rig, method, p, s.ops_token, body)
                        table[label][code] += 1
                        # 400 (bad id), 403 (not this token's tenant), 404 (no such thing), 429 (the tenant's
                        # write quota); never 2xx or 5xx
                        if code not in (400, 403, 404, 405, 414, 429, 431):
                            findings.append(f"{label}: {method} {p[:120]} -> {code} {text[:120]}")
        # an integration answer must mask its secrets (the answers are also in the secret search below)
        code, text = await call(rig, "GET", f"/1.0/tenants/{TENANT}/integrations", s.ops_token)
        assert code == 200, (code, text)
        # the other tenant's token sees its own tenant only
        code, text = await call(rig, "GET", f"/1.0/tenants/{OTHER_TENANT}/listeners", s.other_token)
        if code != 200 or "P0" in text:
            findings.append(f"other tenant's own listing: {code} {text[:120]}")
        alive = rig.daemon is not None and rig.daemon.process is not None and rig.daemon.process.poll() is None
        await rig.stop()
        hits = rig.secret_hits()
    finally:
        await rig.stop()
    result = {"table": {k: dict(sorted(v.items())) for k, v in table.items()}, "findings": findings,
              "requests": sum(sum(v.values()) for v in table.values()) + 2, "alive": alive, "hits": hits,
              "log_lines": len(rig.daemon.lines()) if rig.daemon else 0, "answers": len(rig.responses)}
    for line in findings:
        say("FINDING: " + line)
    check(result)
    return result


def check(result: dict[str, Any]) -> None:
    assert result["alive"]
    assert not result["findings"], result["findings"]
    assert sum(result["hits"].values()) == 0, result["hits"]


def summary(result: dict[str, Any]) -> str:
    rows = ["| probe | answers (status: count) |", "|---|---|"]
    rows += [f"| {k} | {', '.join(f'{c}: {n}' for c, n in v.items())} |" for k, v in result["table"].items()]
    return (f"{len(ROUTES)} routes (every route below /1.0 in the contract), {result['requests']} requests. "
            f"Findings: {len(result['findings'])}.\n\n" + "\n".join(rows) +
            f"\n\nSecret values searched for ({len(result['hits'])}: API tokens, engine token, every integration "
            f"secret) in {result['log_lines']} daemon log lines and {result['answers']} API answers: "
            f"{sum(result['hits'].values())} found.")


# ---------------------------------------------------------------- one tenant against another (issue 17)

VICTIM = f"/1.0/tenants/{TENANT}/listeners/P0/status"


def other_pusher(rig: Rig) -> str:
    """The other tenant's Pusher integration, on the same simulator (config-file: the operator's)."""
    return (f'[tenants.integrations.pusher]\nkey = "{rig.pusher.key}"\nsecret = "{rig.secrets.pusher_secret}"\n'
            f'app-id = "{rig.pusher.app_id}"\nhost = "{rig.pusher.host}"\nport = {rig.pusher.port}\ntls = false\n')


async def begin_with_other(rig: Rig, extra: str = "") -> None:
    """`Rig.begin`, the other tenant given a Pusher integration (and `extra` tables) once the simulator's port is
    known."""
    await rig.start()
    rig.other_tenant_toml = other_pusher(rig) + extra
    await rig.start_daemon()
    await rig.wait_all_started()
    rig.mark_live()
    await rig.prime()


class Latency:
    """The victim's `GET .../status` timed every 50 ms while an attack runs."""

    def __init__(self, rig: Rig):
        self.rig = rig
        self.times: list[float] = []
        self.failures = 0
        self._task: asyncio.Task[None] | None = None

    async def once(self) -> float:
        assert self.rig.api is not None
        started = time.monotonic()
        try:
            code, _ = await asyncio.wait_for(self.rig.api.call("GET", VICTIM), 30)
        except (TimeoutError, OSError, Exception):
            code = 0
        took = time.monotonic() - started
        if code != 200:
            self.failures += 1
        return took

    async def _run(self) -> None:
        while self.rig.api is not None:  # the rig may stop first, when an attack fails
            self.times.append(await self.once())
            await asyncio.sleep(0.05)

    def __enter__(self) -> Latency:
        self._task = asyncio.create_task(self._run())
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()

    def figures(self) -> dict[str, Any]:
        t = sorted(self.times) or [0.0]
        return {"n": len(self.times), "p50_ms": round(statistics.median(t) * 1000, 1),
                "p99_ms": round(t[min(len(t) - 1, int(len(t) * 0.99))] * 1000, 1),
                "max_ms": round(t[-1] * 1000, 1), "failures": self.failures}


async def baseline(rig: Rig, count: int = 40) -> dict[str, Any]:
    latency = Latency(rig)
    for _ in range(count):
        latency.times.append(await latency.once())
        await asyncio.sleep(0.02)
    return latency.figures()


async def dead_letters(rig: Rig, tenant: str, token: str) -> list[dict[str, Any]]:
    assert rig.api is not None
    code, body = await rig.api.call("GET", f"/1.0/tenants/{tenant}/dead-letters", token=token)
    assert code == 200, (code, body)
    return body


async def amplification(workdir: Path, events: int = 100) -> dict[str, Any]:
    """The other tenant maps one 10 KB field 500 times (the most allowed) and 20 times (200 KB events, above
    what this engine takes in one body); the tenant's own events, dead letters and status latency are watched."""
    rig = Rig(workdir, {"pusher": 1})
    rig.engine.max_body_bytes = 128 * 1024  # a real engine's body limit: the 200 KB events are refused by it
    s = rig.secrets
    try:
        await begin_with_other(rig)
        assert rig.api is not None
        before = await baseline(rig)
        rss_before = sample(rig.pid).rss_kb
        api = rig.api
        base = f"/1.0/tenants/{OTHER_TENANT}/listeners"
        refused, answer = await api.call("POST", base, {"type": "pusher", "options": {"channel": "amp0"},
                                                        "mapping": {f"f{i}": "body" for i in range(20_000)}},
                                         token=s.other_token)
        created = []
        for channel, fields in (("amp", 500), ("big", 20)):
            code, body = await api.call("POST", base, {"type": "pusher", "options": {"channel": channel},
                                                       "mapping": {f"f{i}": "body" for i in range(fields)}},
                                        token=s.other_token)
            assert code == 201, (code, body)
            created.append(body["id"])
        for lid in created:
            async def started(lid: str = lid) -> bool:
                code, body = await api.call("GET", f"{base}/{lid}/status", token=s.other_token)
                return code == 200 and body["status"] == "started"

            await wait_for(started, timeout=30, interval=0.1, what=f"{OTHER_TENANT}/{lid} started")
        blob = "x" * 10_000
        peak = rss_before
        with Latency(rig) as during:
            for _ in range(events):
                await rig.pusher.publish("amp", "e", {"body": blob})
                await rig.pusher.publish("big", "e", {"body": blob})
                await rig.publish("pusher", 0)
                await asyncio.sleep(0.02)
                peak = max(peak, sample(rig.pid).rss_kb)
            delivered_in = await rig.wait_delivered(timeout=60, sources=("pusher",))

            async def all_refused() -> bool:  # the other tenant's events: each set aside or dead-lettered
                return len(await dead_letters(rig, OTHER_TENANT, s.other_token)) >= 2 * events

            await wait_for(all_refused, timeout=30, interval=0.2, what="the other tenant's events refused")
        own = await dead_letters(rig, TENANT, s.ops_token)
        other = await dead_letters(rig, OTHER_TENANT, s.other_token)
        metrics = await rig.metrics()
        report = rig.ledger.report("pusher")
        result = {"refused_20000_fields": refused, "refused_field": answer.get("fields") if isinstance(answer, dict)
                  else None, "events": events, "rss_before_mb": round(rss_before / 1024, 1),
                  "rss_peak_mb": round(peak / 1024, 1), "baseline": before, "during": during.figures(),
                  "victim_published": report["published"], "victim_delivered": report["delivered_unique"],
                  "victim_waited_s": round(delivered_in, 2), "victim_dead_letters": len(own),
                  "other_dead_letters": Counter(d["status-code"] for d in other),
                  "other_by_listener": Counter(d["listener-id"] for d in other),
                  "oversized_total": metrics.get("listenerd_oversized_events_total", 0.0),
                  "splits": metrics.get('listenerd_engine_retries_total{reason="split"}', 0.0)}
    finally:
        await rig.stop()
    assert result["refused_20000_fields"] == 400 and result["victim_dead_letters"] == 0, result
    assert result["victim_delivered"] == result["victim_published"], result
    return result


async def half_sent(host: str, port: int, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    return reader, writer


async def slowloris(workdir: Path, sockets: int = 600, header_timeout: float = 2.0) -> dict[str, Any]:
    """`sockets` connections each send half a request line and wait; the victim's status is timed meanwhile."""
    rig = Rig(workdir, {"pusher": 1}, server_toml=f"header-timeout = {header_timeout}")
    try:
        await rig.begin()
        assert rig.api is not None
        before = await baseline(rig)
        fds_before = sample(rig.pid).fds
        host, port = rig.api.base_url.removeprefix("http://").rsplit(":", 1)
        opened = time.monotonic()
        held = []
        with Latency(rig) as during:
            for _ in range(sockets):
                try:
                    held.append(await half_sent(host, int(port), b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-a: "))
                except OSError:
                    break
            await asyncio.sleep(0.3)
            fds_peak = sample(rig.pid).fds

            async def fate(reader: asyncio.StreamReader) -> tuple[str, float]:
                try:
                    data = await asyncio.wait_for(reader.read(), header_timeout + 20)
                except TimeoutError:
                    return "still open", 0.0
                except ConnectionResetError:  # refused with its request unread: the kernel may reset, not close
                    return "refused (reset)", time.monotonic() - opened
                return ("refused (503)" if data.startswith(b"HTTP/1.1 503") else "closed: headers late",
                        time.monotonic() - opened)

            fates = await asyncio.gather(*(fate(r) for r, _ in held))
        for _, writer in held:
            writer.close()
        kinds = Counter(kind for kind, _ in fates)
        closed_after = max((t for kind, t in fates if kind == "closed: headers late"), default=0.0)
        refused_after = max((t for kind, t in fates if kind.startswith("refused")), default=0.0)
        result = {"sockets": len(held), "fates": dict(kinds), "closed_after_s": round(closed_after, 2),
                  "refused_within_s": round(refused_after, 2), "header_timeout": header_timeout,
                  "baseline": before, "during": during.figures(), "fds_before": fds_before, "fds_peak": fds_peak}
    finally:
        await rig.stop()
    assert result["during"]["failures"] == 0 and "still open" not in result["fates"], result
    return result


async def metrics_flood(workdir: Path, listeners: int = 3000, scrapers: int = 4, seconds: float = 5.0
                        ) -> dict[str, Any]:
    """`scrapers` loop on /metrics with `listeners` (disabled) listeners loaded, labels per listener and summed;
    the victim's status is timed meanwhile; with the token set, a scrape without it is refused."""
    token = "metrics-" + "9" * 16
    extra = "".join(f'[[tenants.listeners]]\nid = "M{i}"\ntype = "pusher"\nstatus = false\n'
                    f'options = {{ channel = "m{i}" }}\n' for i in range(listeners))
    result: dict[str, Any] = {"listeners": listeners + 1, "scrapers": scrapers, "seconds": seconds}
    for mode in ("true", "1000"):
        rig = Rig(workdir / mode, {"pusher": 1},
                  server_toml=f'metrics-token = "{token}"\nmetrics-per-listener = {mode}')
        try:
            await begin_with_other(rig, extra)  # the other tenant's listeners: disabled, but each in /metrics
            assert rig.api is not None
            api = rig.api
            unauthenticated = (await api.call("GET", "/metrics", token=False))[0]
            before = await baseline(rig)
            sizes: list[int] = []
            took: list[float] = []

            async def scrape(api: Any = api, sizes: list[int] = sizes, took: list[float] = took) -> None:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    started = time.monotonic()
                    async with api.session.get(api.base_url + "/metrics",
                                               headers={"Authorization": f"Bearer {token}"}) as response:
                        body = await response.read()
                    took.append(time.monotonic() - started)
                    sizes.append(len(body))

            with Latency(rig) as during:
                await asyncio.gather(*(scrape() for _ in range(scrapers)))
            result[mode] = {"unauthenticated": unauthenticated, "scrapes": len(sizes),
                            "page_kb": round(statistics.median(sizes) / 1024, 1),
                            "scrape_p50_ms": round(statistics.median(took) * 1000, 1),
                            "baseline": before, "during": during.figures()}
        finally:
            await rig.stop()
    assert result["true"]["unauthenticated"] == 401 and result["1000"]["page_kb"] < result["true"]["page_kb"], result
    return result


async def quota(workdir: Path, writes: int = 600, concurrency: int = 20) -> dict[str, Any]:
    """The other tenant creates listeners and updates its integration as fast as it can; the tenant's own
    writes are timed meanwhile. Limits: 50 listeners, 20 writes/s, a burst of 200 (the default rate)."""
    rig = Rig(workdir, {"pusher": 1}, limits_toml="tenant-max-listeners = 50")
    rig.other_tenant_toml = (f'[tenants.integrations.datasift]\nusername = "other"\napi-key = "other-key-0000"\n'
                             f'stream-url = "{rig.datasift.url}"\n')
    s = rig.secrets
    try:
        await rig.begin()
        assert rig.api is not None
        api = rig.api
        codes: Counter[str] = Counter()
        retry_after: list[int] = []
        own: list[float] = []
        started = time.monotonic()

        async def hammer(i: int) -> None:
            if i % 2:
                path, body = f"/1.0/tenants/{OTHER_TENANT}/listeners", {"type": "datasift", "status": False,
                                                                          "options": {"hash": f"{i:032x}"}}
            else:
                path, body = f"/1.0/tenants/{OTHER_TENANT}/integrations/pusher", {"key": "k", "secret": f"s-{i}-xyz"}
            async with api.session.post(api.base_url + path, json=body,
                                        headers={"Authorization": f"Bearer {s.other_token}"}) as response:
                text = await response.text()
            label = str(response.status)
            if response.status == 429:
                label += " (listeners)" if "max-listeners" in text else " (rate)"
                retry_after.append(int(response.headers["Retry-After"]))
            codes[label] += 1

        async def worker(k: int) -> None:
            for i in range(k, writes, concurrency):
                await hammer(i)

        async def mine() -> None:
            for _ in range(20):
                t0 = time.monotonic()
                code, body = await api.call("POST", f"/1.0/tenants/{TENANT}/listeners",
                                            {"type": "pusher", "status": False, "options": {"channel": "own"}})
                assert code == 201, (code, body)
                code, _ = await api.call("DELETE", f"/1.0/tenants/{TENANT}/listeners/{body['id']}")
                assert code == 204
                own.append(time.monotonic() - t0)

        await asyncio.gather(*(worker(k) for k in range(concurrency)), mine())
        elapsed = time.monotonic() - started
        code, body = await api.call("GET", f"/1.0/tenants/{OTHER_TENANT}/listeners", token=s.other_token)
        result = {"writes": writes, "seconds": round(elapsed, 2), "codes": dict(sorted(codes.items())),
                  "retry_after": sorted(Counter(retry_after).items()), "other_listeners": len(body),
                  "own_create_delete_ms": {"p50": round(statistics.median(own) * 1000, 1),
                                           "max": round(max(own) * 1000, 1), "n": len(own)}}
    finally:
        await rig.stop()
    assert result["other_listeners"] <= 50 and len(own) == 20, result
    return result


def _lat(f: dict[str, Any]) -> str:
    return f"p50 {f['p50_ms']} / p99 {f['p99_ms']} / max {f['max_ms']} ms (n={f['n']}, failed {f['failures']})"


def tenants_summary(r: dict[str, Any]) -> str:
    out = []
    if "amplification" in r:
        a = r["amplification"]
        out += ["**Mapping amplification, two tenants.** The other tenant: a 20,000-field mapping is refused "
                f"({a['refused_20000_fields']}, `fields: {a['refused_field']}`); it then maps one 10 KB field "
                "500 times (the default bound: 5 MB events) on one listener and 20 times (200 KB) on another, "
                f"with the engine refusing bodies over 128 KiB; {a['events']} events each, interleaved with the "
                f"tenant's own. Daemon RSS {a['rss_before_mb']} MB before, {a['rss_peak_mb']} MB peak. "
                f"Oversized events set aside by listenerd: {a['oversized_total']:.0f}; engine 413 halvings: "
                f"{a['splits']:.0f}; the other tenant's dead letters by status {dict(a['other_dead_letters'])}; "
                f"**the tenant's dead letters: {a['victim_dead_letters']}**, its events delivered "
                f"{a['victim_delivered']} of {a['victim_published']}. The tenant's status latency: before "
                f"{_lat(a['baseline'])}; "
                f"during {_lat(a['during'])}.", ""]
    if "slowloris" in r:
        s = r["slowloris"]
        out += [f"**Slowloris.** {s['sockets']} connections each send half a request line and wait "
                f"(`server.header-timeout = {s['header_timeout']}`, `max-connections` 256): "
                f"{', '.join(f'{k}: {v}' for k, v in s['fates'].items())}; refused ones within "
                f"{s['refused_within_s']} s of the first connect, all the others closed by {s['closed_after_s']} s. "
                f"Daemon fds {s['fds_before']} before, {s['fds_peak']} while held. The tenant's status: before "
                f"{_lat(s['baseline'])}; during {_lat(s['during'])}.", ""]
    if "metrics" in r:
        m = r["metrics"]
        rows = ["| metrics-per-listener | page | scrapes in {}s ({} scrapers) | scrape p50 | tenant's status before "
                "| during |".format(m["seconds"], m["scrapers"]), "|---|---|---|---|---|---|"]
        for mode in ("true", "1000"):
            f = m[mode]
            rows.append(f"| {mode} | {f['page_kb']} KB | {f['scrapes']} | {f['scrape_p50_ms']} ms | "
                        f"{_lat(f['baseline'])} | {_lat(f['during'])} |")
        out += [f"**/metrics flood.** {m['listeners']} listeners loaded; with `metrics-token` set a scrape "
                f"without it answers {m['true']['unauthenticated']}.", "", *rows, ""]
    if "quota" in r:
        q = r["quota"]
        out += [f"**Quotas.** The other tenant sends {q['writes']} writes (listener creates and integration "
                f"updates, 20 at a time) in {q['seconds']} s with `tenant-max-listeners = 50` and the default "
                f"20 writes/s, burst 200: answers {q['codes']}; Retry-After values (s: count) {q['retry_after']}; "
                f"it ends with {q['other_listeners']} listeners. Meanwhile the tenant's own create + delete: "
                f"p50 {q['own_create_delete_ms']['p50']} ms, max {q['own_create_delete_ms']['max']} ms "
                f"(n={q['own_create_delete_ms']['n']}, none refused).", ""]
    return "\n".join(out).rstrip()


SCENARIOS = {"amplification": amplification, "slowloris": slowloris, "metrics": metrics_flood, "quota": quota}


# ---------------------------------------------------------------- issue 17 part A: egress and the redactor


class EgressRig(Rig):
    """The rig with `[server.egress]` allowing the name `localhost` and plaintext, but no internal network:
    what an operator who allows a host by name gets when the name resolves (or re-binds) to loopback."""

    def config_text(self) -> str:
        return super().config_text().replace(
            "[engine]", '[server.egress]\nhosts = ["localhost"]\nplaintext = true\n\n[engine]', 1)


class InternalService:
    """A loopback HTTP service the tenant should never reach (an admin API, a metadata endpoint): counts hits."""

    def __init__(self) -> None:
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> InternalService:
        async def any_path(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text="internal admin: secret-internal-answer " * 20)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", any_path)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def ssrf_forms(port: int) -> list[tuple[str, dict[str, Any], str]]:
    """(integration type, fields, the field a 400 must name): every form the attack review used, and more."""
    sf = {"consumer-key": "ck", "consumer-secret": "cs-" + secret_values.token_hex(8), "username": "u@example.com",
          "password": "pw-" + secret_values.token_hex(8)}
    ps = {"key": "k", "secret": "ps-" + secret_values.token_hex(8)}
    ds = {"username": "u", "api-key": "ds-" + secret_values.token_hex(8)}
    forms = [f"http://127.0.0.1:{port}/admin/x#", f"https://127.0.0.1:{port}", f"https://localhost:{port}",
             f"https://0x7f000001:{port}", f"https://2130706433:{port}", f"https://0177.0.0.1:{port}",
             f"https://127.1:{port}", f"https://[::ffff:127.0.0.1]:{port}", f"https://[::1]:{port}",
             "https://169.254.169.254/latest/meta-data", "https://10.0.0.1", "https://192.168.1.1",
             "https://[fd00::1]", f"https://login.salesforce.com@127.0.0.1:{port}",
             "https://login.salesforce.com.attacker.example", "https://attacker.example/#.salesforce.com",
             "https://attacker.example?.force.com"]
    cases: list[tuple[str, dict[str, Any], str]] = [("salesforce", {**sf, "login-url": url}, "login-url")
                                                    for url in forms]
    cases += [("datasift", {**ds, "stream-url": url.replace("https", "wss").replace("http", "ws")}, "stream-url")
              for url in forms]
    for host in ("127.0.0.1", "localhost", "0x7f000001", "2130706433", "::ffff:127.0.0.1", "169.254.169.254",
                 "metadata.google.internal", "10.0.0.1"):
        cases.append(("pusher", {**ps, "host": host, "port": port}, "host"))
    cases.append(("pusher", {**ps, "tls": False}, "tls"))
    cases.append(("pusher", {**ps, "cluster": "x.attacker.example/"}, "cluster"))
    return cases


async def ssrf(workdir: Path, say: Any = print) -> dict[str, Any]:
    """Every SSRF form is a 400 naming its field; a name the operator allowed that lands on loopback at connect
    time makes the listener `failed`; the internal service never sees a request."""
    internal = await InternalService().start()
    findings: list[str] = []
    plain = Rig(workdir / "default-policy", counts={})  # no [server.egress]: provider hosts over TLS only
    try:
        await plain.start()
        await plain.start_daemon()
        cases = ssrf_forms(internal.port)
        refused = 0
        for kind, fields, field_name in cases:
            code, text = await call(plain, "POST", f"/1.0/tenants/{OTHER_TENANT}/integrations/{kind}",
                                    plain.secrets.other_token, fields)
            body = json.loads(text)
            if code == 400 and body.get("fields") == [field_name]:
                refused += 1
            else:
                findings.append(f"{kind} {fields.get(field_name)!r}: {code} {text[:120]}")
    finally:
        await plain.stop()
    rig = EgressRig(workdir / "localhost-by-name", counts={})
    try:
        await rig.start()
        await rig.start_daemon()
        # allowed by name (hosts = ["localhost"]), refused by address at connect time
        started = time.monotonic()
        failed_at: dict[str, float] = {}
        for kind, fields, options in (
                ("pusher", {"key": "k", "secret": "ps-" + secret_values.token_hex(8), "host": "localhost",
                            "port": internal.port, "tls": False}, {"channel": "c"}),
                ("salesforce", {"consumer-key": "ck", "consumer-secret": "cs-" + secret_values.token_hex(8),
                                "username": "u@example.com", "password": "pw-" + secret_values.token_hex(8),
                                "login-url": f"http://localhost:{internal.port}"}, {"topic": "T"})):
            code, text = await call(rig, "POST", f"/1.0/tenants/{OTHER_TENANT}/integrations/{kind}",
                                    rig.secrets.other_token, fields)
            assert code == 200, text
            code, text = await call(rig, "POST", f"/1.0/tenants/{OTHER_TENANT}/listeners", rig.secrets.other_token,
                                    {"type": kind, "options": options})
            assert code == 201, text
            assert rig.api is not None
            other = type(rig.api)(rig.api.base_url, token=rig.secrets.other_token)
            try:
                status = await other.wait_status(OTHER_TENANT, json.loads(text)["id"], "failed")
            finally:
                await other.close()
            failed_at[kind] = time.monotonic() - started
            if "egress refused" not in status["message"]:
                findings.append(f"{kind} via localhost: {status['message'][:160]}")
        hits = internal.hits
        if hits:
            findings.append(f"the internal service was reached {hits} time(s)")
        await rig.stop()
    finally:
        await rig.stop()
        await internal.stop()
    for line in findings:
        say("FINDING: " + line)
    result = {"forms": len(cases), "refused": refused, "findings": findings, "internal_hits": hits,
              "failed_after": {k: round(v, 2) for k, v in failed_at.items()}}
    assert not findings, findings
    return result


POISON = ["acme", "error", "listener", "info", "t", "warning", "password", "12345678", "aaaaaaaa", "[REDACTED]"]


async def poisoning(workdir: Path, say: Any = print, updates: int = 2000) -> dict[str, Any]:
    """Secrets chosen to blind the log are refused; then `updates` integration updates through the API (each
    with fresh secrets): the update latency stays flat, and no log line loses its level, logger or tenant."""
    # the write quota is lifted: this measures the redactor under many updates, not the rate limit
    rig = Rig(workdir, counts={}, limits_toml="tenant-write-rate = 0")
    findings: list[str] = []
    try:
        await rig.start()
        await rig.start_daemon()
        refused = 0
        for word in POISON:
            code, text = await call(rig, "POST", f"/1.0/tenants/{OTHER_TENANT}/integrations/pusher",
                                    rig.secrets.other_token, {"key": "k", "secret": word})
            if code == 400 and json.loads(text).get("fields") == ["secret"]:
                refused += 1
            else:
                findings.append(f"secret {word!r}: {code} {text[:120]}")
        latencies = []
        for _ in range(updates):
            t0 = time.perf_counter()
            code, text = await call(rig, "POST", f"/1.0/tenants/{OTHER_TENANT}/integrations/pusher",
                                    rig.secrets.other_token, {"key": "k", "secret": secret_values.token_urlsafe(16)})
            latencies.append(time.perf_counter() - t0)
            if code != 200:
                findings.append(f"update: {code} {text[:120]}")
                break
        rig.responses.clear()  # thousands of answers: the secret search below is about the rig's own secrets
        await rig.stop()
        lines = [json.loads(line) for line in rig.daemon.log_text().splitlines() if line.startswith("{")] \
            if rig.daemon else []
        blinded = [line for line in lines if "[REDACTED]" in (str(line.get("level")) + str(line.get("logger"))
                                                              + str(line.get("tenant")) + str(line.get("event")))]
        if blinded:
            findings.append(f"{len(blinded)} log lines with a structural field redacted: {blinded[0]}")
    finally:
        await rig.stop()
    first, last = latencies[:100], latencies[-100:]
    result = {"refused": refused, "poison": len(POISON), "updates": len(latencies), "log_lines": len(lines),
              "blinded": len(blinded), "first_ms": 1000 * sorted(first)[len(first) // 2],
              "last_ms": 1000 * sorted(last)[len(last) // 2], "findings": findings, "redactor": redactor_cost()}
    for line in findings:
        say("FINDING: " + line)
    assert not findings, findings
    return result


def redactor_cost(lines: int = 5000) -> dict[str, float]:
    """Microseconds per log line through the redactor with 10 and 60,000 secrets registered, and with one
    integration's secrets replaced 20,000 times (the review's 150x came from those left behind)."""
    entry = {"event": "listener status", "level": "info", "logger": "listenerd.supervisor", "tenant": "acme",
             "listener": "LI1", "message": "Connecting to wss://websocket.datasift.com/multi for stream "
             "4f3af38ad1c31646561bc814c3e69af5 as user demo", "url": "https://acme.my.salesforce.com/cometd/58.0"}
    out: dict[str, float] = {}
    for label, count in (("10 secrets", 10), ("60,000 secrets", 60_000)):
        redactor = SecretRedactor()
        t0 = time.perf_counter()
        redactor.replace("bench", [secret_values.token_urlsafe(18) for _ in range(count)])
        redactor.wait_built()  # in a background thread: log lines meanwhile use the small automaton
        redactor(None, "info", entry)
        out[f"{label}: build s"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        for _ in range(lines):
            redactor(None, "info", entry)
        out[f"{label}: us/line"] = round((time.perf_counter() - t0) / lines * 1e6, 2)
    redactor = SecretRedactor()
    for _ in range(20_000):
        redactor.replace("integration:t:pusher", [secret_values.token_urlsafe(18) for _ in range(3)])
    out["after 20,000 updates: secrets registered"] = redactor.count
    return out


def summary_part_a(ssrf_result: dict[str, Any], poison: dict[str, Any]) -> str:
    cost = poison["redactor"]
    return (f"**SSRF** (a tenant-limited token against a loopback 'internal service'): with the default policy "
            f"(no `[server.egress]`), {ssrf_result['refused']} of {ssrf_result['forms']} URL forms "
            f"(loopback, decimal, hex, octal, short, "
            f"IPv4-mapped IPv6, ::1, metadata 169.254.169.254, RFC 1918, ULA, user-info and fragment tricks, "
            f"look-alike suffixes, plaintext, a cluster that escapes its host) refused with a 400 naming the field. "
            f"With `[server.egress]` allowing the name `localhost` and plaintext but no network, integrations "
            f"accepted by name and resolving to loopback at connect time: Pusher `failed` after "
            f"{ssrf_result['failed_after'].get('pusher')} s, Salesforce login `failed` after "
            f"{ssrf_result['failed_after'].get('salesforce')} s (both counted from the first integration write). "
            f"Requests that reached the internal service: {ssrf_result['internal_hits']}.\n\n"
            f"**Redactor poisoning**: {poison['refused']} of {poison['poison']} would-be secrets "
            f"({', '.join(repr(p) for p in POISON)}) refused with a 400 naming `secret`. {poison['updates']} "
            f"integration updates through the API: median update {poison['first_ms']:.1f} ms for the first 100, "
            f"{poison['last_ms']:.1f} ms for the last 100 (flat: replaced secrets are unregistered); "
            f"{poison['log_lines']} daemon log lines, {poison['blinded']} with `level`, `logger`, `event` or `tenant` "
            f"redacted (that a registered secret never touches those fields is shown line by line in "
            f"tests/unit/test_redactor_poisoning.py).\n\n"
            f"**Redactor cost** (in process, one Aho-Corasick automaton over every secret and its URL, form and JSON "
            f"encodings): " + "; ".join(f"{k}: {v}" for k, v in cost.items()) + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="accepted for symmetry: the checks are the same")
    parser.add_argument("--write", action="store_true")
    parser.add_argument("--only", choices=["routes", "part-a", *SCENARIOS], action="append",
                        help="run only these (repeatable); default: all")
    args = parser.parse_args()
    chosen = args.only or ["routes", "part-a", *SCENARIOS]
    start_load = loadavg()
    if "routes" in chosen:
        with tempfile.TemporaryDirectory(prefix="chaos-security-") as tmp:
            result = asyncio.run(run(Path(tmp)))
        text = summary(result)
        print(text)
        if args.write:
            write_section("Chaos: security checks", f"`.venv/bin/python -m bench.chaos.security`\n\n"
                          f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text}")
    results: dict[str, Any] = {}
    start_load = loadavg()
    for name in (n for n in SCENARIOS if n in chosen):
        with tempfile.TemporaryDirectory(prefix=f"chaos-security-{name}-") as tmp:
            results[name] = asyncio.run(SCENARIOS[name](Path(tmp)))
        print(results[name])
    if results:
        text = tenants_summary(results)
        print(text)
        if args.write:
            write_section("Chaos: tenants who do not trust each other (issue 17)",
                          f"`.venv/bin/python -m bench.chaos.security --only amplification --only slowloris "
                          f"--only metrics --only quota`\n\n"
                          f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text}")
    if "part-a" in chosen:
        start_load = loadavg()
        with tempfile.TemporaryDirectory(prefix="chaos-security-a-") as tmp:
            ssrf_result = asyncio.run(ssrf(Path(tmp) / "ssrf"))
            poison = asyncio.run(poisoning(Path(tmp) / "poison"))
        text_a = summary_part_a(ssrf_result, poison)
        print(text_a)
        if args.write:
            write_section("Chaos: egress and the redactor (issue 17, part A)",
                          f"`.venv/bin/python -m bench.chaos.security --only part-a`\n\n"
                          f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text_a}")


if __name__ == "__main__":
    main()
