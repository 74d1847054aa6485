"""The fetch state under stress and the pass rules it guards: UIDVALIDITY epochs and dates, two
passes over one folder, and a state file that is damaged, locked or cannot be created, for
each command (fetch, watch, status). Real SQLite files, real locks, real processes."""

from __future__ import annotations

import datetime
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import pytest

from mailbox_relay.accounts import After, parse_account
from mailbox_relay.fetch.rules import FolderSync
from mailbox_relay.message import Prepared
from mailbox_relay.outcome import DELIVERED, Outcome, Reason
from mailbox_relay.sources.mailbox import Listing, Opened
from mailbox_relay.state import store
from mailbox_relay.state.folders import FetchState, FolderBusy, FolderLock

from .helpers import invoke

TODAY = datetime.date.today()


def raw(n: int) -> bytes:
    return f"From: a@example.com\r\nSubject: {n}\r\n\r\nbody {n}\r\n".encode()


class DatedFolder:
    """An IMAP folder as the pass sees it, with INTERNALDATEs that SEARCH SINCE honours."""

    def __init__(self, uidvalidity: int = 7) -> None:
        self.uidvalidity = uidvalidity
        self.messages: Dict[int, bytes] = {}
        self.dates: Dict[int, datetime.date] = {}
        self.next_uid = 1
        self.acknowledged: List[int] = []

    def append(self, n: int, date: datetime.date = TODAY) -> None:
        self.messages[self.next_uid] = raw(n)
        self.dates[self.next_uid] = date
        self.next_uid += 1

    def recreate(self) -> None:
        """Deleted and created again: a new UIDVALIDITY, UIDs from 1."""
        self.uidvalidity += 1
        self.messages, self.dates, self.next_uid = {}, {}, 1

    def open(self, name: str) -> Opened:
        return Opened(str(self.uidvalidity), len(self.messages), str(self.next_uid - 1))

    def listing(
        self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
    ) -> Listing:
        """As ImapSource's: the date sorts only the UIDs up to `through`."""
        after, last = int(cursor or 0), int(through) if through is not None else None
        keys = [
            str(uid)
            for uid in sorted(self.messages)
            if uid > after
            and (since is None or self.dates[uid] >= since or (last is not None and uid > last))
        ]
        final = str(max([last, *map(int, keys)])) if since is not None and last is not None else None
        return Listing(keys, checkpoints={key: key for key in keys}, final=final)

    def sizes(self, keys: Sequence[str]) -> Dict[str, int]:
        return {key: len(self.messages[int(key)]) for key in keys if int(key) in self.messages}

    def fetch(self, keys: Sequence[str], sizes: Mapping[str, int]) -> Dict[str, bytes]:
        return {key: self.messages[int(key)] for key in keys if int(key) in self.messages}

    def acknowledge(self, keys: Sequence[str], after: After) -> None:
        self.acknowledged += [int(key) for key in keys]


class Ingress:
    def __init__(self) -> None:
        self.posted: List[int] = []
        self.before_post = lambda number: None

    def __call__(self, prepared: Prepared, log: object = None) -> Outcome:
        number = int(prepared.to_bytes().split(b"Subject: ")[1].split(b"\r\n")[0])
        self.before_post(number)
        self.posted.append(number)
        return DELIVERED


def sync(state: FetchState, ingress: Ingress, start: str = "new", **options: object) -> FolderSync:
    account = parse_account("box", {"host": "h", "username": "u", "password": "p", "start": start}, "c")
    return FolderSync(account, state, ingress, **options)  # type: ignore[arg-type]


@pytest.fixture
def state(tmp_path: Path) -> FetchState:
    return FetchState(str(tmp_path / "state.sqlite3"))


# --- a new UIDVALIDITY: every message of the new epoch, whatever its date ---------------------


@pytest.mark.parametrize("start", ["new", "all", (TODAY - datetime.timedelta(days=1)).isoformat()])
@pytest.mark.parametrize("now_first", [False, True])
def test_after_a_uidvalidity_change_no_date_hides_a_message(
    state: FetchState, start: str, now_first: bool
) -> None:
    """The attack: m1 delivered; the folder re-created; m3 (three days old), m4 (2020) and m2
    (now) appended in either order. One run delivers all three; none is left for later."""
    folder, ingress = DatedFolder(), Ingress()
    sync(state, ingress, start).run(folder, "INBOX")  # first sight
    folder.append(1)
    assert sync(state, ingress, start).run(folder, "INBOX").delivered == 1
    folder.recreate()
    dated = [(3, TODAY - datetime.timedelta(days=3)), (4, datetime.date(2020, 1, 1))]
    for n, date in [(2, TODAY), *dated] if now_first else [*dated, (2, TODAY)]:
        folder.append(n, date)
    result = sync(state, ingress, start).run(folder, "INBOX")
    assert sorted(ingress.posted[1:]) == [2, 3, 4] and result.delivered == 3
    assert sync(state, ingress, start).run(folder, "INBOX").found == 0  # and nothing twice


