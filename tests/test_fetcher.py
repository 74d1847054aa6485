"""The rules of one pass over a folder, with the real state file and an in-memory folder (the
IMAP side is tested against the real Dovecot in tests/e2e/test_fetch.py).

The property that matters most: the state's watermark never passes a message that was not
delivered, recorded or acknowledged, whatever stops the pass, so nothing is skipped later."""

from __future__ import annotations

import contextlib
import datetime
import socket
import threading
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import pytest

from mailbox_relay.accounts import After, parse_account
from mailbox_relay.fetch.rules import FolderSync
from mailbox_relay.message import Prepared
from mailbox_relay.outcome import DELIVERED, Outcome, Reason
from mailbox_relay.sources.mailbox import Listing, Opened
from mailbox_relay.state.folders import FetchState

from .helpers import invoke


def raw(n: int, size: int = 0) -> bytes:
    return f"From: a@example.com\r\nSubject: {n}\r\n\r\n".encode() + b"x" * size


class MemoryFolder:
    """A folder as an IMAP-like source shows it: numbered keys, a cursor that is the last one."""

    key_label = "UID"

    def __init__(self, messages: Dict[int, bytes], uidvalidity: int = 7) -> None:
        self.messages = messages
        self.uidvalidity = uidvalidity
        self.acknowledged: List[int] = []

    def open(self, name: str) -> Opened:
        return Opened(str(self.uidvalidity), len(self.messages), str(max(self.messages, default=0)))

    def listing(
        self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
    ) -> Listing:
        keys = [str(uid) for uid in sorted(self.messages) if uid > int(cursor or 0)]
        return Listing(keys, checkpoints={key: key for key in keys})

    def sizes(self, keys: Sequence[str]) -> Dict[str, int]:
        return {key: len(self.messages[int(key)]) for key in keys if int(key) in self.messages}

    def fetch(self, keys: Sequence[str], sizes: Mapping[str, int]) -> Dict[str, bytes]:
        return {key: self.messages[int(key)] for key in keys if int(key) in self.messages}

    def acknowledge(self, keys: Sequence[str], after: After) -> None:
        self.acknowledged += [int(key) for key in keys]


class Ingress:
    """Answers per message: a list of outcomes by subject number; delivered otherwise."""

    def __init__(self, answers: Optional[Dict[int, List[Outcome]]] = None) -> None:
        self.answers = answers or {}
        self.posted: List[int] = []

    def __call__(self, prepared: Prepared, log: object = None) -> Outcome:
        number = int(prepared.to_bytes().split(b"Subject: ")[1].split(b"\r\n")[0])
        self.posted.append(number)
        queue = self.answers.get(number, [])
        return queue.pop(0) if queue else DELIVERED


@pytest.fixture
def state(tmp_path: Path) -> FetchState:
    return FetchState(str(tmp_path / "state.sqlite3"))


def sync(state: FetchState, ingress: Ingress, **options: object) -> FolderSync:
    account = parse_account("box", {"host": "h", "username": "u", "password": "p", "start": "all"}, "c")
    return FolderSync(account, state, ingress, **options)  # type: ignore[arg-type]


SERVER_ERROR = Outcome(Reason.SERVER_ERROR, "HTTP 500")
REFUSED = Outcome(Reason.UNREACHABLE, "connection refused")


def test_a_pause_mid_batch_keeps_the_watermark_below_what_was_not_handled(state: FetchState) -> None:
    folder = MemoryFolder({1: raw(1), 2: raw(2), 3: raw(3), 4: raw(4, 5000)})
    ingress = Ingress({2: [REFUSED]})
    result = sync(state, ingress, max_size=1000).run(folder, "INBOX")
    assert result.paused and result.delivered == 1 and ingress.posted == [1, 2]
    known = state.folder("box", "INBOX")
    assert known is not None and known.cursor == "1"  # not 4: 2, 3 and 4 were never handled
    again = sync(state, Ingress(), max_size=1000).run(folder, "INBOX")
    assert (again.delivered, again.invalid, again.paused) == (2, 1, None)
    assert folder.acknowledged == [1, 2, 3]


