"""contrib/'s systemd units pass `systemd-analyze verify` (.ci/verify-units; CI installs systemd)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_every_unit_in_contrib_verifies() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    result = subprocess.run(
        ["bash", str(ROOT / ".ci" / "verify-units")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for unit in ("mailbox-relay-watch.service", "mailbox-relay-fetch.service", "mailbox-relay-fetch.timer"):
        assert unit in result.stdout


def test_the_watch_unit_is_a_notify_service_with_a_watchdog() -> None:
    unit = (ROOT / "contrib" / "mailbox-relay-watch.service.example").read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecReload=", "NoNewPrivileges=yes", "ProtectSystem=strict"):
        assert f"\n{line}" in unit, line
