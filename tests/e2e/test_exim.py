"""Exim, as a mail admin would set it up from contrib/, in front of the real Rails app: Debian's
Exim run privately with contrib's router and transport as shipped, running mailbox-relay as
the user `mailrelay` from the README's mail-host install."""

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
    Exim,
    RailsApp,
    RelayConfig,
    check_doc_section,
    ensure_user,
    mail_host_install,
    message,
    table_cell,
)

DOMAIN = "support.example.com"  # as in contrib/exim-router.example
ROWS: Dict[str, str] = {}  # case -> "| what Exim did | stored |", for docs/compatibility.md


def verdict(log: str) -> str:
    """Exim's last verdict in its mainlog: delivered (=>), deferred (==) or bounced (**), with
    mailbox-relay's line (log_defer_output, log_fail_output)."""
    marks = re.findall(r"^\S+ \S+ \S+ (=>|==|\*\*) ", log, re.M)
    assert marks, log[-2000:]
    said = re.findall(r"transport output: (.*)$", log, re.M)
    kind = {"=>": "delivered", "==": "deferred", "**": "bounced"}[marks[-1]]
    return table_cell(kind if kind == "delivered" else f"{kind}: {said[-1]}")


@pytest.fixture(scope="module")
def exim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exim]:
    ensure_user(RELAY_USER)
    root = Path("/tmp") / f"mailbox-relay-e2e-exim-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    relay = mail_host_install(root / "install")
    config = RelayConfig(root / "etc")
    config.write("http://127.0.0.1:9", "unset")
    server = Exim(root, relay, config.path)
    server.config = config  # type: ignore[attr-defined]
    server.start()
    yield server
    server.stop()
    if not os.environ.get("KEEP"):
        shutil.rmtree(root, ignore_errors=True)


def config(exim: Exim) -> RelayConfig:
    return exim.config  # type: ignore[attr-defined,no-any-return]


def test_two_recipients_reach_rails_routed_to_each(exim: Exim, rails: RailsApp) -> None:
    config(exim).write(rails.url, rails.password, retry_for=60)
    raw = message("exim two recipients", to=f"sales@{DOMAIN}")
    exim.send("alice@sender.test", [f"sales@{DOMAIN}", f"hidden@{DOMAIN}"], raw)
    exim.wait_for_log("Completed")
    routed = rails.routed(2)
    assert rails.stored() == 2
    recipients = [set(entry["recipients"]) for entry in routed]  # type: ignore[call-overload]
    assert any(f"hidden@{DOMAIN}" in seen for seen in recipients), recipients
    assert all(f"sales@{DOMAIN}" in seen for seen in recipients)
    ROWS["one message, two recipients (one a Bcc)"] = f"{verdict(exim.log())}, twice | 2, routed to each |"


@pytest.mark.parametrize("trouble", ["wrong password", "app down"])
def test_trouble_defers_with_the_reason_and_a_queue_run_delivers_exactly_once(
    exim: Exim, rails: RailsApp, trouble: str
) -> None:
    if trouble == "wrong password":
        config(exim).write(rails.url, "not-the-password")
        reason = "4.7.0 ingress rejected the password"
    else:
        config(exim).write(f"http://127.0.0.1:{free_port()}", rails.password)
        reason = "4.4.1 connection refused by 127.0.0.1"
    deferred = exim.log().count(" defer (")
    completed = exim.log().count("Completed")
    subject = f"exim {trouble}"
    exim.send("alice@sender.test", [f"support@{DOMAIN}"], message(subject, to=f"support@{DOMAIN}"))
    log = exim.wait_for_log(" defer (", count=deferred + 1)
    assert reason in log  # log_defer_output: mailbox-relay's line in the mainlog
    ROWS[trouble] = f"{verdict(log)} | 0 |"
    assert f"support@{DOMAIN}" in exim.queue()
    assert rails.stored() == 0
    config(exim).write(rails.url, rails.password)
    exim.flush()
    exim.wait_for_log("Completed", count=completed + 1)
    assert rails.stored() == 1
    assert [entry["subject"] for entry in rails.routed(1)] == [subject]
    assert exim.queue().strip() == ""
    ROWS[f"{trouble}, fixed, then exim -qff"] = f"{verdict(exim.log())} | 1 |"


def test_an_invalid_message_bounces_with_the_5_6_0_line(exim: Exim, rails: RailsApp) -> None:
    config(exim).write(rails.url, rails.password)
    failed = exim.log().count(" ** ")
    raw = b"Subject: broken\r\nthis line is not a header field\r\n\r\nbody\r\n"
    exim.send("alice@sender.test", [f"support@{DOMAIN}"], raw)
    log = exim.wait_for_log(" ** ", count=failed + 1)
    assert "5.6.0 not an RFC 822 message" in log
    assert rails.stored() == 0
    ROWS["not an RFC 822 message"] = f"{verdict(log)} | 0 |"


def test_the_compatibility_table_shows_what_exim_did() -> None:
    cases = [
        "one message, two recipients (one a Bcc)",
        "wrong password",
        "wrong password, fixed, then exim -qff",
        "app down",
        "app down, fixed, then exim -qff",
        "not an RFC 822 message",
    ]
    if set(cases) - set(ROWS):
        pytest.skip("the table needs every test of this module in the same run")
    rows = "\n".join(f"| {case} | {ROWS[case]}" for case in cases)
    check_doc_section("exim", EXIM_HEAD + rows + "\n")


EXIM_HEAD = """## Exim

Generated by `tests/e2e/test_exim.py`: Debian's Exim 4, run privately with
`contrib/exim-router.example` and `contrib/exim-transport.example` as shipped (only the program
and config paths substituted), runs `mailbox-relay deliver` as the user `mailrelay` from the
README's mail-host install, in front of the real Rails app. "What Exim did" is the verdict in
Exim's mainlog, with mailbox-relay's line as Exim logged it.

| case | what Exim did | stored in Rails |
|---|---|---|
"""