def test_a_message_failing_alone_is_quarantined_once_others_got_through(state: FetchState) -> None:
    folder = MemoryFolder({1: raw(1), 2: raw(2)})
    ingress = Ingress({1: [SERVER_ERROR] * 3})
    run = sync(state, ingress, max_tries=3)
    first = run.run(folder, "INBOX")
    assert (first.failed, first.delivered) == (1, 1)
    for _ in range(2):
        state._run("UPDATE messages SET next_try = 0")
        last = run.run(folder, "INBOX")
    assert last.quarantined == 1 and ingress.posted == [1, 2, 1, 1]
    state._run("UPDATE messages SET next_try = 0")
    assert run.run(folder, "INBOX").found == 0  # quarantined: not tried again


def test_the_same_failure_for_everyone_quarantines_nobody(state: FetchState) -> None:
    folder = MemoryFolder({n: raw(n) for n in range(1, 6)})
    ingress = Ingress({n: [SERVER_ERROR] * 10 for n in range(1, 6)})
    run = sync(state, ingress, max_tries=2)
    first = run.run(folder, "INBOX")
    assert first.paused and ingress.posted == [1, 2, 3]  # three new failures in a row: stop
    for _ in range(4):
        state._run("UPDATE messages SET next_try = 0")
        assert run.run(folder, "INBOX").quarantined == 0
    assert state.waiting("box", "INBOX") == 5


def test_failed_messages_never_hold_up_new_mail(state: FetchState) -> None:
    folder = MemoryFolder({n: raw(n) for n in range(1, 4)})
    ingress = Ingress({n: [SERVER_ERROR] * 10 for n in range(1, 4)})  # three poison messages
    run = sync(state, ingress, max_tries=3)
    assert run.run(folder, "INBOX").paused
    folder.messages.update({4: raw(4), 5: raw(5)})
    state._run("UPDATE messages SET next_try = 0")
    second = run.run(folder, "INBOX")
    assert ingress.posted[3:] == [4, 5, 1, 2, 3] and second.delivered == 2 and not second.paused
    state._run("UPDATE messages SET next_try = 0")
    assert run.run(folder, "INBOX").quarantined == 3  # the third try of each, others got through


def test_a_new_uidvalidity_delivers_the_folder_again(state: FetchState) -> None:
    folder = MemoryFolder({1: raw(1), 2: raw(2)})
    ingress = Ingress()
    sync(state, ingress).run(folder, "INBOX")
    folder.uidvalidity = 8
    result = sync(state, ingress).run(folder, "INBOX")
    assert result.delivered == 2 and ingress.posted == [1, 2, 1, 2]


