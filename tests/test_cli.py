"""The deliver command in-process: options, env and config precedence, output and exit codes."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from . import helpers
from .helpers import RELAY_PATH as PATH
from .peers import LocalServe

MESSAGE = b"From: a@example.com\nTo: b@example.com\nSubject: hi\n\nbody\n"


def invoke(
    args: List[str], stdin: bytes = MESSAGE, env: Optional[Dict[str, str]] = None
) -> Tuple[int, str, str]:
    """deliver's tests send MESSAGE unless they say otherwise."""
    return helpers.invoke(args, stdin, env)


@pytest.fixture
def ingress(httpserver: HTTPServer) -> List[Request]:
    seen: List[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(status=204)

    httpserver.expect_request(PATH, method="POST").respond_with_handler(handler)
    return seen


def test_success_is_silent_and_exits_0(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request]
) -> None:
    code, out, err = invoke(
        ["deliver", "--url", httpserver.url_for("/")], env={"MAILBOX_RELAY_PASSWORD": "pw"}
    )
    assert (code, out, err) == (0, "", "")
    assert ingress[0].get_data() == MESSAGE
    assert ingress[0].path == PATH  # a bare URL gets the relay path


def test_verbose_says_where_each_setting_came_from_but_not_the_password(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request]
) -> None:
    env = {"MAILBOX_RELAY_URL": httpserver.url_for(PATH), "MAILBOX_RELAY_PASSWORD": "hunter2-secret"}
    code, _, err = invoke(["deliver", "-v", "--timeout", "9"], env=env)
    assert code == 0
    assert "url = " in err and "(env MAILBOX_RELAY_URL)" in err
    assert "timeout = 9.0 (option --timeout)" in err
    assert "password = <set> (env MAILBOX_RELAY_PASSWORD)" in err
    assert "hunter2-secret" not in err


def test_config_file_supplies_everything(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request], tmp_path: Path
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(
        f'url = "{httpserver.url_for(PATH)}"\npassword = "cfg"\nenvelope_recipient = ["x@example.com"]\n'
    )
    code, _, err = invoke(["deliver", "--config", str(config)])
    assert (code, err) == (0, "")
    assert ingress[0].authorization is not None and ingress[0].authorization.password == "cfg"
    assert ingress[0].get_data().startswith(b"X-Original-To: x@example.com\n")


def test_option_beats_env_beats_config_end_to_end(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request], tmp_path: Path
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('url = "http://127.0.0.1:9/never"\npassword = "cfg"\nuser_agent = "from-config"\n')
    env = {
        "MAILBOX_RELAY_CONFIG": str(config),
        "MAILBOX_RELAY_PASSWORD": "env-pw",
        "MAILBOX_RELAY_URL": "http://127.0.0.1:9/never-either",
        "MAILBOX_RELAY_USER_AGENT": "from-env",
    }
    code, _, err = invoke(["deliver", "--url", httpserver.url_for(PATH)], env=env)
    assert (code, err) == (0, "")
    assert ingress[0].headers["User-Agent"] == "from-env"
    assert ingress[0].authorization is not None and ingress[0].authorization.password == "env-pw"


@pytest.mark.parametrize(
    ("status", "first_words"),
    [
        (401, "4.7.0 ingress rejected the password for user actionmailbox (HTTP 401)"),
        (404, "4.3.5 no relay ingress at"),
        (415, "4.3.5 ingress refused Content-Type message/rfc822 (HTTP 415)"),
        (413, "4.3.4 message of 56 bytes is larger than the ingress accepts (HTTP 413)"),
    ],
)
def test_failures_print_one_line_and_exit_75(
    clean_env: Dict[str, str], httpserver: HTTPServer, status: int, first_words: str
) -> None:
    httpserver.expect_request(PATH).respond_with_data("", status=status)
    env = {"MAILBOX_RELAY_PASSWORD": "pw"}
    code, out, err = invoke(["deliver", "--url", httpserver.url_for(PATH)], env=env)
    assert code == 75 and out == ""
    assert err.startswith(first_words)
    assert err.count("\n") == 1
    code, _, _ = invoke(["deliver", "--url", httpserver.url_for(PATH), "--exit-codes", "qmail"], env=env)
    assert code == 111


def test_invalid_message_is_permanent_and_nothing_is_sent(
    clean_env: Dict[str, str], httpserver: HTTPServer
) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    code, _, err = invoke(["deliver"], stdin=b"just text\n", env=env)
    assert code == 65
    assert err == "5.6.0 not an RFC 822 message: line 1 is not a header field (no header section)\n"
    code, _, _ = invoke(["deliver"], stdin=b"", env={**env, "MAILBOX_RELAY_EXIT_CODES": "qmail"})
    assert code == 100
    assert httpserver.log == []


def test_max_size_refuses_before_sending(clean_env: Dict[str, str], httpserver: HTTPServer) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    code, _, err = invoke(["deliver", "--max-size", "10"], env=env)
    assert code == 65 and err.startswith("5.3.4 ")
    assert httpserver.log == []


