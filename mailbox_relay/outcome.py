"""The one outcome table: every way a delivery can end, and the only place with exit numbers.

Nothing here does I/O. The CLI's single error boundary turns an `Outcome` into an `Exit` with
`exit_code()`; `check` uses `check_exit_code()`. Adding a failure means adding one row.
"""

from __future__ import annotations

import enum
from typing import Dict, Optional


class Exit(enum.IntEnum):
    """Every exit code mailbox-relay uses: sysexits(3), plus qmail's two."""

    OK = 0
    USAGE = 64  # EX_USAGE: a person typed a wrong option (never for deliver: MTAs bounce on it)
    DATAERR = 65  # EX_DATAERR: the message itself can never be accepted
    NOINPUT = 66  # EX_NOINPUT: an import input cannot be read
    UNAVAILABLE = 69  # EX_UNAVAILABLE: check: the ingress cannot be reached
    SOFTWARE = 70  # EX_SOFTWARE: check: an internal error
    CANTCREAT = 73  # EX_CANTCREAT: serve: the Maildir cannot be created
    TEMPFAIL = 75  # EX_TEMPFAIL: may work later; the only code every MTA defers on
    NOPERM = 77  # EX_NOPERM: check: the password was rejected
    CONFIG = 78  # EX_CONFIG: check: a setting is wrong
    QMAIL_HARD = 100  # qmail-local: permanent failure
    QMAIL_SOFT = 111  # qmail-local: temporary failure


class Kind(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # may work later: the caller keeps the message and retries
    PERMANENT = "permanent"  # the message itself can never be accepted


class Reason(enum.Enum):
    """Rows of the table: enhanced status code, kind, retry within this run?, check's exit code,
    and systemic: would every other message fail the same way (so a bulk run should stop)?"""

    DELIVERED = ("2.0.0", Kind.DELIVERED, False, Exit.OK, False)
    INVALID_MESSAGE = ("5.6.0", Kind.PERMANENT, False, Exit.DATAERR, False)
    TOO_BIG = ("5.3.4", Kind.PERMANENT, False, Exit.DATAERR, False)
    UNREADABLE = ("4.3.0", Kind.TEMPORARY, False, Exit.NOINPUT, False)  # import: a file vanished...
    CONFIG = ("4.3.5", Kind.TEMPORARY, False, Exit.CONFIG, True)
    NOT_FOUND = ("4.3.5", Kind.TEMPORARY, False, Exit.CONFIG, True)
    REDIRECT = ("4.3.5", Kind.TEMPORARY, False, Exit.CONFIG, True)
    WRONG_MEDIA_TYPE = ("4.3.5", Kind.TEMPORARY, False, Exit.CONFIG, True)
    NOT_ACTION_MAILBOX = ("4.3.5", Kind.TEMPORARY, False, Exit.CONFIG, True)
    AUTH = ("4.7.0", Kind.TEMPORARY, False, Exit.NOPERM, True)
    FORBIDDEN = ("4.7.1", Kind.TEMPORARY, False, Exit.NOPERM, True)
    INGRESS_LIMIT = ("4.3.4", Kind.TEMPORARY, False, Exit.UNAVAILABLE, False)
    # The chosen ingress cannot carry this message's bytes unchanged; another ingress could.
    NOT_CARRIED = ("4.6.3", Kind.TEMPORARY, False, Exit.CONFIG, False)
    CLIENT_ERROR = ("4.3.0", Kind.TEMPORARY, False, Exit.UNAVAILABLE, False)
    BUSY = ("4.4.5", Kind.TEMPORARY, True, Exit.UNAVAILABLE, False)
    SERVER_ERROR = ("4.3.0", Kind.TEMPORARY, True, Exit.UNAVAILABLE, False)
    # Connection refused or a name that does not resolve: every message would meet it too.
    UNREACHABLE = ("4.4.1", Kind.TEMPORARY, True, Exit.UNAVAILABLE, True)
    NETWORK = ("4.4.2", Kind.TEMPORARY, True, Exit.UNAVAILABLE, False)
    TIMEOUT = ("4.4.2", Kind.TEMPORARY, True, Exit.UNAVAILABLE, False)
    TLS = ("4.7.5", Kind.TEMPORARY, False, Exit.UNAVAILABLE, True)
    INTERRUPTED = ("4.3.0", Kind.TEMPORARY, False, Exit.TEMPFAIL, False)
    INTERNAL = ("4.3.0", Kind.TEMPORARY, False, Exit.SOFTWARE, False)

    def __init__(self, code: str, kind: Kind, retry: bool, check_code: Exit, systemic: bool) -> None:
        self.code = code
        self.kind = kind
        self.retry = retry
        self.check_code = check_code
        self.systemic = systemic


class Outcome:
    """How one delivery ended: a row of the table, a line of detail, and any Retry-After.

    A plain class rather than a dataclass: every delivered message pays for building classes at
    import time, and dataclasses would cost deliver a few milliseconds for nothing it uses.
    """

    __slots__ = ("detail", "reason", "retry_after")

    def __init__(self, reason: Reason, detail: str, retry_after: Optional[float] = None) -> None:
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after  # seconds the ingress asked us to wait, if it said

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Outcome):
            return NotImplemented
        return (self.reason, self.detail, self.retry_after) == (other.reason, other.detail, other.retry_after)

    def __hash__(self) -> int:
        return hash((self.reason, self.detail, self.retry_after))

    def __repr__(self) -> str:
        return f"Outcome({self.reason.name}, {self.detail!r}, retry_after={self.retry_after!r})"

    @property
    def kind(self) -> Kind:
        return self.reason.kind

    @property
    def delivered(self) -> bool:
        return self.reason.kind is Kind.DELIVERED

    def line(self) -> str:
        """The one line a failure prints; it leads with the enhanced code so Postfix can use it."""
        return f"{self.reason.code} {self.detail}"

    def after(self, attempts: int, seconds: float) -> Outcome:
        if attempts <= 1:
            return self
        detail = f"{self.detail} [{attempts} attempts over {seconds:.0f}s]"
        return Outcome(self.reason, detail, self.retry_after)


