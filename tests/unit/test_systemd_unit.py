"""Issue 17 finding 10: the unit keeps its hardening (and its score, where systemd-analyze is installed)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "listenerd.service"
REQUIRED = {"NoNewPrivileges": "yes", "PrivateMounts": "yes", "PrivateUsers": "yes", "DevicePolicy": "closed",
            "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectKernelLogs": "yes", "RestrictNamespaces": "yes",
            "LockPersonality": "yes", "SystemCallArchitectures": "native", "MemoryDenyWriteExecute": "yes",
            "ProtectSystem": "strict", "UMask": "0077", "CapabilityBoundingSet": "",
            # the store (events, checkpoints, sealed credentials) and secrets.key beside it: the owner's only
            "StateDirectory": "listenerd", "StateDirectoryMode": "0700"}


def directives(text: str) -> dict[str, dict[str, list[str]]]:
    """The unit's directives by section, as systemd reads them: comment lines (`#`, `;`) are not directives,
    a key may repeat (each value kept), a line ending in `\\` continues."""
    sections: dict[str, dict[str, list[str]]] = {}
    section = None
    for line in text.replace("\\\n", " ").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"not a directive: {line!r}"
        section.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_the_unit_sets_the_hardening_directives():
    service = directives(UNIT.read_text())["Service"]
    wrong = {k: service.get(k) for k, v in REQUIRED.items() if service.get(k) != [v]}
    assert not wrong


def test_comments_are_not_directives():
    parsed = directives("[Service]\n# LoadCredential=a:/b\n; StateDirectoryMode=0777\nUMask=0077\n")
    assert parsed == {"Service": {"UMask": ["0077"]}}


def test_the_secrets_key_credential_is_documented_and_consistent():
    """The sealing key is optional (without `[store] secrets-key-file` listenerd generates `secrets.key`
    beside the store), so the shipped unit loads no credential a fresh install lacks: its comment and the
    README show the drop-in. In each, the credential's id and the config's path must agree with where
    systemd puts it: /run/credentials/<unit name>/<id>."""
    assert "LoadCredential" not in directives(UNIT.read_text())["Service"]
    for where in (UNIT, ROOT / "README.md"):
        text = where.read_text()
        loaded = re.findall(r"LoadCredential=(secrets-key):(/\S+)", text)
        read = re.findall(r'secrets-key-file = "/run/credentials/([^/"]+)/([^/"]+)"', text)
        assert loaded and read, where
        assert {(UNIT.name, ident) for ident, _ in loaded} >= set(read), (where, loaded, read)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_scores_it_at_most_1_1():
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True,
                         text=True, timeout=60).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    assert score <= 1.1, out
