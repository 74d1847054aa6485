"""Scenarios 1 and 2: getmail6 MDA_external -> mailbox-relay deliver -> Rails, and what the curl
relay from the guides does in the same failures."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Dict, Tuple

import pytest

from ..helpers import RELAY_PATH
from ..peers import free_port
from .world import Dovecot, RailsApp, message, need

CURL_RELAY = (
    'curl -sS -u "actionmailbox:$INGRESS_PASSWORD" -H "Content-Type: message/rfc822" --data-binary @- "$URL"'
)


def getmailrc(directory: Path, dovecot: Dovecot, user: str, path: str, arguments: Tuple[str, ...]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rc = directory / "getmailrc"
    rc.write_text(
        "[retriever]\n"
        "type = SimpleIMAPRetriever\n"
        f"server = 127.0.0.1\nport = {dovecot.port}\n"
        f"username = {user}\npassword = secret-{user}\n"
        'mailboxes = ("INBOX",)\n\n'
        "[destination]\n"
        "type = MDA_external\n"
        f"path = {path}\n"
        f"arguments = {arguments!r}\n"
        "allow_root_commands = true\n\n"
        "[options]\n"
        "delete = true\nread_all = false\ndelivered_to = false\nreceived = false\nverbose = 1\n"
    )
    return rc


def getmail(rc: Path, env: Dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["getmail", "--getmaildir", str(rc.parent), "--rcfile", rc.name],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(autouse=True)
def _programs() -> None:
    need("getmail", "curl")


@pytest.fixture
def rails(rails_any: RailsApp) -> RailsApp:
    """Every scenario here runs on both app shapes: SQLite (dev) and PostgreSQL (production)."""
    return rails_any


def test_getmail_delivers_each_message_once_and_deletes_after_delivery(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, relay: str, relay_env: Dict[str, str]
) -> None:
    user = dovecot.new_user()
    dovecot.append(user, [message(f"getmail {n}") for n in range(3)])
    rc = getmailrc(tmp_path / "getmail", dovecot, user, relay, ("deliver",))
    result = getmail(rc, relay_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("delivered, deleted") == 3
    assert rails.stored() == 3
    assert dovecot.count(user) == 0
    assert sorted(entry["subject"] for entry in rails.routed(3)) == ["getmail 0", "getmail 1", "getmail 2"]
    again = getmail(rc, relay_env)
    assert again.returncode == 0 and rails.stored() == 3


def test_failures_keep_the_mail_and_the_curl_relay_loses_it(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, relay: str, relay_env: Dict[str, str]
) -> None:
    ours, curls = dovecot.new_user(), dovecot.new_user()
    dovecot.append(ours, [message("kept by mailbox-relay")])
    dovecot.append(curls, [message("sent through the curl relay")])
    ours_rc = getmailrc(tmp_path / "ours", dovecot, ours, relay, ("deliver",))
    curl_rc = getmailrc(tmp_path / "curl", dovecot, curls, "/bin/sh", ("-c", CURL_RELAY))
    closed = f"http://127.0.0.1:{free_port()}"
    relay_url = rails.url + RELAY_PATH

    failures = {
        "wrong password": (
            {"MAILBOX_RELAY_PASSWORD": "wrong"},
            {"INGRESS_PASSWORD": "wrong", "URL": relay_url},
        ),
        "closed port": ({"MAILBOX_RELAY_URL": closed}, {"INGRESS_PASSWORD": rails.password, "URL": closed}),
    }
    for name, (ours_env, curl_env) in failures.items():
        failed = getmail(ours_rc, {**relay_env, **ours_env})
        assert failed.returncode != 0, name
        assert "delivery error" in failed.stdout + failed.stderr
        assert dovecot.count(ours) == 1, f"{name}: mailbox-relay's message must stay on the server"
        assert rails.stored() == 0, name
        curl = getmail(curl_rc, {**os.environ, **curl_env})
        if name == "wrong password":
            # curl exits 0 on the 401: getmail believes it delivered and deletes the message.
            assert curl.returncode == 0 and "delivered, deleted" in curl.stdout, curl.stdout + curl.stderr
            assert dovecot.count(curls) == 0

    fixed = getmail(ours_rc, relay_env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert dovecot.count(ours) == 0
    assert rails.stored() == 1
    assert [entry["subject"] for entry in rails.routed(1)] == ["kept by mailbox-relay"]
    # The curl relay's message is gone for good: not on the server, never in Rails.
    getmail(curl_rc, {**os.environ, "INGRESS_PASSWORD": rails.password, "URL": relay_url})
    assert dovecot.count(curls) == 0
    assert rails.stored_message_ids() == ["kept-by-mailbox-relay@e2e.example"]
