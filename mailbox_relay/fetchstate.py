"""The state of `fetch` and `watch` (SQLite): per account and folder, where delivery has got.

A folder's row holds its UIDVALIDITY and a watermark, `last_uid`: every UID at or below it was
delivered, found invalid, or is listed in `messages` for another try. Catching up after any
downtime is therefore `UID SEARCH last_uid+1:*`, never "since yesterday". Rows are committed
after each message, in WAL mode: after `kill -9` at most the message in flight is posted again,
with the same bytes, which Rails stores once.

Two processes may share the file (two watchers of one mailbox): the watermark only moves up.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

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

RETRY_FIRST = 60.0  # seconds before a failed message is tried again; doubles each try,
RETRY_CAP = 3600.0  # up to an hour


def default_path(environ: Mapping[str, str]) -> str:
    return os.path.join(state_home(environ), "fetch.sqlite3")


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
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        # One connection per thread (each watcher opens its own); transactions are explicit.
        self._db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        os.chmod(path, 0o600)  # folder names and error lines are nobody else's business

    def close(self) -> None:
        self._db.close()

    def _run(self, sql: str, *args: Any) -> sqlite3.Cursor:
        return self._db.execute(sql, args)

    # --- folders ---------------------------------------------------------------------------

    def folder(self, account: str, folder: str) -> Optional[FolderState]:
        row = self._run(
            "SELECT uidvalidity, last_uid, since, first_seen FROM folders WHERE account=? AND folder=?",
            account,
            folder,
        ).fetchone()
        return None if row is None else FolderState(*row)

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

    def advance(self, account: str, folder: str, uid: int) -> None:
        self._run(
            "UPDATE folders SET last_uid=MAX(last_uid, ?) WHERE account=? AND folder=?", uid, account, folder
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
        self._run(
            "UPDATE folders SET last_error=?, last_error_at=? WHERE account=? AND folder=?",
            line,
            time.time(),
            account,
            folder,
        )

    def watching(self, account: str, folder: str, pid: Optional[int]) -> None:
        self._run(
            "UPDATE folders SET watcher_pid=?, watcher_since=? WHERE account=? AND folder=?",
            pid,
            None if pid is None else time.time(),
            account,
            folder,
        )

    # --- messages --------------------------------------------------------------------------

    def delivered(self, account: str, folder: str, uidvalidity: int, uids: Sequence[int]) -> None:
        """Messages the ingress accepted (and `after` was applied to), in one transaction."""
        with self._db:
            self._run("BEGIN IMMEDIATE")
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
        with self._db:
            self._run("BEGIN IMMEDIATE")
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
        with self._db:
            self._run("BEGIN IMMEDIATE")
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
        with self._db:
            self._run("BEGIN IMMEDIATE")
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
            "last_error, last_error_at, watcher_pid, watcher_since FROM folders ORDER BY account, folder"
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