def test_with_a_start_date_mail_arriving_later_is_new_whatever_its_date(state: FetchState) -> None:
    """The date sorts what was there at first sight. A first pass paused by the ingress keeps
    the date in force; a back-dated message arriving then must still be delivered."""
    folder, ingress = DatedFolder(), Ingress()
    start = (TODAY - datetime.timedelta(days=30)).isoformat()
    folder.append(1, datetime.date(2020, 1, 1))  # older than start: left alone
    folder.append(2, TODAY)
    refused = Outcome(Reason.UNREACHABLE, "connection refused")
    paused = sync(state, lambda prepared, log=None: refused, start).run(folder, "INBOX")  # type: ignore[arg-type]
    assert paused.paused and paused.delivered == 0
    folder.append(3, datetime.date(2020, 1, 1))  # back-dated, arriving after the first sight
    folder.append(4, TODAY)
    result = sync(state, ingress, start).run(folder, "INBOX")
    assert sorted(ingress.posted) == [2, 3, 4] and result.delivered == 3


def test_with_a_start_date_a_first_pass_that_finds_nothing_still_leaves_the_old_alone(
    state: FetchState,
) -> None:
    folder, ingress = DatedFolder(), Ingress()
    folder.append(1, datetime.date(2020, 1, 1))
    folder.append(2, datetime.date(2020, 2, 1))
    start = TODAY.isoformat()
    first = sync(state, ingress, start).run(folder, "INBOX")
    assert (first.found, first.left_alone) == (0, 2)
    folder.append(3, TODAY)
    assert sync(state, ingress, start).run(folder, "INBOX").delivered == 1 and ingress.posted == [3]


def test_a_first_pass_says_what_start_new_left_alone(state: FetchState) -> None:
    folder, ingress = DatedFolder(), Ingress()
    for n in range(5):
        folder.append(n)
    said: List[str] = []
    result = sync(state, ingress, "new", events=said.append).run(folder, "INBOX")
    assert (result.found, result.left_alone) == (0, 5)
    assert said == [
        'box/INBOX: 5 existing messages left alone (start = "new"); '
        'set start = "all" or a date to deliver them'
    ]
    assert sync(state, ingress, "new").run(folder, "INBOX").left_alone == 0  # only on first sight


def test_a_first_pass_with_a_date_counts_the_older_messages_left_alone(state: FetchState) -> None:
    folder, ingress = DatedFolder(), Ingress()
    folder.append(1, datetime.date(2020, 1, 1))
    folder.append(2, TODAY)
    result = sync(state, ingress, TODAY.isoformat()).run(folder, "INBOX")
    assert (result.delivered, result.left_alone) == (1, 1)


# --- one pass over a folder at a time ----------------------------------------------------------


def test_a_second_pass_over_a_folder_waits_its_bound_then_is_told_busy(state: FetchState) -> None:
    folder, ingress = DatedFolder(), Ingress()
    folder.append(1)
    with state.lock("box", "INBOX") as held:
        held.acquire(0)
        started = time.monotonic()
        with pytest.raises(FolderBusy, match=f"pid {os.getpid()}"):
            sync(state, ingress, "all", lock_wait=0.5).run(folder, "INBOX")
        assert 0.5 <= time.monotonic() - started < 3
    assert ingress.posted == []
    assert sync(state, ingress, "all").run(folder, "INBOX").delivered == 1  # free again
    other = sync(state, ingress, "all", lock_wait=0)
    other.account = parse_account("other", {"host": "h", "username": "u", "password": "p"}, "c")
    with state.lock("box", "INBOX") as held:
        held.acquire(0)
        other.run(folder, "INBOX")  # another account's folder of the same name is not blocked


