"""A refused IMAP login, by its RFC 5530 response code, against a tiny scripted IMAP server that
IMAPClient talks to for real (tests/peers.py ScriptedImap); and the wording of refused tokens."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any, Dict

import pytest

from mailbox_relay.accounts import Account, parse_account
from mailbox_relay.sources.imap import ImapProblem, connect, describe, response_code

from .helpers import invoke
from .peers import ScriptedImap


def account(port: int, tmp_path: Path, **keys: Any) -> Account:
    table: Dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "username": "u",
        "timeout": 2,
        **keys,
    }
    if "auth" not in table:
        table.setdefault("password", "p")
    return parse_account("box", table, str(tmp_path / "config.toml"), str(tmp_path / "grants"))


def refused(answer: bytes, tmp_path: Path, **keys: Any) -> ImapProblem:
    with ScriptedImap(answer) as server, pytest.raises(ImapProblem) as problem:
        connect(account(server.port, tmp_path, **keys))
    problem.value.logins = server.logins  # type: ignore[attr-defined]
    return problem.value


def config(tmp_path: Path, port: int, **keys: Any) -> Path:
    path = tmp_path / "config.toml"
    lines = [f'url = "http://127.0.0.1:9"\npassword = "pw"\nfetch_state = "{tmp_path}/state"\n[accounts.box]']
    table = {"host": "127.0.0.1", "port": port, "tls": "none", "username": "u", "timeout": 2, **keys}
    if "auth" not in table:
        table.setdefault("password", "p")
    lines += [f"{key} = {json.dumps(value)}" for key, value in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


TEMPORARY = [
    b"NO [UNAVAILABLE] Maximum number of connections from user+IP exceeded",
    b"NO [INUSE] Mailbox in use",
    b"NO [LIMIT] Too many logins",
]


@pytest.mark.parametrize("answer", TEMPORARY, ids=["UNAVAILABLE", "INUSE", "LIMIT"])
def test_a_temporary_refusal_is_unavailable_and_says_what_the_server_said(
    answer: bytes, tmp_path: Path
) -> None:
    problem = refused(answer, tmp_path)
    said = answer[3:].decode()
    assert problem.kind == "unavailable"
    assert problem.line == f"127.0.0.1 refused the login for now ({said}); trying again later"
    assert "password" not in problem.line


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (b"NO [AUTHENTICATIONFAILED] Authentication failed.", "check the password of account box"),
        (b"NO [AUTHORIZATIONFAILED] Not authorized", "check the password of account box"),
        (b"NO [EXPIRED] Password expired", "the password of account box has expired"),
        (b"NO Login failed", "check the password of account box"),
    ],
    ids=["AUTHENTICATIONFAILED", "AUTHORIZATIONFAILED", "EXPIRED", "no code"],
)
def test_a_refusal_of_the_credentials_is_login(answer: bytes, words: str, tmp_path: Path) -> None:
    problem = refused(answer, tmp_path)
    assert problem.kind == "login" and words in problem.line, problem.line
    assert f"({answer[3:].decode()})" in problem.line


def test_privacy_required_is_tls(tmp_path: Path) -> None:
    problem = refused(b"NO [PRIVACYREQUIRED] Plaintext authentication disallowed", tmp_path)
    assert problem.kind == "tls" and 'set tls = "starttls"' in problem.line, problem.line


def test_a_non_ascii_password_refused_for_now_by_authenticate_plain_too(tmp_path: Path) -> None:
    problem = refused(b"NO [UNAVAILABLE] Try later", tmp_path, password="pässwörd")
    assert problem.kind == "unavailable" and problem.logins == [b"AUTHENTICATE PLAIN"]  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("answer", "code", "line"),
    [
        (TEMPORARY[0], 69, "✗ imap unavailable: 127.0.0.1 refused the login for now ([UNAVAILABLE]"),
        (b"NO [AUTHENTICATIONFAILED] Authentication failed.", 77, "✗ imap login: IMAP login of u"),
        (b"NO [PRIVACYREQUIRED] Use TLS", 78, "✗ imap tls: 127.0.0.1 requires TLS before login"),
    ],
    ids=["unavailable", "login", "tls"],
)
def test_check_and_fetch_exit_codes_by_refusal(answer: bytes, code: int, line: str, tmp_path: Path) -> None:
    with ScriptedImap(answer) as server:
        path = config(tmp_path, server.port)
        status, out, _ = invoke(["check", "--account", "box", "--config", str(path)])
        assert status == code and line in out, out
        status, out, err = invoke(["fetch", "--config", str(path)])
        assert status == 75 and line[2:].split(": ", 1)[1] in out + err, out + err


# --- XOAUTH2 ----------------------------------------------------------------------------------


def token_command(tmp_path: Path, token: str) -> str:
    script = tmp_path / "token.sh"
    script.write_text(f"#!/bin/sh\necho {token}\n")
    script.chmod(0o700)
    return str(script)


def jwt(exp: float) -> str:
    def part(value: Dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part({'exp': int(exp), 'sub': 'u'})}.sig"


def xoauth2(tmp_path: Path, token: str = "at-opaque") -> Dict[str, Any]:
    return {"auth": "xoauth2", "oauth2_token_command": token_command(tmp_path, token)}


@pytest.mark.parametrize("answer", TEMPORARY, ids=["UNAVAILABLE", "INUSE", "LIMIT"])
def test_a_temporary_xoauth2_refusal_renews_no_token(answer: bytes, tmp_path: Path) -> None:
    problem = refused(answer, tmp_path, **xoauth2(tmp_path))
    assert problem.kind == "unavailable" and "refused the login for now" in problem.line
    assert problem.logins == [b"AUTHENTICATE XOAUTH2"]  # type: ignore[attr-defined]  # once


def test_a_refused_token_from_a_token_command_says_to_check_the_command_not_auth(tmp_path: Path) -> None:
    problem = refused(b"NO [AUTHENTICATIONFAILED] Authentication failed.", tmp_path, **xoauth2(tmp_path))
    assert problem.kind == "login"
    assert problem.logins == [b"AUTHENTICATE XOAUTH2"] * 2  # type: ignore[attr-defined]  # renewed once
    assert "check what oauth2_token_command of account box prints" in problem.line
    assert "mailbox-relay auth" not in problem.line


def test_a_token_command_token_already_expired_blames_the_command_or_clock(tmp_path: Path) -> None:
    expired = jwt(time.time() - 600)
    problem = refused(
        b"NO [AUTHENTICATIONFAILED] Authentication failed.", tmp_path, **xoauth2(tmp_path, expired)
    )
    assert "oauth2_token_command printed a token that had already expired" in problem.line
    assert "check this host's clock, or the command" in problem.line
    assert "username" not in problem.line and expired not in problem.line
    assert problem.kind == "network"  # tried again later, not given up on


def test_a_jwt_from_a_token_command_is_used_until_its_exp(tmp_path: Path) -> None:
    from mailbox_relay.sources.oauth2 import TokenSource

    exp = time.time() + 900
    token = TokenSource(account(1, tmp_path, **xoauth2(tmp_path, jwt(exp)))).current()
    assert abs(token.expires_at - int(exp)) < 1 and not token.expired_when_issued


def test_a_grant_whose_endpoint_issues_expired_tokens_blames_the_endpoint(
    tmp_path: Path, httpserver: Any
) -> None:
    httpserver.expect_request("/token").respond_with_json({"access_token": "at-dead", "expires_in": 0})
    keys = {"auth": "xoauth2", "oauth2_client_id": "c", "oauth2_token_url": httpserver.url_for("/token")}
    grants = tmp_path / "grants"
    grants.mkdir(mode=0o700)
    (grants / "box.json").write_text('{"refresh_token": "rt-x"}')
    (grants / "box.json").chmod(0o600)
    problem = refused(b"NO [AUTHENTICATIONFAILED] Authentication failed.", tmp_path, **keys)
    assert "issued a token that had already expired: check this host's clock" in problem.line, problem.line
    assert "username" not in problem.line and "at-dead" not in problem.line


def test_describe_drops_dovecots_timing_and_response_code_reads_the_code() -> None:
    error = Exception("select failed: Mailbox doesn't exist: x (0.001 + 0.000 secs).")
    assert describe(error) == "select failed: Mailbox doesn't exist: x"
    assert response_code("[UNAVAILABLE] Maximum number") == "UNAVAILABLE"
    assert response_code("[ALERT] hello") == "ALERT" and response_code("no code") is None
