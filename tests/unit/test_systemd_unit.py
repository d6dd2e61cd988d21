"""Issue 17 finding 10: the unit keeps its hardening (and its score, where systemd-analyze is installed)."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "listenerd.service"
REQUIRED = {"NoNewPrivileges": "yes", "PrivateMounts": "yes", "PrivateUsers": "yes", "DevicePolicy": "closed",
            "ProtectClock": "yes", "ProtectHostname": "yes", "ProtectKernelLogs": "yes", "RestrictNamespaces": "yes",
            "LockPersonality": "yes", "SystemCallArchitectures": "native", "MemoryDenyWriteExecute": "yes",
            "ProtectSystem": "strict", "UMask": "0077", "CapabilityBoundingSet": ""}


def test_the_unit_sets_the_hardening_directives():
    settings = dict(line.split("=", 1) for line in UNIT.read_text().splitlines()
                    if "=" in line and not line.startswith("#"))
    missing = {k: v for k, v in REQUIRED.items() if settings.get(k) != v}
    assert not missing
    assert "LoadCredential=secrets-key:" in UNIT.read_text()  # the documented way to give the sealing key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_scores_it_at_most_1_1():
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)], capture_output=True,
                         text=True, timeout=60).stdout
    score = float(re.search(r"Overall exposure level for \S+: ([0-9.]+)", out).group(1))
    assert score <= 1.1, out
