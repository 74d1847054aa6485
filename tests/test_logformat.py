"""Log lines an operator can use: each line about a message or folder names account, folder and
UID (retry lines too); --log-format json; timestamps unless stderr is the journal's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

from pytest_httpserver import HTTPServer

from mailbox_relay.accounts import parse_account
from mailbox_relay.fetch.once import make_post
from mailbox_relay.fetch.rules import FolderSync
from mailbox_relay.log import about
from mailbox_relay.logformat import as_json, plain
from mailbox_relay.state.folders import FetchState

from .helpers import RELAY_PATH, make_settings
from .peers import free_port

KEYS = ["ts", "level", "event", "account", "folder", "uid", "code", "message"]


class OneMessage:
    """A folder with one message, UID 7."""

    key_label = "UID"

    def open(self, name: str) -> object:
        from mailbox_relay.sources.mailbox import Opened

        return Opened("1", 1, "7")

    def listing(self, cursor: object, since: object, through: object = None) -> object:
        from mailbox_relay.sources.mailbox import Listing

        return Listing(["7"] if cursor is None else [], checkpoints={"7": "7"})

    def sizes(self, keys: List[str]) -> Dict[str, int]:
        return {key: 40 for key in keys}

    def fetch(self, keys: List[str], sizes: object) -> Dict[str, bytes]:
        return {key: b"From: a@example.com\r\nSubject: 7\r\n\r\nhello\r\n" for key in keys}

    def acknowledge(self, keys: object, after: object) -> None:
        pass


def test_a_retried_delivery_names_account_folder_and_uid(httpserver: HTTPServer, tmp_path: Path) -> None:
    httpserver.expect_ordered_request(RELAY_PATH).respond_with_data("busy", status=503)
    httpserver.expect_ordered_request(RELAY_PATH).respond_with_data("", status=204)
    settings = make_settings(url=httpserver.url_for(RELAY_PATH), retry_for=30)
    lines: List[str] = []
    session, post = make_post(settings, lines.append)
    account = parse_account("box", {"host": "h", "username": "u", "password": "p", "start": "all"}, "c")
    state = FetchState(str(tmp_path / "state.sqlite3"))
    try:
        sync = FolderSync(account, state, post, log=lines.append, events=lines.append)
        result = sync.run(OneMessage(), "INBOX")  # type: ignore[arg-type]
    finally:
        session.close()
        state.close()
    assert result.delivered == 1
    retry, delivered = lines
    assert retry.startswith("box/INBOX: UID 7: attempt 1: 4.3.0 ") and "retrying in" in retry
    records = [json.loads(as_json(line)) for line in lines]
    assert [list(record) for record in records] == [KEYS, KEYS]
    assert {key: records[0][key] for key in ("event", "account", "folder", "uid", "code", "level")} == {
        "event": "retry",
        "account": "box",
        "folder": "INBOX",
        "uid": "7",
        "code": "4.3.0",
        "level": "warning",
    }
    assert records[1]["event"] == "delivered" and records[1]["message"] == delivered


def test_a_line_about_nothing_in_particular_has_every_key() -> None:
    record = json.loads(as_json("watching box (INBOX)", now=lambda: 0.5))
    assert record == dict.fromkeys(KEYS) | {
        "ts": "1970-01-01T00:00:00.500Z",
        "level": "info",
        "event": "log",
        "message": "watching box (INBOX)",
    }
    assert (
        json.loads(as_json(about("x", "paused", account="a", folder="F"), level="error"))["level"] == "info"
    )


def test_plain_lines_are_stamped_unless_asked_not_to() -> None:
    assert plain(about("box/INBOX: x", "e"), stamped=False) == "mailbox-relay: box/INBOX: x"
    stamped = plain("box/INBOX: x", stamped=True, now=lambda: 0.0)
    assert stamped.startswith("1970-01-0") and stamped.endswith(" mailbox-relay: box/INBOX: x")


def fetch_lines(tmp_path: Path, clean_env: Dict[str, str], *args: str, journal: bool = False) -> List[str]:
    """`mailbox-relay fetch` of an account whose server refuses connections; its stderr lines."""
    config = tmp_path / "config.toml"
    config.write_text(
        'url = "http://127.0.0.1:9/"\n'
        f'[accounts.box]\nhost = "127.0.0.1"\nport = {free_port()}\ntls = "none"\n'
        'username = "u"\npassword = "p"\nfolders = ["INBOX", "Sent"]\n'
    )
    stderr = tmp_path / "stderr"
    env = {**clean_env, "MAILBOX_RELAY_PASSWORD": "pw", "MAILBOX_RELAY_CONFIG": str(config)}
    env["MAILBOX_RELAY_FETCH_STATE"] = str(tmp_path / "fetch.sqlite3")
    with open(stderr, "wb") as handle:
        if journal:
            status = os.fstat(handle.fileno())
            env["JOURNAL_STREAM"] = f"{status.st_dev}:{status.st_ino}"
        subprocess.run(
            [sys.executable, "-m", "mailbox_relay", "fetch", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=handle,
            timeout=60,
            check=False,
        )
    return stderr.read_text().splitlines()


def test_fetch_log_format_json(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    lines = fetch_lines(tmp_path, clean_env, "--log-format", "json")
    assert lines
    records = [json.loads(line) for line in lines]  # every line parses
    assert all(list(record) == KEYS for record in records)
    assert any(record["account"] == "box" and "box" in record["message"] for record in records), lines


def test_fetch_plain_lines_are_stamped_except_for_the_journal(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    stamped = fetch_lines(tmp_path, clean_env)
    assert stamped and all(line[:4].isdigit() and " mailbox-relay: " in line for line in stamped), stamped
    journal = fetch_lines(tmp_path, clean_env, journal=True)
    assert journal and all(line.startswith("mailbox-relay: ") for line in journal), journal