def test_a_server_that_hangs_up_at_login_is_one_line_and_exit_75(tmp_path: Path) -> None:
    """A greeting, then the connection closed at LOGIN: a problem of that account, not a crash,
    and not a rejected password (which watch would give up on after three)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(3):  # fetch; then check's TCP probe and its connection
            connection, _ = listener.accept()
            with connection, contextlib.suppress(OSError):  # the probe hangs up at once
                connection.sendall(b"* OK ready\r\n")
                tag = connection.recv(65536).split(b" ")[0]  # CAPABILITY
                connection.sendall(b"* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\n" + tag + b" OK done\r\n")
                connection.recv(65536)  # the LOGIN command, unanswered

    threading.Thread(target=serve, daemon=True).start()
    config = tmp_path / "config.toml"
    config.write_text(
        f'url = "http://127.0.0.1:9"\npassword = "pw"\nfetch_state = "{tmp_path}/state"\n'
        f'[accounts.box]\nhost = "127.0.0.1"\nport = {port}\ntls = "none"\nusername = "u"\npassword = "p"\n'
    )
    code, out, err = invoke(["fetch", "--config", str(config)])
    assert code == 75, (out, err)
    assert "box: connection to 127.0.0.1 lost at login" in err and "rejected" not in err, err
    code, out, _ = invoke(["check", "--account", "box", "--config", str(config)])
    assert code == 69 and "✗ imap network: connection to 127.0.0.1 lost at login" in out, out
    listener.close()


class MemoryMaildrop(MemoryFolder):
    """A folder as a POP3-like source shows it: no cursor, every key listed, delivered keys
    remembered, and DELE that takes effect only at `quit()` (a lost connection loses them)."""

    key_label = "UIDL"

    def __init__(self, messages: Dict[int, bytes], linger: Optional[float]) -> None:
        super().__init__(messages)
        self.linger = linger
        self.marked: List[int] = []

    def open(self, name: str) -> Opened:
        return Opened("", len(self.messages), None)

    def listing(
        self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
    ) -> Listing:
        keys = [str(uid) for uid in sorted(self.messages)]
        return Listing(keys, remember=True, present=frozenset(keys), linger=self.linger)

    def acknowledge(self, keys: Sequence[str], after: After) -> None:
        super().acknowledge(keys, after)
        if after.action == "delete":
            self.marked += [int(key) for key in keys]

    def quit(self) -> None:
        for uid in self.marked:
            self.messages.pop(uid, None)
        self.marked = []


def pop3_sync(state: FetchState, ingress: Ingress, **account: str) -> FolderSync:
    table = {"host": "h", "username": "u", "password": "p", "source": "pop3", "start": "all", **account}
    return FolderSync(parse_account("box", table, "c"), state, ingress)  # type: ignore[arg-type]


def test_a_delivered_message_still_on_the_server_is_deleted_without_posting_it_again(
    state: FetchState,
) -> None:
    drop = MemoryMaildrop({1: raw(1), 2: raw(2)}, linger=0.0)
    ingress = Ingress()
    first = pop3_sync(state, ingress, after="delete").run(drop, "INBOX")
    assert first.delivered == 2 and drop.marked == [1, 2]
    drop.marked = []  # the connection dropped before QUIT: nothing was deleted
    drop.messages[3] = raw(3)
    second = pop3_sync(state, ingress, after="delete").run(drop, "INBOX")
    assert ingress.posted == [1, 2, 3]  # 1 and 2 are not posted again
    assert second.removed == 2 and drop.marked == [1, 2, 3]
    drop.quit()
    third = pop3_sync(state, ingress, after="delete").run(drop, "INBOX")
    assert (third.found, third.removed, drop.messages) == (0, 0, {})
    assert state.recorded("box", "INBOX", "") == set()  # pruned to what the server has


def test_linger_deletes_only_what_was_delivered_long_enough_ago(state: FetchState) -> None:
    drop = MemoryMaildrop({1: raw(1)}, linger=3600.0)
    ingress = Ingress()
    sync(state, ingress).run(drop, "INBOX")
    assert sync(state, ingress).run(drop, "INBOX").removed == 0 and drop.marked == []
    state._run("UPDATE messages SET first_failed = first_failed - 7200")
    assert sync(state, ingress).run(drop, "INBOX").removed == 1 and drop.marked == [1]
    assert ingress.posted == [1]


def test_start_new_without_a_cursor_records_what_was_there_as_left_alone(state: FetchState) -> None:
    drop = MemoryMaildrop({1: raw(1), 2: raw(2)}, linger=None)
    ingress = Ingress()
    first = pop3_sync(state, ingress, start="new").run(drop, "INBOX")
    assert (first.left_alone, first.found, ingress.posted) == (2, 0, [])
    drop.messages[3] = raw(3)
    pop3_sync(state, ingress, start="new").run(drop, "INBOX")
    assert ingress.posted == [3]
