"""The resume journal of `import`: which messages of which input were delivered (SQLite).

One row per delivered message: (source, key, SHA-256 of the bytes sent). Rows are committed in
one transaction per batch of finished deliveries, in WAL mode, so after a crash or `kill -9`
a rerun re-sends at most the messages that were in flight. A message whose bytes changed since
(an mbox rewritten in place) has a different SHA-256 and is sent again.
"""

from __future__ import annotations

import os
import time
from typing import Iterable, Mapping, Tuple

from mailbox_relay.settings import state_home
from mailbox_relay.sources.files import printable
from mailbox_relay.state.store import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS delivered (
    source TEXT NOT NULL,
    key TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    delivered_at REAL NOT NULL,
    PRIMARY KEY (source, key)
) WITHOUT ROWID
"""


def default_path(environ: Mapping[str, str]) -> str:
    return os.path.join(state_home(environ), "import.sqlite3")


class Journal:
    """Names are stored as `printable` text: SQLite takes no lone surrogates (non-UTF-8 names)."""

    def __init__(self, path: str) -> None:
        """A StateProblem (naming the file and --state) if it cannot be opened."""
        self.path = path
        self._db = open_db(path, _SCHEMA, what="journal", setting="--state")

    def delivered(self, source: str, key: str, sha256: str) -> bool:
        row = self._db.execute(
            "SELECT sha256 FROM delivered WHERE source = ? AND key = ?", (printable(source), printable(key))
        ).fetchone()
        return row is not None and row[0] == sha256

    def record(self, rows: Iterable[Tuple[str, str, str]]) -> None:
        """Remember a batch of deliveries in one transaction."""
        now = time.time()
        with self._db:
            self._db.execute("BEGIN")
            self._db.executemany(
                "INSERT OR REPLACE INTO delivered VALUES (?, ?, ?, ?)",
                [(printable(source), printable(key), sha, now) for source, key, sha in rows],
            )

    def forget(self, source: str) -> int:
        with self._db:
            return self._db.execute("DELETE FROM delivered WHERE source = ?", (printable(source),)).rowcount

    def close(self) -> None:
        self._db.close()
