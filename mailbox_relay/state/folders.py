"""The state of `fetch` and `watch` (SQLite): per account and folder, where delivery has got.

A folder's row holds its UIDVALIDITY and a watermark, `last_uid`: every UID at or below it was
delivered, found invalid, or is listed in `messages` for another try. Catching up after any
downtime is therefore `UID SEARCH last_uid+1:*`, never "since yesterday". Rows are committed
after each message, in WAL mode: after `kill -9` at most the message in flight is posted again,
with the same bytes, which Rails stores once.

Two processes may share the file, but never pass over one folder at the same time: each pass
holds that folder's lock (`FolderLock`, an flock on a file beside the state), so two `fetch`
runs, or a `fetch` beside a `watch`, cannot post the same messages twice or expunge under each
other. Every SQLite failure becomes a `StateProblem` that names the file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Tuple

from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import state_home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS folders (
    account TEXT NOT NULL,
    folder TEXT NOT NULL,
    uidvalidity INTEGER NOT NULL,
    last_uid INTEGER NOT NULL,
    since TEXT,                 -- a SINCE date that still applies (start = DATE, a new UIDVALIDITY)
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
    uidvalidity INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    status TEXT NOT NULL,       -- retry | quarantined | invalid
    tries INTEGER NOT NULL,
    first_failed REAL NOT NULL,
    next_try REAL,
    reason TEXT NOT NULL,
    PRIMARY KEY (account, folder, uidvalidity, uid)
);
"""

# Columns added since the first release, for state files made by an older version.
_ADDED_COLUMNS = {"watcher_until": "REAL"}
NOT_SYNCED = 0  # uidvalidity of a row that only records an error: IMAP's UIDVALIDITY is never 0
BUSY_SECONDS = 30.0  # how long a write waits for another process's transaction

RETRY_FIRST = 60.0  # seconds before a failed message is tried again; doubles each try,
RETRY_CAP = 3600.0  # up to an hour


def default_path(environ: Mapping[str, str]) -> str:
    return os.path.join(state_home(environ), "fetch.sqlite3")


class StateProblem(ConfigError):
    """The state file cannot be used now: damaged, not writable, or locked too long."""

    def __init__(self, path: str, problem: str, advice: str) -> None:
        super().__init__(f"the fetch state {path} {problem}: {advice}")
        self.path = path


def _problem(path: str, error: BaseException) -> StateProblem:
    """An SQLite or OS error as what it means for the user, and what to do about it."""
    text = str(error)
    if isinstance(error, OSError):
        return StateProblem(
            path, f"cannot be created ({error.strerror or text})", "set fetch_state to a writable path"
        )
    if "locked" in text or "busy" in text:
        return StateProblem(
            path,
            f"was locked by another process for more than {BUSY_SECONDS:g}s ({text})",
            "what was delivered is safe; anything not recorded is posted again on the next run "
            "(Rails stores it once)",
        )
    if "readonly" in text or "unable to open" in text or "disk I/O" in text or "full" in text:
        return StateProblem(
            path,
            f"cannot be opened or written ({text})",
            "check its permissions and free space, or set fetch_state",
        )
    if isinstance(error, sqlite3.DatabaseError):  # "file is not a database", "malformed"...
        return StateProblem(
            path,
            f"is damaged ({text})",
            "move it aside (each folder then starts again as `start` says; Rails stores re-posted mail once)",
        )
    return StateProblem(path, f"cannot be used ({type(error).__name__}: {text})", "see the error")


def synced_folders(path: str) -> FrozenSet[Tuple[str, str]]:
    """(account, folder) of every folder synced so far, read only: nothing is created, and a
    state that cannot be read counts as none synced (for `check --account`'s notes)."""
    if not os.path.exists(path):
        return frozenset()
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            rows = db.execute("SELECT account, folder FROM folders WHERE uidvalidity<>?", (NOT_SYNCED,))
            return frozenset((str(account), str(folder)) for account, folder in rows)
        finally:
            db.close()
    except sqlite3.Error:
        return frozenset()


@dataclass(frozen=True)
class FolderState:
    uidvalidity: int
    last_uid: int
    since: Optional[str]
    first_seen: float


def retry_delay(tries: int) -> float:
    return float(min(RETRY_CAP, RETRY_FIRST * 2 ** (tries - 1)))


