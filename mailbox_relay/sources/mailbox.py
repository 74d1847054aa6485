"""The protocol every mailbox source implements for fetch and watch, whatever it speaks.

A source is one account's mailbox over one connection. The pass rules (fetch/rules.py) drive
it without knowing which it is: they open a folder, ask for what is new since the folder's
cursor, fetch and post in order, and acknowledge only after a 2xx. What differs by source is
how "new" is known, and it travels as opaque text:

| source | epoch        | keys            | cursor                          | delivered keys recorded |
|--------|--------------|-----------------|---------------------------------|-------------------------|
| IMAP   | UIDVALIDITY  | UIDs            | the last handled UID            | no: the cursor suffices |
| POP3   | ""           | UIDLs (or a digest of the headers) | none         | yes (pruned to the server's) |
| Graph  | ""           | immutable ids   | the delta link, once all handled | yes (a resync re-lists) |

Keys mean something only within an epoch: a new epoch makes every key new. The state store
keeps the epoch, the cursor and the per-key records (state/folders.py); a source never sees
the state, and the rules never look inside a key or a cursor.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, FrozenSet, List, Mapping, Optional, Sequence

if TYPE_CHECKING:  # a runtime Protocol class costs its creation at import; only mypy needs it
    import socket
    from typing import Protocol

    from mailbox_relay.accounts import Account, After

Key = str  # one message within a folder and an epoch: IMAP's UID, POP3's UIDL, Graph's id


class SourceProblem(Exception):
    """Why a source could not connect, log in, open a folder or go on. `kind` says who can fix
    it: "login", "grant", "tls", "folder" need a person; "network", "unavailable" pass by
    themselves. The line says what to do next. `cause` says how a connection was lost, for
    watch's listeners: "reset", "closed", "timeout" or "error"."""

    def __init__(self, kind: str, line: str, cause: str = "error") -> None:
        super().__init__(line)
        self.kind = kind
        self.line = line
        self.cause = cause


@dataclass(frozen=True)
class Opened:
    """A folder as a pass finds it."""

    epoch: str  # keys mean something only within one epoch ("" for a source whose keys never change)
    exists: int  # messages in it now: what start = "new" leaves alone on first sight
    newest: Optional[str]  # the cursor that makes everything there now old (start = "new")


@dataclass
class Listing:
    """What is new since a cursor, and how the cursor moves as it is handled."""

    keys: List[Key]  # not yet handled, in the order they must be handled
    checkpoints: Dict[Key, str] = field(default_factory=dict)  # cursor once this key and all before it are
    final: Optional[str] = None  # cursor once every key is handled (also when there is none)
    remember: bool = False  # record each delivered key: the cursor alone cannot tell it was delivered
    present: Optional[FrozenSet[Key]] = None  # every key on the server: records of the others may go
    # With `remember` and `present`: seconds a delivered key may stay on the server before the
    # pass deletes it (acknowledge with after = delete); None: never. POP3 applies DELE only at
    # a clean QUIT, so after = delete says 0 (a DELE lost with its connection is sent again,
    # nothing is posted again), and delete_after = "30d" says 30 days.
    linger: Optional[float] = None


if TYPE_CHECKING:

    class Source(Protocol):
        """One account's mailbox over one connection: an IMAP connection, a POP3 session, a
        Graph client. Every method raises SourceProblem for what can be named."""

        account: Account
        key_label: str  # what log lines call a key: "UID", "UIDL", "message"

        def open(self, folder: str) -> Opened:
            """Open (select) a folder for the calls below; its problems are "folder" ones."""
            ...

        def listing(
            self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
        ) -> Listing:
            """What is new after `cursor` (None: everything), received on or after `since` —
            among the keys up to `through` only, when given: later keys are new whatever their
            date. With `since`, `final` is at least `through`, so the cursor passes what the
            date left alone once the listing is handled."""
            ...

        def sizes(self, keys: Sequence[Key]) -> Dict[Key, int]:
            """The size of each key still there; a key missing from the answer is gone."""
            ...

        def fetch(self, keys: Sequence[Key], sizes: Mapping[Key, int]) -> Dict[Key, bytes]:
            """The exact bytes, the same on every call (a source whose server regenerates them
            spools the first download); a key missing from the answer is gone."""
            ...

        def acknowledge(self, keys: Sequence[Key], after: After) -> None:
            """`after` (keep, seen, move, delete) for keys the ingress accepted."""
            ...

        # watch waits on every connection at once, in one event loop: a source tells it which
        # socket to watch, reads what came without blocking, and ends the wait with a round trip.

        def start_waiting(self) -> Optional[socket.socket]:
            """Start waiting for news (IMAP: IDLE, bounded by `timeout`) and return the socket
            whose readability means something came; None for a source that polls (watch then
            calls stop_waiting every `refresh_every` seconds and passes over the folder)."""
            ...

        def readable(self) -> bool:
            """The socket is readable: read what is there without blocking. True when news came
            (a pass is due); a lost connection (FIN, RST, TLS close) raises SourceProblem
            ("network") at once. Also answers for what start_waiting read ahead."""
            ...

        def stop_waiting(self) -> None:
            """End the wait with a round trip bounded by `timeout` (IMAP: DONE and its answer;
            polling: NOOP), which proves the connection alive; the source can then pass."""
            ...

        @property
        def refresh_every(self) -> float:
            """Seconds between those round trips while waiting (idle_refresh, poll_interval)."""
            ...

        @property
        def waiting(self) -> str:
            """How it waits, for the log: "IDLE", "polling every 60s"."""
            ...

        def replace_at(self) -> Optional[float]:
            """When (time.time()) this connection must be replaced (its OAuth2 token ends)."""
            ...

        def close(self) -> None:
            """Log out if the connection still works; never raises."""
            ...


def describe(error: BaseException) -> str:
    """An OS or network error as words: "timed out", the OS's reason, or its text."""
    import socket

    if isinstance(error, socket.timeout):
        return "timed out"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__
