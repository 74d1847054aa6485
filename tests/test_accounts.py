"""The [accounts.NAME] tables: presets, overrides, passwords, and one clear line for each mistake."""

from __future__ import annotations

import datetime
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict

import pytest

from mailbox_relay.accounts import ACCOUNT_FIELDS, After, accounts_from, choose_accounts, parse_account
from mailbox_relay.outcome import ConfigError

from .helpers import invoke

ROOT = Path(__file__).resolve().parents[1]


def account(**table: Any) -> Any:
    table = {"username": "u@example.com", "password": "pw", **table}
    return parse_account("box", {key: value for key, value in table.items() if value is not None}, "c.toml")


def refused(**table: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        account(**table)
    return caught.value.outcome.detail


def test_a_preset_gives_host_port_and_tls_and_each_can_be_overridden() -> None:
    gmail = account(provider="gmail")
    assert (gmail.host, gmail.port, gmail.tls) == ("imap.gmail.com", 993, "implicit")
    ms = account(provider="microsoft", port=1993)
    assert (ms.host, ms.port, ms.tls) == ("outlook.office365.com", 1993, "implicit")
    plain = account(host="imap.example.com", tls="starttls")
    assert (plain.port, plain.folders, plain.after, plain.start) == (143, ("INBOX",), After("keep"), "new")


@pytest.mark.parametrize(
    ("table", "says"),
    [
        ({"hots": "x"}, "unknown key 'hots' in [accounts.box]"),
        ({}, "needs host (or provider = gmail or google or microsoft)"),
        (
            {"provider": "yahoo"},
            "provider of [accounts.box] in c.toml must be one of gmail, google, microsoft",
        ),
        ({"host": "imap.example.com", "tls": "none"}, "tls = none is allowed only to a loopback host"),
        ({"host": "h", "port": 0}, "must be a port number"),
        ({"host": "h", "port": True}, "must be a port number"),
        ({"host": "h", "folders": []}, "must be a non-empty list of folder names"),
        ({"host": "h", "folders": "INBOX"}, "must be a non-empty list of folder names"),
        ({"host": "h", "after": "move:"}, "must be one of keep, seen, delete, move:FOLDER"),
        ({"host": "h", "after": "archive"}, "must be one of keep, seen, delete, move:FOLDER"),
        ({"host": "h", "start": "yesterday"}, "must be new, all or a date such as 2024-01-31"),
        ({"host": "h", "poll_interval": 0}, "must be at least 1 second"),
        ({"host": "h", "idle_refresh": float("nan")}, "must be a number up to"),
        ({"host": "h", "timeout": "1e999"}, "must be a number up to"),
        ({"host": "h", "envelope_recipient": "relay"}, "not an address"),
        ({"host": "h", "password_file": "/f"}, "has password_file and password: give only one of them"),
        ({"host": "h", "password": None, "password_command": "'unclosed"}, "cannot be split into words"),
    ],
)
def test_each_mistake_is_one_line_that_names_the_key(table: Dict[str, Any], says: str) -> None:
    assert says in refused(**table)


def test_an_account_needs_a_username_and_a_password() -> None:
    with pytest.raises(ConfigError, match="has no username"):
        parse_account("box", {"host": "h", "password": "pw"}, "c.toml")
    with pytest.raises(ConfigError, match="has no password_file, password_command or password"):
        parse_account("box", {"host": "h", "username": "u"}, "c.toml")


def test_after_and_start_forms() -> None:
    assert account(host="h", after="move:Done/Rails").after == After("move", "Done/Rails")
    assert str(account(host="h", after="move:Done").after) == "move:Done"
    assert account(host="h", start=datetime.date(2024, 1, 31)).start_date == datetime.date(2024, 1, 31)
    assert account(host="h", start="all").start_date is None


def test_passwords_come_from_a_file_or_a_command_and_are_never_described(tmp_path: Path) -> None:
    secret = tmp_path / "imap"
    secret.write_text("s3cret\nignored\n")
    secret.chmod(0o600)
    from_file = parse_account("box", {"host": "h", "username": "u", "password_file": str(secret)}, "c")
    assert from_file.password() == "s3cret"
    command = f"{sys.executable} -c 'print(\"from command\")'"
    from_command = parse_account("box", {"host": "h", "username": "u", "password_command": command}, "c")
    assert from_command.password() == "from command"
    inline = account(host="h", password="inline-secret")
    assert "inline-secret" not in " ".join(inline.describe()) + repr(inline.describe())
    failing = parse_account("box", {"host": "h", "username": "u", "password_command": "false"}, "c")
    with pytest.raises(ConfigError, match="password_command of account box exited 1"):
        failing.password()


def test_choosing_accounts_names_what_exists() -> None:
    accounts = accounts_from({"accounts": {"a": {"host": "h", "username": "u", "password": "p"}}}, "c")
    assert [a.name for a in choose_accounts(accounts, (), "c")] == ["a"]
    with pytest.raises(ConfigError, match="no account 'b'; configured: a"):
        choose_accounts(accounts, ("b",), "c")
    with pytest.raises(ConfigError, match=re.escape("no IMAP accounts: add an [accounts.NAME] table")):
        choose_accounts({}, (), "c")


def test_the_contrib_config_example_parses_with_its_account_uncommented(tmp_path: Path) -> None:
    text = (ROOT / "contrib" / "config.toml.example").read_text()
    start = text.index("# [accounts.support]")
    block = [
        line[2:]
        for line in text[start:].splitlines()
        if (line.startswith("# ") and "= " in line) or "[acc" in line
    ]
    config = tmp_path / "config.toml"
    config.write_text(text[:start] + "\n".join(line.replace("# host", "host") for line in block) + "\n")
    for name in ("support", "office"):  # a password account and an OAuth2 one
        code, out, err = invoke(
            ["status", "--account", name, "--config", str(config), "--fetch-state", str(tmp_path / "s")]
        )
        assert (code, err) == (0, ""), err
        assert "nothing fetched yet" in out


def test_fetch_without_accounts_says_how_to_add_one(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('url = "http://127.0.0.1:9"\npassword = "pw"\n')
    code, _, err = invoke(["fetch", "--config", str(config)], env={"XDG_STATE_HOME": str(tmp_path)})
    assert code == 78 and "no IMAP accounts: add an [accounts.NAME] table" in err
    code, _, err = invoke(["watch", "--config", str(config)], env={"XDG_STATE_HOME": str(tmp_path)})
    assert code == 78 and "no IMAP accounts" in err
    assert not os.path.exists(tmp_path / "mailbox-relay" / "fetch.sqlite3")


def test_a_source_other_than_imap_and_pop3_is_refused_until_it_exists() -> None:
    assert account(host="h").source == "imap"
    assert account(host="h", source="pop3").source == "pop3"
    assert "source of [accounts.box] in c.toml must be one of imap, pop3, graph" in refused(
        host="h", source="x"
    )


def test_each_value_says_where_it_came_from() -> None:
    lines = account(provider="microsoft", port=1993).describe()
    assert "account box: host = 'outlook.office365.com' (preset microsoft)" in lines
    assert "account box: tls = 'implicit' (preset microsoft)" in lines
    assert "account box: port = 1993 (config c.toml [accounts.box])" in lines
    assert "account box: folders = ('INBOX',) (default)" in lines
    assert "account box: after = 'keep' (default)" in lines
    assert "account box: password = <set> (config c.toml [accounts.box])" in lines
    assert not any("pw" in line.split(" = ")[-1] for line in lines)
    plain = account(host="h", tls="starttls").describe()
    assert "account box: port = 143 (default)" in plain


def test_every_account_key_is_a_field_with_help_and_timeout_says_what_it_bounds() -> None:
    assert all(field.help and field.group == "account" for field in ACCOUNT_FIELDS.values())
    assert "password" in ACCOUNT_FIELDS and "source" in ACCOUNT_FIELDS
    timeout = ACCOUNT_FIELDS["timeout"].help
    assert "each whole IMAP command" in timeout and "each whole OAuth2 token request" in timeout


def test_check_account_v_shows_each_account_value_and_its_source(tmp_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text(
        'url = "http://127.0.0.1:9"\npassword = "pw"\n'
        '[accounts.box]\nhost = "127.0.0.1"\nport = 9\ntls = "none"\nusername = "u"\npassword = "imap-pw"\n'
    )
    code, _, err = invoke(["check", "--account", "box", "-v", "--config", str(config)])
    assert code == 69, err  # nothing listens on port 9
    where = f"config {config} [accounts.box]"
    assert f"account box: host = '127.0.0.1' ({where})" in err
    assert f"account box: password = <set> ({where})" in err and "imap-pw" not in err
    assert "account box: timeout = 30.0 (default)" in err and "account box: source = 'imap' (default)" in err