def test_a_lock_held_by_another_process_is_released_when_it_dies(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from mailbox_relay.state.folders import FolderLock; "
            f"FolderLock({path!r}, 'box', 'INBOX').acquire(0); print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
            FolderLock(path, "box", "INBOX").acquire(0.2)
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(path, "box", "INBOX") as lock:
        lock.acquire(0)  # kill -9 let go of it
    assert oct(os.stat(path + ".locks").st_mode & 0o777) == "0o700"


# --- a state file that fails -----------------------------------------------------------------


def test_a_state_locked_mid_pass_stops_the_pass_with_its_line_and_keeps_the_counts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store, "BUSY_SECONDS", 0.3)
    path = str(tmp_path / "state.sqlite3")
    state = FetchState(path)
    folder, ingress = DatedFolder(), Ingress()
    for n in (1, 2, 3):
        folder.append(n)
    other = sqlite3.connect(path, isolation_level=None)

    def lock_after_first(number: int) -> None:
        if number == 2:
            other.execute("BEGIN IMMEDIATE")  # another process takes the write lock, and keeps it

    ingress.before_post = lock_after_first
    said: List[str] = []
    result = sync(state, ingress, "all", log=said.append).run(folder, "INBOX")
    assert result.state_failed and result.delivered == 3 and folder.acknowledged == [1, 2, 3]
    assert result.paused is not None and "was locked by another process" in result.paused
    assert "posted again on the next run" in result.paused and "internal error" not in said[0]
    other.execute("ROLLBACK")
    ingress.before_post = lambda number: None
    again = sync(state, ingress, "all").run(folder, "INBOX")  # the same bytes, which Rails stores once
    assert again.delivered == 3 and not again.state_failed


def write_config(tmp_path: Path, state: str) -> Path:
    config = tmp_path / "config.toml"
    config.write_text(
        f'url = "http://127.0.0.1:9"\npassword = "pw"\nfetch_state = "{state}"\n'
        '[accounts.box]\nhost = "127.0.0.1"\nport = 9\ntls = "none"\nusername = "u"\npassword = "p"\n'
    )
    return config


BROKEN = {
    "damaged": ("is damaged (file is not a database)", "move it aside"),
    "a directory": ("cannot be opened or written (", "check its permissions"),
    "under a file": ("cannot be created", "set fetch_state to a writable path"),
}
COMMANDS = [("fetch", 78), ("watch", 78), ("status", 78)]  # a config error: 78 from each