DELIVERED = Outcome(Reason.DELIVERED, "delivered")

SYSEXITS: Dict[Kind, Exit] = {
    Kind.DELIVERED: Exit.OK,
    Kind.PERMANENT: Exit.DATAERR,
    Kind.TEMPORARY: Exit.TEMPFAIL,
}
QMAIL: Dict[Kind, Exit] = {
    Kind.DELIVERED: Exit.OK,
    Kind.PERMANENT: Exit.QMAIL_HARD,
    Kind.TEMPORARY: Exit.QMAIL_SOFT,
}
EXIT_STYLES = {"sysexits": SYSEXITS, "qmail": QMAIL}


def exit_code(outcome: Outcome, style: str = "sysexits") -> Exit:
    """The exit code an MTA reads for `outcome`, in the chosen convention (sysexits or qmail)."""
    return EXIT_STYLES.get(style, SYSEXITS)[outcome.kind]


class RelayError(Exception):
    """Raised by the core for anything that ends a delivery; carries its outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.line())
        self.outcome = outcome


class ConfigError(RelayError):
    def __init__(self, detail: str) -> None:
        super().__init__(Outcome(Reason.CONFIG, detail))


class UsageError(ConfigError):
    """A bad value given on the command line: exit 64 for a person, 75 for deliver (MTAs bounce 64)."""


class InvalidMessage(RelayError):
    def __init__(self, detail: str, reason: Reason = Reason.INVALID_MESSAGE) -> None:
        super().__init__(Outcome(reason, detail))


def check_exit_code(outcome: Outcome) -> Exit:
    """Exit codes of `check`, for people and monitoring: 0 ready, 77 password, 78 config, 69 down."""
    return outcome.reason.check_code


def internal_error(error: BaseException) -> Outcome:
    """A bug of ours: temporary, so the caller keeps the message (a crash must defer, never bounce)."""
    return Outcome(
        Reason.INTERNAL,
        f"internal error ({type(error).__name__}: {error}); the message was not delivered and "
        "will be retried; please report this",
    )
