"""The one way this tool opens an SQLite file: WAL, a 0600 file in a 0700 directory, explicit
transactions, and every failure as a `StateProblem` that names the file and what to do.

The import journal (journal.py) and the fetch/watch folders (folders.py) both open theirs here;
nothing else calls sqlite3.connect.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from typing import Iterator, Optional

from mailbox_relay.outcome import ConfigError

BUSY_SECONDS = 30.0  # how long a write waits for another process's transaction


class StateProblem(ConfigError):
    """A state file cannot be used now: damaged, not writable, or locked too long."""

    def __init__(self, path: str, problem: str, advice: str, what: str = "fetch state") -> None:
        super().__init__(f"the {what} {path} {problem}: {advice}")
        self.path = path


def problem(
    path: str, error: BaseException, what: str = "fetch state", setting: str = "fetch_state"
) -> StateProblem:
    """An SQLite or OS error as what it means for the user, and what to do about it."""
    text = str(error)
    if isinstance(error, OSError):
        return StateProblem(
            path, f"cannot be created ({error.strerror or text})", f"set {setting} to a writable path", what
        )
    if "locked" in text or "busy" in text:
        return StateProblem(
            path,
            f"was locked by another process for more than {BUSY_SECONDS:g}s ({text})",
            "what was delivered is safe, and anything not recorded is posted again on the next run "
            f"(Rails stores it once); if it goes on, find the process holding it: fuser {path}",
            what,
        )
    if "readonly" in text or "unable to open" in text or "disk I/O" in text or "full" in text:
        return StateProblem(
            path,
            f"cannot be opened or written ({text})",
            f"check its permissions and free space, or set {setting}",
            what,
        )
    if isinstance(error, sqlite3.DatabaseError):  # "file is not a database", "malformed"...
        return StateProblem(
            path,
            f"is damaged ({text})",
            'move it aside, then run fetch once with start = "all" (or a date before the damage) '
            "so nothing that arrived meanwhile is left alone; Rails stores re-posted mail once",
            what,
        )
    return StateProblem(
        path,
        f"cannot be used ({type(error).__name__}: {text})",
        'move it aside, then run fetch once with start = "all"; Rails stores re-posted mail once',
        what,
    )


def open_db(
    path: str,
    schema: str = "",
    *,
    readonly: bool = False,
    busy: Optional[float] = None,
    what: str = "fetch state",
    setting: str = "fetch_state",
) -> sqlite3.Connection:
    """The database at `path`, made if missing (0600, in a 0700 directory it creates), in WAL
    mode with `schema` applied; read-only opens an existing file and creates nothing. Every
    failure is a StateProblem naming the file, `what` it is and the `setting` that moves it."""
    try:
        if readonly:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=busy if busy is not None else 1.0)
        else:
            directory = os.path.dirname(os.path.abspath(path))
            if not os.path.isdir(directory):
                os.makedirs(directory, mode=0o700, exist_ok=True)
            if not os.path.exists(path):  # created private: folder names and errors are nobody else's
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
            db = sqlite3.connect(path, isolation_level=None, timeout=BUSY_SECONDS if busy is None else busy)
    except (OSError, sqlite3.Error) as error:
        raise problem(path, error, what, setting) from None
    if readonly:
        return db
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # durable against kill -9 in WAL mode
        if schema:
            db.executescript(schema)
        os.chmod(path, 0o600)
    except (OSError, sqlite3.Error) as error:
        db.close()
        raise problem(path, error, what, setting) from None
    return db


@contextlib.contextmanager
def transaction(db: sqlite3.Connection, path: str) -> Iterator[None]:
    """One write transaction; every failure (the commit's too) is a StateProblem."""
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.Error as error:
        raise problem(path, error) from None
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    try:
        db.execute("COMMIT")
    except sqlite3.Error as error:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise problem(path, error) from None
