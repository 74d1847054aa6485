"""The state of `fetch` and `watch` (SQLite): per account and folder, where delivery has got,
for any source (sources/mailbox.py).

A folder's row holds its epoch (IMAP's UIDVALIDITY) and a cursor the source gave (IMAP: the
last handled UID): everything up to the cursor was delivered, found invalid, or is listed in
`messages` for another try, so catching up after any downtime starts there, never "since
yesterday". Sources whose cursor cannot say that (POP3's UIDLs, Graph's ids) have each
delivered key recorded in `messages` too. Rows are committed per fetched batch, in WAL mode:
after `kill -9` at most the batch in flight is posted again, with the same bytes, which Rails
stores once.

Two processes may share the file, but never pass over one folder at the same time: each pass
holds that folder's lock (`FolderLock`, an flock on a file beside the state), so two `fetch`
runs, or a `fetch` beside a `watch`, cannot post the same messages twice or expunge under each
other. Every SQLite failure is a `StateProblem` that names the file and what to do (store.py).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Sequence, Set, Tuple

from mailbox_relay.backoff import doubling
from mailbox_relay.settings import state_home
from mailbox_relay.state import store
from mailbox_relay.state.store import StateProblem, problem

__all__ = ["FetchState", "FolderBusy", "FolderLock", "FolderState", "StateProblem", "default_path"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS folders (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    epoch TEXT,                 -- the source's epoch (IMAP: UIDVALIDITY), NULL while only an error
    cursor TEXT,                -- the source's cursor (IMAP: the last handled UID)
    since TEXT,                 -- a date that still applies (start = DATE, until a pass completes)
    since_through TEXT,         -- ... to keys up to this cursor only: later ones are new whatever their date
    first_seen REAL NOT NULL,
    last_sync REAL,
    last_delivered REAL,
    delivered INTEGER NOT NULL DEFAULT 0,
    invalid INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_at REAL,
    watcher_pid INTEGER,
    watcher_since REAL,
    watcher_until REAL,         -- the watch's last server round-trip is fresh until then
    PRIMARY KEY (account, folder)
);
CREATE TABLE IF NOT EXISTS messages (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    epoch TEXT NOT NULL,
    key TEXT NOT NULL,
    status TEXT NOT NULL,       -- retry | quarantined | invalid | delivered | left (start = new)
    tries INTEGER NOT NULL,
    first_failed REAL NOT NULL,
    next_try REAL,
    reason TEXT NOT NULL,
    PRIMARY KEY (account, folder, epoch, key)
);
"""

# The first layout (IMAP only) kept uidvalidity and last_uid as integers: copied over once.
_FROM_IMAP_LAYOUT = """
INSERT INTO folders SELECT account, folder,
    CASE uidvalidity WHEN 0 THEN NULL ELSE CAST(uidvalidity AS TEXT) END, CAST(last_uid AS TEXT),
    since, NULL, first_seen, last_sync, last_delivered, delivered, invalid, last_error, last_error_at,
    watcher_pid, watcher_since, {watcher_until} FROM folders_imap;
INSERT INTO messages SELECT account, folder, CAST(uidvalidity AS TEXT), CAST(uid AS TEXT), status,
    tries, first_failed, next_try, reason FROM messages_imap;
DROP TABLE folders_imap;
DROP TABLE messages_imap;
"""

RETRY_FIRST = 60.0  # seconds before a failed message is tried again; doubles each try,
RETRY_CAP = 3600.0  # up to an hour


def default_path(environ: Mapping[str, str]) -> str:
    return os.path.join(state_home(environ), "fetch.sqlite3")


def synced_folders(path: str) -> FrozenSet[Tuple[str, str]]:
    """(account, folder) of every folder synced so far, read only: nothing is created (none
    when there is no file yet). A file that cannot be read is a StateProblem."""
    if not os.path.exists(path):
        return frozenset()
    db = store.open_db(path, readonly=True)
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(folders)")}
        synced = "epoch IS NOT NULL" if "epoch" in columns else "uidvalidity <> 0"
        rows = db.execute(f"SELECT account, folder FROM folders WHERE {synced}")
        return frozenset((str(account), str(folder)) for account, folder in rows)
    except sqlite3.Error as error:
        raise problem(path, error) from None
    finally:
        db.close()