@pytest.mark.parametrize(
    "broken, command, code",
    [
        (broken, command, code)
        for broken in sorted(BROKEN)
        for command, code in COMMANDS
        if (broken, command) != ("under a file", "status")  # status creates nothing: "nothing fetched yet"
    ],
)
def test_a_broken_state_is_one_line_naming_the_file_for_every_command(
    tmp_path: Path, broken: str, command: str, code: int
) -> None:
    problem, advice = BROKEN[broken]
    state = tmp_path / "state.sqlite3"
    if broken == "damaged":
        state.write_bytes(b"this is not SQLite, it is a text file that someone wrote here\n" * 100)
    elif broken == "a directory":
        state.mkdir()
    else:
        (tmp_path / "file").write_text("x")
        state = tmp_path / "file" / "state.sqlite3"
    config = write_config(tmp_path, str(state))
    exit_code, out, err = invoke([command, "--config", str(config)])
    assert exit_code == code, (out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(state) in lines[0] and problem in lines[0] and advice in lines[0], lines
    assert "internal error" not in err and "Usage:" not in err and "not delivered" not in err


# --- status: errors recorded, and "watched now" only while fresh --------------------------------


def test_status_shows_an_imap_problem_recorded_by_fetch_and_fetch_does_not_guess(tmp_path: Path) -> None:
    config = write_config(tmp_path, str(tmp_path / "state.sqlite3"))
    code, out, err = invoke(["fetch", "--config", str(config)])
    assert code == 75 and "cannot connect to 127.0.0.1:9" in err, err
    assert "could not be read" in out and "still on the server" not in out, out  # it cannot know
    code, out, _ = invoke(["status", "--json", "--config", str(config)])
    (row,) = json.loads(out)["folders"]
    assert row["folder"] == "INBOX" and "cannot connect to 127.0.0.1:9" in row["last_error"]
    assert row["last_error_at"] > time.time() - 60 and row["synced"] is False
    code, out, _ = invoke(["status", "--config", str(config)])
    assert "box/INBOX: never synced; not watched now" in out and "cannot connect" in out, out


def test_status_calls_a_folder_watched_only_while_its_heartbeat_is_fresh(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite3")
    config = write_config(tmp_path, path)
    state = FetchState(path)
    state.begin("box", "INBOX", 7, 0, None)

    def watching() -> bool:
        out = invoke(["status", "--json", "--config", str(config)])[1]
        return bool(json.loads(out)["folders"][0]["watching"])

    state.watching("box", "INBOX", os.getpid(), 60)
    assert watching()
    state.watching("box", "INBOX", os.getpid(), -1)  # a live pid, but no round-trip lately
    assert not watching()
    assert "no fresh round-trip with the server" in invoke(["status", "--config", str(config)])[1]
    state.watching("box", "INBOX", None)
    assert not watching()


IMAP_LAYOUT = """
CREATE TABLE folders (account TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL, since TEXT, first_seen REAL NOT NULL, last_sync REAL,
    last_delivered REAL, delivered INTEGER NOT NULL DEFAULT 0, invalid INTEGER NOT NULL DEFAULT 0,
    last_error TEXT, last_error_at REAL, watcher_pid INTEGER, watcher_since REAL,
    PRIMARY KEY (account, folder));
CREATE TABLE messages (account TEXT NOT NULL, folder TEXT NOT NULL, uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL, status TEXT NOT NULL, tries INTEGER NOT NULL, first_failed REAL NOT NULL,
    next_try REAL, reason TEXT NOT NULL, PRIMARY KEY (account, folder, uidvalidity, uid));
"""


def test_a_state_file_of_the_imap_only_layout_is_upgraded_and_goes_on(tmp_path: Path) -> None:
    """0.1's state (uidvalidity and last_uid as numbers): a retry, a quarantine and the
    watermark survive, and the next pass starts after the old watermark."""
    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as db:
        db.executescript(IMAP_LAYOUT)
        db.execute(
            "INSERT INTO folders (account, folder, uidvalidity, last_uid, first_seen) "
            "VALUES ('box', 'INBOX', 7, 3, 0)"
        )
        db.execute("INSERT INTO messages VALUES ('box', 'INBOX', 7, 2, 'retry', 1, 0, 0, 'HTTP 500')")
        db.execute(
            "INSERT INTO messages VALUES ('box', 'INBOX', 7, 1, 'quarantined', 5, 0, NULL, 'HTTP 500')"
        )
    state = FetchState(path)
    known = state.folder("box", "INBOX")
    assert known is not None and (known.epoch, known.cursor) == ("7", "3")
    assert state.due("box", "INBOX", "7") == ["2"]
    (row,) = state.report()
    assert (row["uidvalidity"], row["last_uid"], row["quarantined_uids"][0]["uid"]) == (7, 3, 1)
    folder, ingress = DatedFolder(uidvalidity=7), Ingress()
    for n in (1, 2, 3, 4):
        folder.append(n)
    result = sync(state, ingress, "all").run(folder, "INBOX")
    assert sorted(ingress.posted) == [2, 4] and result.delivered == 2  # the retry, and UID 4


def test_a_state_file_from_before_the_heartbeat_is_upgraded(tmp_path: Path) -> None:
    path = str(tmp_path / "old.sqlite3")
    with sqlite3.connect(path) as db:
        db.executescript(IMAP_LAYOUT)
        db.execute(
            "INSERT INTO folders (account, folder, uidvalidity, last_uid, first_seen) "
            "VALUES ('a', 'f', 3, 9, 0)"
        )
    state = FetchState(path)
    known = state.folder("a", "f")
    assert known is not None and known.cursor == "9"
    state.watching("a", "f", os.getpid(), 10)
    assert state.report()[0]["watcher_until"] > time.time()


def test_status_reads_a_0_1_state_file_without_changing_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(IMAP_LAYOUT)
        db.execute(
            "INSERT INTO folders (account, folder, uidvalidity, last_uid, first_seen, last_sync) "
            "VALUES ('box', 'INBOX', 7, 3, 0, 1)"
        )
    before = path.read_bytes()
    config = write_config(tmp_path, str(path))
    code, out, _ = invoke(["status", "--json", "--config", str(config)])
    assert code == 0, out
    (row,) = json.loads(out)["folders"]
    assert (row["uidvalidity"], row["last_uid"], row["synced"]) == (7, 3, True)
    assert path.read_bytes() == before  # not upgraded, not touched: status changes nothing
