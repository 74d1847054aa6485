"""The outcome table, row by row: no HTTP needed."""

from __future__ import annotations

import pytest

from mailbox_relay.ingress.answers import classify_response
from mailbox_relay.outcome import (
    DELIVERED,
    Kind,
    Outcome,
    Reason,
    Trouble,
    auth_exit_code,
    check_exit_code,
    exit_code,
)

from .helpers import RELAY_PATH

URL = "https://app.example.com" + RELAY_PATH


@pytest.mark.parametrize(
    ("status", "reason", "retry", "words"),
    [
        (200, Reason.DELIVERED, False, "delivered"),
        (204, Reason.DELIVERED, False, "delivered"),
        (301, Reason.REDIRECT, False, "https://elsewhere.example.com/x"),
        (308, Reason.REDIRECT, False, "never follows redirects"),
        (401, Reason.AUTH, False, "password for user actionmailbox (HTTP 401)"),
        (403, Reason.FORBIDDEN, False, "HTTP 403"),
        (404, Reason.NOT_FOUND, False, "config.action_mailbox.ingress = :relay"),
        (408, Reason.BUSY, True, "HTTP 408"),
        (413, Reason.INGRESS_LIMIT, False, "client_max_body_size"),
        (415, Reason.WRONG_MEDIA_TYPE, False, "message/rfc822"),
        (422, Reason.CLIENT_ERROR, False, "HTTP 422"),
        (429, Reason.BUSY, True, "rate limiting"),
        (500, Reason.SERVER_ERROR, True, "HTTP 500"),
        (503, Reason.SERVER_ERROR, True, "HTTP 503"),
    ],
)
def test_each_status_has_one_row(status: int, reason: Reason, retry: bool, words: str) -> None:
    outcome = classify_response(status, url=URL, location="https://elsewhere.example.com/x")
    assert outcome.reason is reason
    assert outcome.reason.retry is retry
    assert words in outcome.line()
    if not outcome.delivered:
        assert outcome.kind is Kind.TEMPORARY  # only a bad message is ever permanent
        assert outcome.line()[:2] == "4."


def test_404_on_a_postfix_path_names_the_relay_path() -> None:
    url = "https://app.example.com/rails/action_mailbox/postfix/inbound_emails"
    line = classify_response(404, url=url).line()
    assert f"use https://app.example.com{RELAY_PATH}" in line
    assert "config.action_mailbox.ingress = :relay" in line


def test_401_names_where_the_password_came_from() -> None:
    line = classify_response(401, url=URL, password_source="env MAILBOX_RELAY_PASSWORD").line()
    assert line.startswith("4.7.0 ")
    assert "env MAILBOX_RELAY_PASSWORD" in line


def test_413_names_the_size() -> None:
    assert "of 1234 bytes" in classify_response(413, url=URL, size=1234).line()


def test_retry_after_travels_with_retryable_rows() -> None:
    assert classify_response(503, url=URL, retry_after=7.0).retry_after == 7.0
    assert classify_response(429, url=URL, retry_after=3.0).retry_after == 3.0


@pytest.mark.parametrize(
    ("kind_outcome", "sysexits", "qmail"),
    [
        (DELIVERED, 0, 0),
        (Outcome(Reason.INVALID_MESSAGE, "x"), 65, 100),
        (Outcome(Reason.TOO_BIG, "x"), 65, 100),
        (Outcome(Reason.AUTH, "x"), 75, 111),
        (Outcome(Reason.CONFIG, "x"), 75, 111),
        (Outcome(Reason.INTERNAL, "x"), 75, 111),
        (Outcome(Reason.INTERRUPTED, "x"), 75, 111),
        (Outcome(Reason.SERVER_ERROR, "x"), 75, 111),
    ],
)
def test_exit_codes_by_style(kind_outcome: Outcome, sysexits: int, qmail: int) -> None:
    assert exit_code(kind_outcome) == exit_code(kind_outcome, "sysexits") == sysexits
    assert exit_code(kind_outcome, "qmail") == qmail


def test_every_permanent_row_is_about_the_message_itself() -> None:
    permanent = {reason for reason in Reason if reason.kind is Kind.PERMANENT}
    assert permanent == {Reason.INVALID_MESSAGE, Reason.TOO_BIG}
    assert all(reason.code.startswith("5.") for reason in permanent)
    temporary = [reason for reason in Reason if reason.kind is Kind.TEMPORARY]
    assert all(reason.code.startswith("4.") for reason in temporary)


@pytest.mark.parametrize(
    ("status", "code"), [(204, 0), (401, 77), (403, 77), (404, 78), (301, 78), (500, 69), (429, 69)]
)
def test_check_exit_codes(status: int, code: int) -> None:
    assert check_exit_code(classify_response(status, url=URL)) == code


def test_attempt_count_is_added_only_after_a_retry() -> None:
    outcome = Outcome(Reason.SERVER_ERROR, "x")
    assert outcome.after(1, 0.1).detail == "x"
    assert outcome.after(3, 12.4).detail == "x [3 attempts over 12s]"


def test_every_problem_kind_of_the_sources_has_a_trouble_row() -> None:
    """The kinds the sources raise (ImapProblem, TokenProblem, SourceProblem) are Trouble's
    values, so Trouble(kind) works."""
    import ast
    from pathlib import Path

    kinds = set()
    for name in ("sources/imap.py", "sources/oauth2.py", "sources/__init__.py"):
        tree = ast.parse((Path(__file__).resolve().parents[1] / "mailbox_relay" / name).read_text())
        for node in ast.walk(tree):
            raised = ("ImapProblem", "TokenProblem", "SourceProblem")
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") in raised:
                first = node.args[0] if node.args else None
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    kinds.add(first.value)
    assert {"dns", "connect", "tls", "login", "grant", "folder", "network", "client", "denied"} <= kinds
    assert kinds <= {trouble.value for trouble in Trouble}


@pytest.mark.parametrize(
    ("kind", "check", "temporary", "auth"),
    [
        ("login", 77, False, 78),
        ("grant", 77, False, 78),
        ("tls", 78, False, 78),
        ("folder", 78, False, 78),
        ("client", 78, False, 78),
        ("network", 69, True, 75),
        ("unavailable", 69, True, 75),
        ("denied", 77, False, 77),
        ("timeout", 69, True, 75),
        ("something new", 69, True, 75),  # an unknown kind may pass by itself
    ],
)
def test_trouble_rows(kind: str, check: int, temporary: bool, auth: int) -> None:
    trouble = Trouble.of(kind)
    assert (trouble.check_code, trouble.temporary, auth_exit_code(trouble)) == (check, temporary, auth)
