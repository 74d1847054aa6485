"""Postfix, as a mail admin would set it up from contrib/, in front of the real Rails app: a
private Postfix instance whose pipe transport runs mailbox-relay as the user `mailrelay` from
the README's mail-host install, with contrib's master.cf and main.cf lines as shipped."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator

import pytest

from ..peers import free_port
from .world import (
    RELAY_USER,
    Postfix,
    RailsApp,
    RelayConfig,
    check_mta_table,
    ensure_user,
    message,
    need,
    table_cell,
)

DOMAIN = "support.example.com"  # as in contrib/postfix-main.cf.example
ROWS: Dict[str, str] = {}  # case -> "| what Postfix did | stored |", for docs/compatibility.md


def verdict(log: str) -> str:
    """Postfix's last verdict on a delivery to the app's domain: status, DSN code and text (not
    the bounce that goes back to the sender)."""
    found = re.findall(rf"to=<[^>]*@{DOMAIN}>.*dsn=([\d.]+), status=(\w+) \((.*)\)$", log, re.M)
    assert found, log[-2000:]
    dsn, status, text = found[-1]
    return table_cell(f"{status} ({dsn}): {text}")


@pytest.fixture(scope="module")
def postfix(mail_host: Path) -> Iterator[Postfix]:
    need("postfix", "postqueue", "script")
    ensure_user(RELAY_USER)
    root = Path("/tmp") / f"mailbox-relay-e2e-postfix-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    config = RelayConfig(root / "etc")
    server = Postfix(root, mail_host, config.path)
    server.config = config  # type: ignore[attr-defined]
    config.write("http://127.0.0.1:9", "unset")
    server.start()
    yield server
    server.stop()
    shutil.rmtree(root, ignore_errors=True)


def config(postfix: Postfix) -> RelayConfig:
    return postfix.config  # type: ignore[attr-defined,no-any-return]


def test_two_recipients_in_one_transaction_reach_rails_routed_to_each(
    postfix: Postfix, rails: RailsApp
) -> None:
    config(postfix).write(rails.url, rails.password, retry_for=60)
    raw = message("postfix two recipients", to=f"sales@{DOMAIN}")
    postfix.send("alice@sender.test", [f"sales@{DOMAIN}", f"hidden@{DOMAIN}"], raw)
    postfix.wait_for_log("status=sent", count=2)
    routed = rails.routed(2)
    assert rails.stored() == 2
    recipients = [set(entry["recipients"]) for entry in routed]  # type: ignore[call-overload]
    assert any(f"hidden@{DOMAIN}" in seen for seen in recipients), recipients  # a Bcc: only the envelope knew
    assert all(f"sales@{DOMAIN}" in seen for seen in recipients)
    ROWS["one message, two recipients (one a Bcc)"] = f"{verdict(postfix.log())}, twice | 2, routed to each |"


@pytest.mark.parametrize("trouble", ["wrong password", "app down"])
def test_trouble_defers_with_the_reason_and_a_flush_delivers_exactly_once(
    postfix: Postfix, rails: RailsApp, trouble: str
) -> None:
    if trouble == "wrong password":
        config(postfix).write(rails.url, "not-the-password")
        dsn, reason = "4.7.0", "ingress rejected the password"
    else:
        config(postfix).write(f"http://127.0.0.1:{free_port()}", rails.password)
        dsn, reason = "4.4.1", "connection refused by 127.0.0.1"
    before = postfix.log().count("status=deferred")
    subject = f"postfix {trouble}"
    postfix.send("alice@sender.test", [f"support@{DOMAIN}"], message(subject, to=f"support@{DOMAIN}"))
    log = postfix.wait_for_log("status=deferred", count=before + 1)
    assert f"dsn={dsn}, status=deferred ({reason}" in log  # Postfix took our enhanced code
    ROWS[trouble] = f"{verdict(log)} | 0 |"
    queue = postfix.queue()
    assert f"({reason}" in queue, queue
    assert rails.stored() == 0
    config(postfix).write(rails.url, rails.password)
    sent = postfix.log().count("status=sent")
    postfix.flush()
    postfix.wait_for_log("status=sent", count=sent + 1)
    assert rails.stored() == 1
    assert [entry["subject"] for entry in rails.routed(1)] == [subject]
    assert "Mail queue is empty" in postfix.queue()
    ROWS[f"{trouble}, fixed, then postqueue -f"] = f"{verdict(postfix.log())} | 1 |"


def test_an_invalid_message_bounces_with_the_5_6_0_line(postfix: Postfix, rails: RailsApp) -> None:
    config(postfix).write(rails.url, rails.password)
    bounced = postfix.log().count("status=bounced")
    # No From: field, and a line that is no header: Postfix passes it on as it came.
    raw = b"Subject: broken\r\nthis line is not a header field\r\n\r\nbody\r\n"
    postfix.send("alice@sender.test", [f"support@{DOMAIN}"], raw)
    log = postfix.wait_for_log("status=bounced", count=bounced + 1)
    assert "dsn=5.6.0, status=bounced (not an RFC 822 message" in log
    assert rails.stored() == 0
    ROWS["not an RFC 822 message"] = f"{verdict(log)} | 0 |"


def test_the_compatibility_table_shows_what_postfix_did() -> None:
    cases = [
        "one message, two recipients (one a Bcc)",
        "wrong password",
        "wrong password, fixed, then postqueue -f",
        "app down",
        "app down, fixed, then postqueue -f",
        "not an RFC 822 message",
    ]
    check_mta_table("postfix", POSTFIX_HEAD, ROWS, cases)


POSTFIX_HEAD = """## Postfix

Generated by `tests/e2e/test_postfix.py`: a private Postfix 3 instance with
`contrib/postfix-master.cf.example` and `contrib/postfix-main.cf.example` as shipped (only the
program and config paths substituted) runs `mailbox-relay deliver` as the user `mailrelay`
from the README's mail-host install, in front of the real Rails app. "What Postfix did" is the
verdict in Postfix's log: it takes mailbox-relay's enhanced status code as the DSN code.

| case | what Postfix did | stored in Rails |
|---|---|---|
"""