class FetchState:
    def __init__(self, path: str) -> None:
        self.path = path
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            # One connection per thread (each watcher opens its own); transactions are explicit.
            self._db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_SECONDS)
        except (OSError, sqlite3.Error) as error:
            raise _problem(path, error) from None
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            self._add_columns()
            os.chmod(path, 0o600)  # folder names and error lines are nobody else's business
        except (OSError, sqlite3.Error) as error:
            self._db.close()
            raise _problem(path, error) from None

    def _add_columns(self) -> None:
        have = {row[1] for row in self._db.execute("PRAGMA table_info(folders)")}
        for name, kind in _ADDED_COLUMNS.items():
            if name not in have:
                self._db.execute(f"ALTER TABLE folders ADD COLUMN {name} {kind}")

    def close(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            self._db.close()

    def _run(self, sql: str, *args: Any) -> sqlite3.Cursor:
        try:
            return self._db.execute(sql, args)
        except sqlite3.Error as error:
            raise _problem(self.path, error) from None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction; every failure (the commit's too) is a StateProblem."""
        self._run("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise
        self._run("COMMIT")

    def lock(self, account: str, folder: str) -> FolderLock:
        """The lock one pass over this folder holds (see FolderLock)."""
        return FolderLock(self.path, account, folder)

    # --- folders ---------------------------------------------------------------------------

    def folder(self, account: str, folder: str) -> Optional[FolderState]:
        row = self._run(
            "SELECT uidvalidity, last_uid, since, first_seen FROM folders WHERE account=? AND folder=?",
            account,
            folder,
        ).fetchone()
        if row is None or row[0] == NOT_SYNCED:
            return None
        return FolderState(*row)

    def begin(self, account: str, folder: str, uidvalidity: int, last_uid: int, since: Optional[str]) -> None:
        """A folder seen for the first time, or under a new UIDVALIDITY (its old UIDs mean nothing)."""
        now = time.time()
        self._run(
            "INSERT INTO folders (account, folder, uidvalidity, last_uid, since, first_seen) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (account, folder) DO UPDATE SET "
            "uidvalidity=excluded.uidvalidity, last_uid=excluded.last_uid, since=excluded.since",
            account,
            folder,
            uidvalidity,
            last_uid,
            since,
            now,
        )
        self._run(
            "DELETE FROM messages WHERE account=? AND folder=? AND uidvalidity<>?",
            account,
            folder,
            uidvalidity,
        )

    def synced(self, account: str, folder: str, *, complete: bool) -> None:
        """A pass ended; a complete one ends a SINCE restriction and clears the last error."""
        extra = ", since=NULL, last_error=NULL" if complete else ""
        self._run(
            f"UPDATE folders SET last_sync=?{extra} WHERE account=? AND folder=?",
            time.time(),
            account,
            folder,
        )

    def error(self, account: str, folder: str, line: str) -> None:
        """The last problem of a folder, with its time: IMAP, token, password command or ingress.
        A folder never synced gets a row that holds only this (uidvalidity NOT_SYNCED)."""
        now = time.time()
        self._run(
            "INSERT INTO folders (account, folder, uidvalidity, last_uid, first_seen, last_error, "
            "last_error_at) VALUES (?, ?, ?, 0, ?, ?, ?) ON CONFLICT (account, folder) DO UPDATE SET "
            "last_error=excluded.last_error, last_error_at=excluded.last_error_at",
            account,
            folder,
            NOT_SYNCED,
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

    # --- messages --------------------------------------------------------------------------

    def delivered(self, account: str, folder: str, uidvalidity: int, uids: Sequence[int]) -> None:
        """Messages the ingress accepted (and `after` was applied to), in one transaction."""
        with self._transaction():
            self._run(
                "UPDATE folders SET last_uid=MAX(last_uid, ?), delivered=delivered+?, last_delivered=? "
                "WHERE account=? AND folder=?",
                max(uids),
                len(uids),
                time.time(),
                account,
                folder,
            )
            for uid in uids:
                self._forget(account, folder, uidvalidity, uid)

    def gone(self, account: str, folder: str, uidvalidity: int, uid: int) -> None:
        """Expunged by someone else (a second watcher, a person): nothing left to do."""
        with self._transaction():
            self._run(
                "UPDATE folders SET last_uid=MAX(last_uid, ?) WHERE account=? AND folder=?",
                uid,
                account,
                folder,
            )
            self._forget(account, folder, uidvalidity, uid)

    def _forget(self, account: str, folder: str, uidvalidity: int, uid: int) -> None:
        self._run(
            "DELETE FROM messages WHERE account=? AND folder=? AND uidvalidity=? AND uid=?",
            account,
            folder,
            uidvalidity,
            uid,
        )

    def invalid(self, account: str, folder: str, uidvalidity: int, uid: int, reason: str) -> None:
        with self._transaction():
            self._record(account, folder, uidvalidity, uid, "invalid", reason, None)
            self._run(
                "UPDATE folders SET last_uid=MAX(last_uid, ?), invalid=invalid+1 "
                "WHERE account=? AND folder=?",
                uid,
                account,
                folder,
            )

    def failed(
        self, account: str, folder: str, uidvalidity: int, uid: int, reason: str, max_tries: int
    ) -> str:
        """Count a failed try; returns "retry", or "quarantined" once the message has failed
        `max_tries` times and some other message of the folder got through after its first failure
        (so the fault is this message's, not an ingress that is down for everyone)."""
        with self._transaction():
            row = self._run(
                "SELECT tries, first_failed FROM messages "
                "WHERE account=? AND folder=? AND uidvalidity=? AND uid=?",
                account,
                folder,
                uidvalidity,
                uid,
            ).fetchone()
            tries, first_failed = (row[0] + 1, row[1]) if row else (1, time.time())
            last = self._run(
                "SELECT last_delivered FROM folders WHERE account=? AND folder=?", account, folder
            ).fetchone()
            others_flow = bool(last and last[0] is not None and last[0] > first_failed)
            status = "quarantined" if tries >= max_tries and others_flow else "retry"
            next_try = time.time() + retry_delay(tries) if status == "retry" else None
            self._record(account, folder, uidvalidity, uid, status, reason, next_try, tries, first_failed)
            self._run(
                "UPDATE folders SET last_uid=MAX(last_uid, ?) WHERE account=? AND folder=?",
                uid,
                account,
                folder,
            )
        return status

    def _record(
        self,
        account: str,
        folder: str,
        uidvalidity: int,
        uid: int,
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
            uidvalidity,
            uid,
            status,
            tries,
            first_failed or time.time(),
            next_try,
            reason,
        )

    def due(self, account: str, folder: str, uidvalidity: int, now: Optional[float] = None) -> List[int]:
        """Failed messages whose next try has come."""
        rows = self._run(
            "SELECT uid FROM messages WHERE account=? AND folder=? AND uidvalidity=? AND status='retry' "
            "AND next_try<=? ORDER BY uid",
            account,
            folder,
            uidvalidity,
            time.time() if now is None else now,
        )
        return [row[0] for row in rows]

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
        """Every folder's row, with its counts of messages by status."""
        folders = self._run(
            "SELECT account, folder, uidvalidity, last_uid, last_sync, last_delivered, delivered, invalid, "
            "last_error, last_error_at, watcher_pid, watcher_since, watcher_until FROM folders "
            "ORDER BY account, folder"
        )
        names = [column[0] for column in folders.description]
        rows = [dict(zip(names, row)) for row in folders.fetchall()]
        for row in rows:
            counts = self._run(
                "SELECT status, COUNT(*) FROM messages WHERE account=? AND folder=? GROUP BY status",
                row["account"],
                row["folder"],
            )
            by_status = dict(counts.fetchall())
            row["failed"] = by_status.get("retry", 0)
            row["quarantined"] = by_status.get("quarantined", 0)
            row["quarantined_uids"] = [
                {"uid": uid, "tries": tries, "reason": reason}
                for uid, tries, reason in self._run(
                    "SELECT uid, tries, reason FROM messages WHERE account=? AND folder=? "
                    "AND status='quarantined' ORDER BY uid",
                    row["account"],
                    row["folder"],
                )
            ]
        return rows


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
            raise _problem(self.state_path, error) from None
        until = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    os.close(fd)
                    raise _problem(self.state_path, error) from None
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