@dataclass(frozen=True)
class FolderState:
    epoch: str
    cursor: Optional[str]
    since: Optional[str]  # start = DATE: only mail from that day on...
    since_through: Optional[str]  # ... among the keys up to this cursor (what was there at first sight)
    first_seen: float


def retry_delay(tries: int) -> float:
    return doubling(tries, RETRY_FIRST, RETRY_CAP)


class FetchState:
    def __init__(self, path: str, *, readonly: bool = False) -> None:
        """The state at `path`, made or upgraded as needed; `readonly` (status) changes nothing
        and reads either layout, for report() only."""
        self.path = path
        self._db = store.open_db(path, readonly=readonly)
        if readonly:
            return
        try:
            self._upgrade()
            self._db.executescript(_SCHEMA)
        except (sqlite3.Error, StateProblem) as error:
            self._db.close()
            if isinstance(error, StateProblem):
                raise
            raise problem(path, error) from None

    def _upgrade(self) -> None:
        """A state file of the IMAP-only layout becomes this one, in one transaction."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(folders)")}
        if "uidvalidity" not in columns:
            return
        with store.transaction(self._db, self.path):
            self._db.execute("ALTER TABLE folders RENAME TO folders_imap")
            self._db.execute("ALTER TABLE messages RENAME TO messages_imap")
            for statement in _SCHEMA.split(";"):  # (no semicolon in its comments)
                if statement.strip():
                    self._db.execute(statement)
            watcher_until = "watcher_until" if "watcher_until" in columns else "NULL"
            for statement in _FROM_IMAP_LAYOUT.format(watcher_until=watcher_until).split(";"):
                if statement.strip():
                    self._db.execute(statement)

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def _run(self, sql: str, *args: Any) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as error:
            raise problem(self.path, error) from None

    def _transaction(self) -> Any:
        return store.transaction(self._db, self.path)

    def lock(self, account: str, folder: str) -> FolderLock:
        """The lock one pass over this folder holds (see FolderLock)."""
        return FolderLock(self.path, account, folder)

    # --- folders ---------------------------------------------------------------------------

    def folder(self, account: str, folder: str) -> Optional[FolderState]:
        """The folder's state, or None if it was never synced (a row may hold only an error)."""
        row = self._run(
            "SELECT epoch, cursor, since, since_through, first_seen FROM folders "
            "WHERE account=? AND folder=?",
            account,
            folder,
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return FolderState(*row)

    def begin(
        self,
        account: str,
        folder: str,
        epoch: str,
        cursor: Optional[str],
        since: Optional[str],
        since_through: Optional[str] = None,
    ) -> None:
        """A folder seen for the first time, or in a new epoch (its old keys mean nothing)."""
        with self._transaction():
            self._run(
                "INSERT INTO folders (account, folder, epoch, cursor, since, since_through, first_seen) "
                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (account, folder) DO UPDATE SET "
                "epoch=excluded.epoch, cursor=excluded.cursor, since=excluded.since, "
                "since_through=excluded.since_through",
                account,
                folder,
                epoch,
                cursor,
                since,
                since_through,
                time.time(),
            )
            self._run(
                "DELETE FROM messages WHERE account=? AND folder=? AND epoch<>?", account, folder, epoch
            )

    def advance(self, account: str, folder: str, cursor: str) -> None:
        """The source's cursor for a listing handled in full (Graph's next delta link)."""
        self._run("UPDATE folders SET cursor=? WHERE account=? AND folder=?", cursor, account, folder)

    def synced(self, account: str, folder: str, *, complete: bool) -> None:
        """A pass ended; a complete one ends a `since` restriction and clears the last error."""
        extra = ", since=NULL, since_through=NULL, last_error=NULL" if complete else ""
        self._run(
            f"UPDATE folders SET last_sync=?{extra} WHERE account=? AND folder=?",
            time.time(),
            account,
            folder,
        )

    def error(self, account: str, folder: str, line: str) -> None:
        """The last problem of a folder, with its time: source, token, password command, state or
        ingress. A folder never synced gets a row that holds only this (epoch NULL)."""
        now = time.time()
        self._run(
            "INSERT INTO folders (account, folder, first_seen, last_error, last_error_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (account, folder) DO UPDATE SET "
            "last_error=excluded.last_error, last_error_at=excluded.last_error_at",
            account,
            folder,
            now,
            line,
            now,
        )

    def watching(self, account: str, folder: str, pid: Optional[int], fresh_for: float = 0.0) -> None:
        """A watch's heartbeat: its pid, and how long its last server round-trip counts as fresh
        (status calls the folder watched only until then). None: the watch let go of it."""
        now = time.time()
        if pid is None:
            self._run(
                "UPDATE folders SET watcher_pid=NULL, watcher_since=NULL, watcher_until=NULL "
                "WHERE account=? AND folder=? AND watcher_pid=?",
                account,
                folder,
                os.getpid(),
            )
            return
        self._run(
            "UPDATE folders SET watcher_pid=?, watcher_since=COALESCE(CASE WHEN watcher_pid=? "
            "THEN watcher_since END, ?), watcher_until=? WHERE account=? AND folder=?",
            pid,
            pid,
            now,
            now + fresh_for,
            account,
            folder,
        )

    def heartbeats(self, pid: Optional[int], folders: Sequence[Tuple[str, str, float]]) -> None:
        """`watching` for many (account, folder, fresh_for) in one transaction: a watch of
        thousands of folders writes their heartbeats in batches, not one commit each."""
        with self._transaction():
            for account, folder, fresh_for in folders:
                self.watching(account, folder, pid, fresh_for)

    # --- messages --------------------------------------------------------------------------
    # `cursor`: the source's cursor once this message (and every one before it) is handled;
    # None leaves it (a retried message, or a source that moves it only at the end).

    def delivered(
        self,
        account: str,
        folder: str,
        epoch: str,
        keys: Sequence[str],
        cursor: Optional[str] = None,
        remember: bool = False,
    ) -> None:
        """Messages the ingress accepted (and `after` was applied to), in one transaction."""
        with self._transaction():
            self._run(
                "UPDATE folders SET cursor=COALESCE(?, cursor), delivered=delivered+?, last_delivered=? "
                "WHERE account=? AND folder=?",
                cursor,
                len(keys),
                time.time(),
                account,
                folder,
            )
            for key in keys:
                if remember:
                    self._record(account, folder, epoch, key, "delivered", "delivered", None)
                else:
                    self._forget(account, folder, epoch, key)

    def gone(self, account: str, folder: str, epoch: str, key: str, cursor: Optional[str] = None) -> None:
        """Expunged by someone else (a second watcher, a person): nothing left to do."""
        with self._transaction():
            self._move(account, folder, cursor)
            self._forget(account, folder, epoch, key)

    def _move(self, account: str, folder: str, cursor: Optional[str]) -> None:
        if cursor is not None:
            self._run("UPDATE folders SET cursor=? WHERE account=? AND folder=?", cursor, account, folder)

    def _forget(self, account: str, folder: str, epoch: str, key: str) -> None:
        self._run(
            "DELETE FROM messages WHERE account=? AND folder=? AND epoch=? AND key=?",
            account,
            folder,
            epoch,
            key,
        )

    def invalid(
        self, account: str, folder: str, epoch: str, key: str, reason: str, cursor: Optional[str] = None
    ) -> None:
        with self._transaction():
            self._record(account, folder, epoch, key, "invalid", reason, None)
            self._run("UPDATE folders SET invalid=invalid+1 WHERE account=? AND folder=?", account, folder)
            self._move(account, folder, cursor)

    def failed(
        self,
        account: str,
        folder: str,
        epoch: str,
        key: str,
        reason: str,
        max_tries: int,
        cursor: Optional[str] = None,
    ) -> str:
        """Count a failed try; returns "retry", or "quarantined" once the message has failed
        `max_tries` times and some other message of the folder got through after its first failure
        (so the fault is this message's, not an ingress that is down for everyone)."""
        with self._transaction():
            row = self._run(
                "SELECT tries, first_failed FROM messages WHERE account=? AND folder=? AND epoch=? AND key=?",
                account,
                folder,
                epoch,
                key,
            ).fetchone()
            tries, first_failed = (row[0] + 1, row[1]) if row else (1, time.time())
            last = self._run(
                "SELECT last_delivered FROM folders WHERE account=? AND folder=?", account, folder
            ).fetchone()
            others_flow = bool(last and last[0] is not None and last[0] > first_failed)
            status = "quarantined" if tries >= max_tries and others_flow else "retry"
            next_try = time.time() + retry_delay(tries) if status == "retry" else None
            self._record(account, folder, epoch, key, status, reason, next_try, tries, first_failed)
            self._move(account, folder, cursor)
        return status

    def _record(
        self,
        account: str,
        folder: str,
        epoch: str,
        key: str,
        status: str,
        reason: str,
        next_try: Optional[float],
        tries: int = 1,
        first_failed: Optional[float] = None,
    ) -> None:
        self._run(
            "INSERT OR REPLACE INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            account,
            folder,
            epoch,
            key,
            status,
            tries,
            first_failed or time.time(),
            next_try,
            reason,
        )

    def recorded(self, account: str, folder: str, epoch: str) -> Set[str]:
        """Keys with any record (delivered, invalid, failed, quarantined): not new."""
        rows = self._run(
            "SELECT key FROM messages WHERE account=? AND folder=? AND epoch=?", account, folder, epoch
        )
        return {str(row[0]) for row in rows}

    def prune(self, account: str, folder: str, epoch: str, present: FrozenSet[str]) -> None:
        """Forget delivered (and left alone) keys the server no longer has (POP3: the set would
        grow forever)."""
        gone = [key for key in self.recorded(account, folder, epoch) if key not in present]
        with self._transaction():
            for key in gone:
                self._run(
                    "DELETE FROM messages WHERE account=? AND folder=? AND epoch=? AND key=? "
                    "AND status IN ('delivered', 'left')",
                    account,
                    folder,
                    epoch,
                    key,
                )

    def left_alone(self, account: str, folder: str, epoch: str, keys: Sequence[str]) -> None:
        """Keys there at first sight that start = "new" leaves alone, for a source without a
        cursor (POP3): recorded, so they are never new; pruned like delivered ones."""
        with self._transaction():
            for key in keys:
                self._record(account, folder, epoch, key, "left", 'left alone (start = "new")', None)

    def delivered_before(self, account: str, folder: str, epoch: str, when: float) -> Set[str]:
        """Keys recorded as delivered at or before `when` (time.time()): a delivered row's
        first_failed holds when it was delivered."""
        rows = self._run(
            "SELECT key FROM messages WHERE account=? AND folder=? AND epoch=? AND status='delivered' "
            "AND first_failed<=?",
            account,
            folder,
            epoch,
            when,
        )
        return {str(row[0]) for row in rows}

    def due(self, account: str, folder: str, epoch: str, now: Optional[float] = None) -> List[str]:
        """Failed messages whose next try has come, the oldest failure first."""
        rows = self._run(
            "SELECT key FROM messages WHERE account=? AND folder=? AND epoch=? AND status='retry' "
            "AND next_try<=? ORDER BY first_failed, key",
            account,
            folder,
            epoch,
            time.time() if now is None else now,
        )
        return [str(row[0]) for row in rows]

    def next_try(self, account: str, folder: str) -> Optional[float]:
        """When the earliest failed message is due again (time.time()), if any is waiting."""
        row = self._run(
            "SELECT MIN(next_try) FROM messages WHERE account=? AND folder=? AND status='retry'",
            account,
            folder,
        ).fetchone()
        return None if row[0] is None else float(row[0])

    def waiting(self, account: str, folder: str) -> int:
        """Failed messages not yet due for another try."""
        row = self._run(
            "SELECT COUNT(*) FROM messages WHERE account=? AND folder=? AND status='retry'", account, folder
        ).fetchone()
        return int(row[0])

    def release(self, account: str) -> int:
        """`fetch --retry-quarantined`: quarantined messages get a fresh set of tries."""
        cursor = self._run(
            "UPDATE messages SET status='retry', tries=0, next_try=0, first_failed=? "
            "WHERE account=? AND status='quarantined'",
            time.time(),
            account,
        )
        return cursor.rowcount

    # --- status ----------------------------------------------------------------------------

    def report(self) -> List[Dict[str, Any]]:
        """Every folder's row, with its counts of messages by status. `uidvalidity` and
        `last_uid` keep their IMAP names (numbers where the source's are numbers)."""
        columns = {row[1] for row in self._run("PRAGMA table_info(folders)")}
        old = "uidvalidity" in columns  # a 0.1 file, read as it is (status upgrades nothing)
        epoch = "CASE uidvalidity WHEN 0 THEN NULL ELSE CAST(uidvalidity AS TEXT) END" if old else "epoch"
        cursor = "CAST(last_uid AS TEXT)" if old else "cursor"
        until = "watcher_until" if "watcher_until" in columns else "NULL"
        key = "CAST(uid AS TEXT)" if old else "key"
        folders = self._run(
            f"SELECT account, folder, {epoch} AS epoch, {cursor} AS cursor, last_sync, last_delivered, "
            "delivered, invalid, last_error, last_error_at, watcher_pid, watcher_since, "
            f"{until} AS watcher_until FROM folders ORDER BY account, folder"
        )
        names = [column[0] for column in folders.description]
        rows = [dict(zip(names, row)) for row in folders.fetchall()]
        for row in rows:
            row["synced"] = row["epoch"] is not None
            row["uidvalidity"] = _number(row.pop("epoch"))
            row["last_uid"] = _number(row.pop("cursor"))
            counts = self._run(
                "SELECT status, COUNT(*) FROM messages WHERE account=? AND folder=? GROUP BY status",
                row["account"],
                row["folder"],
            )
            by_status = dict(counts.fetchall())
            row["failed"] = by_status.get("retry", 0)
            row["quarantined"] = by_status.get("quarantined", 0)
            row["quarantined_uids"] = [
                {"uid": _number(found), "tries": tries, "reason": reason}
                for found, tries, reason in self._run(
                    f"SELECT {key}, tries, reason FROM messages WHERE account=? AND folder=? "
                    "AND status='quarantined' ORDER BY first_failed",
                    row["account"],
                    row["folder"],
                )
            ]
        return rows


def _number(value: Optional[str]) -> Any:
    """An IMAP UID or UIDVALIDITY as the number it is; other sources' text as it is."""
    return int(value) if value is not None and value.isdigit() else value


class FolderBusy(Exception):
    """Another process is passing over this folder now."""

    def __init__(self, where: str, holder: Optional[int]) -> None:
        who = f"pid {holder}" if holder else "another process"
        super().__init__(f"{where}: another fetch or watch ({who}) is passing over it now; skipped this time")
        self.holder = holder


class FolderLock:
    """Only one pass over a folder at a time, whichever process runs it: two passes would post
    the same messages twice and expunge under each other. An flock on a small file per folder
    in `<state>.locks/` (0700): the kernel releases it when the holder dies, even by kill -9."""

    def __init__(self, state_path: str, account: str, folder: str) -> None:
        key = hashlib.sha256(f"{account}\0{folder}".encode()).hexdigest()[:24]
        self.directory = os.path.abspath(state_path) + ".locks"
        self.path = os.path.join(self.directory, key)
        self.where = f"{account}/{folder}"
        self.state_path = state_path
        self._fd: Optional[int] = None

    def acquire(self, wait: float, stopping: Any = lambda: False) -> None:
        """Take the lock, waiting at most `wait` seconds; FolderBusy if another pass holds it."""
        import fcntl

        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise problem(self.state_path, error) from None
        until = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise problem(self.state_path, error) from None
            if time.monotonic() >= until or stopping():
                holder = _holder(fd)
                os.close(fd)
                raise FolderBusy(self.where, holder)
            time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode() or "0") or None
    return None
