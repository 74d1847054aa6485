"""Scenarios 5 and 6 against the real Rails app: import (with SQLite's 500s under --jobs 4) and
check (ready, wrong password, /postfix/ path, app not configured for relay), creating nothing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

from ..corpus import message as corpus_message
from ..corpus import write_maildir, write_mbox
from ..helpers import RELAY_PATH
from .world import RailsApp, relay_command


def relay(args: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    from .world import relay_command

    return subprocess.run([relay_command(), *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture
def rails(rails_any: RailsApp) -> RailsApp:
    """Every scenario here runs on both app shapes: SQLite (dev) and PostgreSQL (production)."""
    return rails_any


def test_import_mbox_and_maildir_every_message_stored_once(
    tmp_path: Path, rails: RailsApp, relay_env: Dict[str, str]
) -> None:
    # Small on purpose: Rails' dev app on SQLite makes concurrent posts wait for its 5 s lock
    # timeout and answers some of them 500; every one must still end up stored exactly once.
    mbox = write_mbox(tmp_path / "archive.mbox", [corpus_message(n) for n in range(12)])
    maildir = write_maildir(tmp_path / "Maildir", [corpus_message(n) for n in range(1000, 1006)])
    env = {**relay_env, "MAILBOX_RELAY_RETRY_FOR": "120"}
    state = str(tmp_path / "state.sqlite3")
    result = relay(["import", "--jobs", "4", "--state", state, "--json", str(mbox), str(maildir)], env)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)
    assert (summary["delivered"], summary["failed"], summary["invalid"]) == (18, 0, 0)
    assert rails.stored() == 18
    ids = rails.stored_message_ids()
    assert len(set(ids)) == 18
    again = relay(["import", "--state", state, "--json", str(mbox), str(maildir)], env)
    assert json.loads(again.stdout)["already_delivered"] == 18
    assert rails.stored() == 18


def test_import_sequentially_routes_every_message(
    tmp_path: Path, rails: RailsApp, relay_env: Dict[str, str]
) -> None:
    mbox = write_mbox(tmp_path / "a.mbox", [corpus_message(n) for n in range(5)])
    result = relay(["import", "--jobs", "1", "--no-state", "-q", str(mbox)], relay_env)
    assert result.returncode == 0, result.stderr
    assert sorted(entry["subject"] for entry in rails.routed(5)) == [f"message {n}" for n in range(5)]


def test_check_against_the_real_app(
    rails: RailsApp, relay_env: Dict[str, str], unconfigured_url: str
) -> None:
    def check(url: str, password: str) -> tuple[int, Dict[str, object]]:
        result = relay(["check", "--json", "--url", url], {**relay_env, "MAILBOX_RELAY_PASSWORD": password})
        return result.returncode, json.loads(result.stdout)

    code, report = check(rails.url, rails.password)
    assert code == 0 and report["ready"] is True
    assert check(rails.url, "wrong")[0] == 77
    code, report = check(rails.url + "/rails/action_mailbox/postfix/inbound_emails", rails.password)
    assert code == 78
    http = next(step for step in report["steps"] if step["step"] == "http")  # type: ignore[union-attr,index]
    assert RELAY_PATH in http["detail"]  # type: ignore[index]
    code, report = check(unconfigured_url, rails.password)
    assert code == 78
    http = next(step for step in report["steps"] if step["step"] == "http")  # type: ignore[union-attr,index]
    assert "config.action_mailbox.ingress = :relay" in http["detail"]  # type: ignore[index]
    assert rails.stored() == 0  # no check ever creates an inbound email


def test_a_non_ascii_password_is_accepted_by_rails(rails: RailsApp, relay_env: Dict[str, str]) -> None:
    """Rails compares the UTF-8 bytes of the Basic credentials: so must we (not Latin-1)."""
    password = "pässwörd-€-日本"
    url = rails.serve(password=password)
    message = corpus_message(4242)
    env = {**relay_env, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": password}
    result = subprocess.run(
        [relay_command(), "deliver"], input=message, env=env, capture_output=True, timeout=120
    )
    assert (result.returncode, result.stderr) == (0, b"")
    assert rails.stored() == 1
    wrong = subprocess.run(
        [relay_command(), "deliver"],
        input=message,
        env={**env, "MAILBOX_RELAY_PASSWORD": "passwörd"},
        capture_output=True,
        timeout=120,
    )
    assert wrong.returncode == 75 and wrong.stderr.startswith(b"4.7.0 ")
