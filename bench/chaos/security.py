"""Chaos 6, security checks: every route without a token, with another tenant's token, with path
traversal and oversized ids; then every secret value searched for in every log line and answer.
Issue 17 (part A) adds `ssrf` (a tenant pointing the daemon at an internal service, in every form) and
`poisoning` (secrets that would blind the log, and 2,000 integration updates).

Why: the API is the daemon's only door and holds credentials. A route that forgets the token check,
lets one tenant read another's objects, turns `..` into something meaningful, or answers a 500 to a
silly id, is found here by brute enumeration, not by reading the code. The secrets are fresh random
values for each run (tokens, engine token, every integration secret), so any hit is a real leak.

    .venv/bin/python -m bench.chaos.security [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import json  # noqa: E402
import secrets as secret_values  # noqa: E402
import time  # noqa: E402

from aiohttp import web  # noqa: E402

from bench.chaos.rig import OTHER_TENANT, TENANT, Rig, header, loadavg, write_section  # noqa: E402
from listenerd.observability import SecretRedactor  # noqa: E402

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
                        # 400 (bad id), 403 (not this token's tenant), 404 (no such thing); never 2xx or 5xx
                        if code not in (400, 403, 404, 405, 414, 431):
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
    rig = Rig(workdir, counts={})
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
    parser.add_argument("--only", choices=("routes", "part-a"), help="run only the route checks or issue 17 part A")
    args = parser.parse_args()
    start_load = loadavg()
    if args.only != "part-a":
        with tempfile.TemporaryDirectory(prefix="chaos-security-") as tmp:
            result = asyncio.run(run(Path(tmp)))
        text = summary(result)
        print(text)
    if args.only != "routes":
        with tempfile.TemporaryDirectory(prefix="chaos-security-a-") as tmp:
            ssrf_result = asyncio.run(ssrf(Path(tmp) / "ssrf"))
            poison = asyncio.run(poisoning(Path(tmp) / "poison"))
        text_a = summary_part_a(ssrf_result, poison)
        print(text_a)
        if args.write:
            write_section("Chaos: egress and the redactor (issue 17, part A)",
                          f"`.venv/bin/python -m bench.chaos.security --only part-a`\n\n"
                          f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text_a}")
    if args.only == "part-a":
        return
    if args.write:
        write_section("Chaos: security checks", f"`.venv/bin/python -m bench.chaos.security`\n\n"
                      f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text}")


if __name__ == "__main__":
    main()
