"""Chaos 6, security checks: every route without a token, with another tenant's token, with path
traversal and oversized ids; then every secret value searched for in every log line and answer.

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

from bench.chaos.rig import OTHER_TENANT, TENANT, Rig, header, loadavg, write_section  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="accepted for symmetry: the checks are the same")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    start_load = loadavg()
    with tempfile.TemporaryDirectory(prefix="chaos-security-") as tmp:
        result = asyncio.run(run(Path(tmp)))
    text = summary(result)
    print(text)
    if args.write:
        write_section("Chaos: security checks", f"`.venv/bin/python -m bench.chaos.security`\n\n"
                      f"{header(f'Load at start {start_load}, at end {loadavg()}.')}\n\n{text}")


if __name__ == "__main__":
    main()
