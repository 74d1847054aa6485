"""Shared fixtures. Under CI=true a skipped test fails: CI must have every peer it needs."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Dict, Generator, Iterator, List, Set

import pytest

from mailbox_relay.ingress.endpoint import CA_BUNDLE_ENV
from mailbox_relay.settings import FIELDS, PASSWORD_ENV

SAMPLE = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: support@example.com\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= and \xc3\xa9 raw\r\n"
    b"Message-ID: <sample-1@example.com>\r\n"
    b"\r\n"
    b"Hello,\r\nFrom here on it is the body.\r\n\x00binary is fine in a body\xff\r\n"
)


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: Any) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if in_ci() and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which must have every peer: {reason}"


ROOT = Path(__file__).resolve().parent.parent


def repo_leftovers() -> Set[str]:
    """What a test could leave in the repository: top-level entries git does not ignore (an
    empty directory counts: git would not list it), and untracked files anywhere."""
    names = {name for name in os.listdir(ROOT) if name != ".git"}
    ignored = subprocess.run(
        ["git", "check-ignore", "--stdin"], cwd=ROOT, input="\n".join(names), capture_output=True, text=True
    ).stdout.split()
    untracked = subprocess.run(
        ["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split("\n")
    return (names - set(ignored)) | {path for path in untracked if path}


def temp_leftovers(directory: str) -> List[str]:
    """Entries of the session's temporary directory; multiprocessing's own (pymp-*) go at exit."""
    return sorted(name for name in os.listdir(directory) if not name.startswith("pymp-"))


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind() -> Iterator[str]:
    """Every process a test starts (mailbox-relay, contrib/try-it.sh, ...) gets a temporary
    directory of the session's own as TMPDIR; at the end it must be empty, and the repository
    must hold nothing new. (This process keeps its own: multiprocessing removes its directory
    only at exit, after this check.)"""
    private = tempfile.mkdtemp(prefix="mailbox-relay-tests.")
    os.chmod(private, 0o1777)  # like /tmp: the e2e suite's other users write there too
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = private
    before = repo_leftovers()
    try:
        yield private
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
    left = temp_leftovers(private)
    shutil.rmtree(private, ignore_errors=True)
    new = sorted(repo_leftovers() - before)
    assert not left and not new, f"tests left behind: in TMPDIR {left}; in the repository {new}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Dict[str, str]]:
    """No MAILBOX_RELAY_*, URL or INGRESS_PASSWORD from the developer's shell, and no config."""
    for spec in FIELDS.values():
        for name in spec.env:
            monkeypatch.delenv(name, raising=False)
    for name in (*PASSWORD_ENV, *CA_BUNDLE_ENV, "CI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setattr("mailbox_relay.settings.SYSTEM_CONFIG_PATH", str(tmp_path / "no-etc.toml"))
    yield dict(os.environ)


@pytest.fixture
def sample() -> bytes:
    return SAMPLE
