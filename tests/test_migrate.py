"""migrate.py on its own: what each getmail and fetchmail option becomes (the e2e suite runs
the suite's own getmailrc and fetchmailrc through it into Rails: tests/e2e/test_migrate.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailbox_relay.accounts import parse_account
from mailbox_relay.migrate import MigrateError, from_fetchmailrc, from_getmailrc, render, unique

from .helpers import invoke

GETMAIL_POP3 = """[retriever]
type = SimplePOP3SSLRetriever
server = pop.example.com
username = me@example.com
password = hunter2

[destination]
type = MDA_external
path = /usr/local/bin/mailbox-relay
arguments = ("deliver", "--envelope-recipient", "me@example.com", "--url", "https://app.example/x")

[options]
delete = false
delete_after = 30
max_message_size = 1000000
read_all = false
"""

FETCHMAIL = """set daemon 300
poll pop.example.com protocol pop3 port 995 user "a@example.com" password "pw1" ssl keep
  mda "/usr/bin/mailbox-relay deliver"
poll imap.example.com proto imap user "b@example.com" folder "INBOX,Lists" fetchall
"""


def test_a_getmail_pop3_account_with_delete_after_and_a_deliver_line() -> None:
    account = from_getmailrc(GETMAIL_POP3, "rc", "/pw")
    table = account.table
    assert table["source"] == "pop3" and table["tls"] == "implicit" and table["after"] == "keep"
    assert table["delete_after"] == "30d" and table["envelope_recipient"] == ["me@example.com"]
    assert table["password_file"] == "/pw/me-pop-example-com.password" and account.secret == "hunter2"
    text = render([account])
    assert "hunter2" not in text and "max_size = 1000000" in text and 'url = "https://app.example/x"' in text
    parse_account(account.name, {**table}, "c")  # what it prints is a valid account


def test_fetchmail_polls_become_one_account_each() -> None:
    pop3, imap = from_fetchmailrc(FETCHMAIL, "rc", "/pw")
    assert (pop3.table["source"], pop3.table["port"], pop3.table["after"]) == ("pop3", 995, "keep")
    assert pop3.table["start"] == "new"  # keep: what fetchmail delivered is still there
    assert imap.table["folders"] == ["INBOX", "Lists"] and imap.table["after"] == "delete"
    assert imap.table["tls"] == "starttls" and "set daemon 300" in render([imap])
    for account in (pop3, imap):
        table = {key: value for key, value in account.table.items()}
        parse_account(account.name, table, "c")


def test_two_polls_of_one_name_get_distinct_names_and_password_files() -> None:
    twice = 'poll h user "u" password "a"\npoll h user "u" password "b"\n'
    accounts = from_fetchmailrc(twice, "rc", "/pw")
    unique(accounts, "/pw")
    assert [a.name for a in accounts] == ["u-h", "u-h-2"]
    assert accounts[1].table["password_file"] == "/pw/u-h-2.password"


@pytest.mark.parametrize(
    "text, words",
    [
        ("[retriever]\ntype = MultidropPOP3Retriever\nserver = h\nusername = u\n", "has no equivalent"),
        ("no sections here", "not a getmailrc"),
    ],
)
def test_what_cannot_be_moved_is_one_line(text: str, words: str) -> None:
    with pytest.raises(MigrateError) as raised:
        from_getmailrc(text, "rc", "/pw")
    assert words in str(raised.value)


def test_the_command_saves_passwords_0600_and_exits_65_and_66(tmp_path: Path) -> None:
    rc = tmp_path / "getmailrc"
    rc.write_text(GETMAIL_POP3)
    code, out, err = invoke(
        ["migrate", "getmailrc", str(rc), "--password-dir", str(tmp_path / "pw"), "--save-passwords"]
    )
    assert (code, err) == (0, "") and "hunter2" not in out
    saved = tmp_path / "pw" / "me-pop-example-com.password"
    assert saved.read_text() == "hunter2\n" and saved.stat().st_mode & 0o777 == 0o600
    assert invoke(["migrate", "getmailrc", str(tmp_path / "missing")])[0] == 66
    (tmp_path / "bad").write_text("poll\n")
    assert invoke(["migrate", "fetchmailrc", str(tmp_path / "bad")])[0] == 65
