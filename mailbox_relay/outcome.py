"""The one outcome table: every way a delivery can end, and the only place with exit numbers.

Nothing here does I/O. The CLI's single error boundary turns an `Outcome` into an `Exit` with
`exit_code()`; `check` uses `check_exit_code()`. Adding a failure means adding one row.
"""

from __future__ import annotations

import enum
from typing import Dict, Optional, Tuple


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


class Trouble(enum.Enum):
    """What went wrong with an IMAP server or an OAuth2 token endpoint (imap.ImapProblem.kind,
    oauth2.TokenProblem.kind): check's exit code for it, and whether it may pass by itself (a
    reconnect or a later run may work) or needs a person (a setting, a password, a sign-in)."""

    DNS = ("dns", Exit.UNAVAILABLE, True)
    CONNECT = ("connect", Exit.UNAVAILABLE, True)
    TLS = ("tls", Exit.CONFIG, False)  # at login: the server requires TLS (RFC 5530 PRIVACYREQUIRED)
    LOGIN = ("login", Exit.NOPERM, False)
    UNAVAILABLE = ("unavailable", Exit.UNAVAILABLE, True)  # RFC 5530 UNAVAILABLE, INUSE, LIMIT
    GRANT = ("grant", Exit.NOPERM, False)  # no OAuth2 grant, or a revoked one: run `auth` again
    FOLDER = ("folder", Exit.CONFIG, False)
    AFTER = ("after", Exit.UNAVAILABLE, True)  # acknowledging (seen, move, delete) failed
    PROTOCOL = ("protocol", Exit.UNAVAILABLE, True)
    NETWORK = ("network", Exit.UNAVAILABLE, True)  # lost or too slow: reconnect
    CLIENT = ("client", Exit.CONFIG, False)  # an OAuth2 client setting is wrong
    DENIED = ("denied", Exit.NOPERM, False)  # auth: the person declined the sign-in
    TIMEOUT = ("timeout", Exit.UNAVAILABLE, True)  # auth: nobody signed in in time

    def __new__(cls, kind: str, check_code: Exit = Exit.UNAVAILABLE, temporary: bool = True) -> Trouble:
        member = object.__new__(cls)
        member._value_ = kind  # Trouble("login"): the kinds of ImapProblem and TokenProblem
        return member

    def __init__(self, kind: str, check_code: Exit = Exit.UNAVAILABLE, temporary: bool = True) -> None:
        self.check_code = check_code
        self.temporary = temporary

    @classmethod
    def of(cls, kind: str) -> Trouble:
        """The row of a problem's kind; an unknown kind may pass by itself, like a network one."""
        try:
            return cls(kind)
        except ValueError:
            return cls.NETWORK


def auth_exit_code(trouble: Trouble) -> Exit:
    """`auth`: 77 the sign-in was declined, 75 it may work when run again, 78 a setting is wrong."""
    if trouble is Trouble.DENIED:
        return Exit.NOPERM
    return Exit.TEMPFAIL if trouble.temporary else Exit.CONFIG


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


# --- every command's exit codes: what --help and the README say (tests/test_repo.py compares) ---

ExitMap = Tuple[Tuple[Exit, str], ...]

USAGE_ROW = (Exit.USAGE, "usage error (a wrong option or option value)")

IMPORT_EXITS: ExitMap = (
    (Exit.OK, "nothing left undelivered"),
    (
        Exit.TEMPFAIL,
        "some messages failed for a reason that may pass, the run was interrupted, or it stopped "
        "early on an answer every message would get (fix the cause, run the same command again)",
    ),
    (Exit.NOINPUT, "an input or a message could not be read (and nothing failed otherwise)"),
    (Exit.DATAERR, "some messages are invalid (and nothing else went wrong)"),
    (
        Exit.CONFIG,
        "a setting is wrong (a missing URL or password, a failed_dir from the environment or the "
        "config file that cannot be used)",
    ),
    (Exit.USAGE, "usage error (a wrong option or value, an unwritable --state or --failed-dir)"),
)
CHECK_EXITS: ExitMap = (
    (Exit.OK, "ready"),
    (Exit.NOPERM, "password rejected (401/403), or an IMAP login or OAuth2 grant refused"),
    (
        Exit.CONFIG,
        "configuration: wrong path (404), redirect, missing URL/password, plain http, a missing "
        "IMAP folder or a wrong OAuth2 client",
    ),
    (Exit.UNAVAILABLE, "unreachable, TLS failure, timeout or 5xx (or check itself failed unexpectedly)"),
    USAGE_ROW,
)
FETCH_EXITS: ExitMap = (
    (Exit.OK, "everything found was delivered"),
    (Exit.TEMPFAIL, "something failed and may pass on a later run"),
    (Exit.DATAERR, "only invalid messages are left"),
    (Exit.CONFIG, "a setting is wrong (the config file, an account, the state file, failed_dir)"),
    USAGE_ROW,
)
WATCH_EXITS: ExitMap = (
    (Exit.OK, "stopped by a signal"),
    (
        Exit.CONFIG,
        "a setting is wrong (the config file, an account, the state file at start), or an IMAP "
        "login was rejected 3 times in a row",
    ),
    USAGE_ROW,
)
STATUS_EXITS: ExitMap = (
    (Exit.OK, "shown (also when nothing was fetched yet)"),
    (Exit.CONFIG, "the config file, an account named with --account, or the state file is unusable"),
    USAGE_ROW,
)
AUTH_EXITS: ExitMap = (
    (Exit.OK, "the grant is saved"),
    (Exit.NOPERM, "the sign-in was declined"),
    (Exit.TEMPFAIL, "no sign-in in time, or the provider could not be reached: run it again"),
    (Exit.CONFIG, "the account's OAuth2 settings are wrong (the line says which)"),
    USAGE_ROW,
)
SERVE_EXITS: ExitMap = (
    (Exit.OK, "stopped with Ctrl-C or SIGTERM"),
    (Exit.CONFIG, "no password"),
    (Exit.CANTCREAT, "the Maildir cannot be created"),
    (Exit.UNAVAILABLE, "cannot listen on --host/--port"),
    USAGE_ROW,
)
MIGRATE_EXITS: ExitMap = (
    (Exit.OK, "the accounts are printed (what has no equivalent is said in comments)"),
    (Exit.NOINPUT, "a file cannot be read"),
    (Exit.DATAERR, "a file cannot be understood, or holds nothing to move (the line says why)"),
    (Exit.CANTCREAT, "--save-passwords could not write a password file"),
    USAGE_ROW,
)
# deliver (and mailbox-relay itself) answer MTAs: each kind of outcome in both conventions.
DELIVER_EXITS: Tuple[Tuple[Kind, str, str], ...] = (
    (Kind.DELIVERED, "delivered (2xx)", ""),
    (Kind.PERMANENT, "invalid message", "permanent: the caller bounces it"),
    (Kind.TEMPORARY, "anything else", "temporary: the caller keeps it and retries"),
)
EXIT_MAPS: Dict[str, ExitMap] = {
    "import": IMPORT_EXITS,
    "check": CHECK_EXITS,
    "fetch": FETCH_EXITS,
    "watch": WATCH_EXITS,
    "status": STATUS_EXITS,
    "auth": AUTH_EXITS,
    "serve": SERVE_EXITS,
    "migrate": MIGRATE_EXITS,
}