def test_missing_settings_are_temporary(clean_env: Dict[str, str]) -> None:
    code, _, err = invoke(["deliver"], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 75 and err.startswith("4.3.5 no ingress URL")
    code, _, _ = invoke(["deliver", "--exit-codes", "qmail"], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 111


def test_exit_codes_from_config_apply_even_when_the_password_is_missing(
    clean_env: Dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('exit_codes = "qmail"\nurl = "https://x.example.com"\n')
    code, _, err = invoke(["deliver", "--config", str(config)])
    assert code == 111 and "no ingress password" in err


def test_password_on_argv_is_refused_with_advice(clean_env: Dict[str, str]) -> None:
    code, _, err = invoke(["deliver", "--password", "hunter2", "--url", "https://x.example.com"])
    assert code == 75
    assert err.startswith("4.3.5 usage error:") and "MAILBOX_RELAY_PASSWORD" in err


def test_usage_errors_in_deliver_exit_75_in_one_line(clean_env: Dict[str, str]) -> None:
    code, _, err = invoke(["deliver", "--no-such-option"])
    assert code == 75 and err.startswith("4.3.5 usage error: no such option") and err.count("\n") == 1
    assert invoke(["deliver", "--timeout", "soon"])[0] == 75
    assert invoke(["deliver", "--exit-codes", "qmail", "--timeout", "soon"])[0] == 111
    assert invoke(["no-such-command"])[0] == 75


def test_readable_password_file_warns_only_on_failure(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request], tmp_path: Path
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    args = ["deliver", "--password-file", str(secret), "--url", httpserver.url_for(PATH)]
    assert invoke(args) == (0, "", "")
    code, _, err = invoke(args, stdin=b"not a message")
    assert code == 65
    first, second = err.splitlines()
    assert first.startswith("5.6.0") and "chmod 600" in second


def test_message_from_a_file_argument(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request], tmp_path: Path
) -> None:
    message = tmp_path / "m.eml"
    message.write_bytes(b"From x Mon\r\n" + MESSAGE.replace(b"\n", b"\r\n"))
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    assert invoke(["deliver", str(message)], stdin=b"", env=env) == (0, "", "")
    assert ingress[0].get_data() == MESSAGE.replace(b"\n", b"\r\n")
    code, _, err = invoke(["deliver", str(tmp_path / "missing.eml")], env=env)
    assert code == 75 and "cannot read the message file" in err


def test_fetchmail_style_recipient_list(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request]
) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    assert invoke(["deliver", "--envelope-recipient", "'b@example.com' 'c@example.com'"], env=env)[0] == 0
    # b@example.com is in To: but not X-Original-To, so both are added, in order
    assert ingress[0].get_data() == b"X-Original-To: b@example.com\nX-Original-To: c@example.com\n" + MESSAGE


def test_unexpected_exception_defers_instead_of_crashing(
    clean_env: Dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("mailbox_relay.deliver.prepare", explode)
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": "https://x.example.com"}
    code, _, err = invoke(["deliver"], env=env)
    assert code == 75
    assert err.startswith("4.3.0 internal error (RuntimeError: boom)")


def test_help_lists_every_option_and_env_name(clean_env: Dict[str, str]) -> None:
    code, out, _ = invoke(["deliver", "--help"])
    assert code == 0
    for option in (
        "--url",
        "--password-file",
        "--config",
        "--timeout",
        "--retry-for",
        "--max-size",
        "--envelope-recipient",
        "--ca-bundle",
        "--insecure",
        "--allow-http",
        "--user-agent",
        "--verbose",
        "--exit-codes",
    ):
        assert option in out
    for env in ("MAILBOX_RELAY_URL", "MAILBOX_RELAY_PASSWORD", "INGRESS_PASSWORD", "MAILBOX_RELAY_RETRY_FOR"):
        assert env in out
    assert "--password " not in out  # hidden: only there to refuse


def test_a_usage_error_exits_in_the_convention_asked_for_in_any_spelling(clean_env: Dict[str, str]) -> None:
    assert invoke(["deliver", "--exit-codes=qmail", "--no-such-option"])[0] == 111
    assert invoke(["deliver", "--exit-codes", "qmail", "--no-such-option"])[0] == 111
    assert invoke(["deliver", "--no-such-option"], env={"MAILBOX_RELAY_EXIT_CODES": "qmail"})[0] == 111
    # the last --exit-codes wins, as click reads it
    assert invoke(["deliver", "--exit-codes=qmail", "--exit-codes", "sysexits", "--bogus"])[0] == 75


def test_exit_codes_from_the_config_file_apply_to_usage_errors(
    clean_env: Dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "c.toml"
    config.write_text('exit_codes = "qmail"\n')
    assert invoke(["deliver", "--config", str(config), "--bogus"])[0] == 111
    assert invoke(["deliver", "--bogus"], env={"MAILBOX_RELAY_CONFIG": str(config)})[0] == 111


def test_no_command_is_a_temporary_failure_for_an_mta(clean_env: Dict[str, str]) -> None:
    """`mailbox-relay < message` (a pipe missing its `deliver`): defer, never bounce with 64."""
    code, out, err = invoke([])
    assert (code, out) == (75, "")
    assert err.startswith("mailbox-relay: error: missing command") and err.count("\n") == 1
    assert invoke([], env={"MAILBOX_RELAY_EXIT_CODES": "qmail"})[0] == 111


def test_top_level_help_lists_each_command_once(clean_env: Dict[str, str]) -> None:
    code, out, _ = invoke(["--help"])
    assert code == 0
    for command in ("deliver", "import", "check", "serve"):
        assert len(re.findall(rf"^  {command} ", out, re.M)) == 1, out


def test_a_bad_option_value_is_checked_once_by_its_field(clean_env: Dict[str, str]) -> None:
    """No click type: the field's parser says what is wrong, the same for option, env and TOML."""
    code, _, err = invoke(["deliver", "--timeout", "nan"], env={"MAILBOX_RELAY_URL": "https://x.example.com"})
    assert code == 75 and err.startswith("4.3.5 --timeout must be a number")
    code, _, err = invoke(
        ["deliver"], env={"MAILBOX_RELAY_URL": "https://x.example.com", "MAILBOX_RELAY_TIMEOUT": "nan"}
    )
    assert code == 75 and err.startswith("4.3.5 MAILBOX_RELAY_TIMEOUT must be a number")


@pytest.mark.parametrize("password", ["pässwörd", "pass€word", "日本語のパスワード"])
def test_non_ascii_passwords_are_sent_as_utf8(
    clean_env: Dict[str, str], tmp_path: Path, password: str
) -> None:
    with LocalServe(str(tmp_path / "inbox"), password=password) as serve:
        assert invoke(["deliver", "--url", serve.base], env={"MAILBOX_RELAY_PASSWORD": password}) == (
            0,
            "",
            "",
        )
        code, _, err = invoke(
            ["deliver", "--url", serve.base], env={"MAILBOX_RELAY_PASSWORD": password + "x"}
        )
    assert code == 75 and err.startswith("4.7.0 ") and password not in err


def test_max_size_counts_the_bytes_sent(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request]
) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    envelope = b"From alice@example.com Mon Jan  1 00:00:00 2024\n"
    limit = str(len(MESSAGE))
    assert invoke(["deliver", "--max-size", limit], stdin=envelope + MESSAGE, env=env)[0] == 0
    code, _, err = invoke(["deliver", "--max-size", limit, "--envelope-recipient", "c@example.com"], env=env)
    added = len(b"X-Original-To: c@example.com\n")
    assert code == 65 and err.startswith(f"5.3.4 message of {len(MESSAGE) + added} bytes")
    assert [request.get_data() for request in ingress] == [MESSAGE]


def test_an_obsolete_from_field_first_is_a_header_not_an_envelope(
    clean_env: Dict[str, str], httpserver: HTTPServer, ingress: List[Request]
) -> None:
    message = b"From : alice@example.com\nTo: b@example.com\n\nbody\n"
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    assert invoke(["deliver"], stdin=message, env=env) == (0, "", "")
    assert ingress[0].get_data() == message


def test_check_import_and_serve_warn_about_a_readable_password_file(
    clean_env: Dict[str, str], tmp_path: Path
) -> None:
    secret = tmp_path / "pw"
    secret.write_text("pw\n")
    secret.chmod(0o644)
    warning = (
        f"mailbox-relay: warning: password file {secret} is readable by group or others; chmod 600 {secret}"
    )
    with LocalServe(str(tmp_path / "inbox")) as serve:
        check = invoke(["check", "--url", serve.base, "--password-file", str(secret)])
        mbox = tmp_path / "in.mbox"
        mbox.write_bytes(b"From a@b Mon Jan  1 00:00:00 2024\n" + MESSAGE)
        imported = invoke(
            ["import", "--no-state", "-q", "--url", serve.base, "--password-file", str(secret), str(mbox)]
        )
    assert check[0] == 0 and warning in check[2]
    assert imported[0] == 0 and warning in imported[2]
    with socket.socket() as busy:  # serve reads its password, warns, then cannot listen here
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        served = invoke(["serve", "--port", str(busy.getsockname()[1]), "--password-file", str(secret)])
    assert served[0] == 69 and warning in served[2]


def test_a_recipient_that_is_not_an_address_is_refused_and_nothing_is_sent(
    clean_env: Dict[str, str], httpserver: HTTPServer
) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": httpserver.url_for(PATH)}
    code, out, err = invoke(["deliver", "--envelope-recipient", "'relay'"], env=env)
    assert (code, out) == (75, "") and err.count("\n") == 1
    assert err.startswith("4.3.5 ") and "not an address" in err
    assert httpserver.log == []


def test_a_misspelt_exit_code_convention_is_said_not_ignored(clean_env: Dict[str, str]) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_URL": "https://x.example.com"}
    code, _, err = invoke(["deliver"], env={**env, "MAILBOX_RELAY_EXIT_CODES": "qmial"})
    assert code == 75 and "MAILBOX_RELAY_EXIT_CODES must be one of sysexits, qmail" in err
    code, _, err = invoke(["deliver", "--exit-codes", "qmial"], env=env)
    assert code == 75 and "--exit-codes must be one of sysexits, qmail" in err
