"""The one outcome table: every way a delivery can end, and the exit codes for each.

Nothing here does I/O. The CLI's single error boundary turns an `Outcome` into an exit code
with `exit_code()`; `check` uses `check_exit_code()`. Adding a failure means adding one row.
"""

from __future__ import annotations

import enum
from typing import Optional
from urllib.parse import urlsplit

RELAY_PATH = "/rails/action_mailbox/relay/inbound_emails"

# Paths that old guides (and the relay controller's own doc comment) print, but Rails never routed.
_WRONG_INGRESS_SEGMENTS = ("/postfix/", "/exim/", "/qmail/")


class Kind(enum.Enum):
    DELIVERED = "delivered"
    TEMPORARY = "temporary"  # may work later: the caller keeps the message and retries
    PERMANENT = "permanent"  # the message itself can never be accepted


class Reason(enum.Enum):
    """Rows of the table: (enhanced status code, kind, retry within this run?, check exit code)."""

    DELIVERED = ("2.0.0", Kind.DELIVERED, False, 0)
    INVALID_MESSAGE = ("5.6.0", Kind.PERMANENT, False, 65)
    TOO_BIG = ("5.3.4", Kind.PERMANENT, False, 65)
    CONFIG = ("4.3.5", Kind.TEMPORARY, False, 78)
    NOT_FOUND = ("4.3.5", Kind.TEMPORARY, False, 78)
    REDIRECT = ("4.3.5", Kind.TEMPORARY, False, 78)
    WRONG_MEDIA_TYPE = ("4.3.5", Kind.TEMPORARY, False, 78)
    NOT_ACTION_MAILBOX = ("4.3.5", Kind.TEMPORARY, False, 78)
    AUTH = ("4.7.0", Kind.TEMPORARY, False, 77)
    FORBIDDEN = ("4.7.1", Kind.TEMPORARY, False, 77)
    INGRESS_LIMIT = ("4.3.4", Kind.TEMPORARY, False, 69)
    CLIENT_ERROR = ("4.3.0", Kind.TEMPORARY, False, 69)
    BUSY = ("4.4.5", Kind.TEMPORARY, True, 69)
    SERVER_ERROR = ("4.3.0", Kind.TEMPORARY, True, 69)
    UNREACHABLE = ("4.4.1", Kind.TEMPORARY, True, 69)
    NETWORK = ("4.4.2", Kind.TEMPORARY, True, 69)
    TIMEOUT = ("4.4.2", Kind.TEMPORARY, True, 69)
    TLS = ("4.7.5", Kind.TEMPORARY, False, 69)
    INTERRUPTED = ("4.3.0", Kind.TEMPORARY, False, 75)
    INTERNAL = ("4.3.0", Kind.TEMPORARY, False, 70)

    def __init__(self, code: str, kind: Kind, retry: bool, check_code: int) -> None:
        self.code = code
        self.kind = kind
        self.retry = retry
        self.check_code = check_code


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

SYSEXITS = {Kind.DELIVERED: 0, Kind.PERMANENT: 65, Kind.TEMPORARY: 75}  # EX_DATAERR, EX_TEMPFAIL
QMAIL = {Kind.DELIVERED: 0, Kind.PERMANENT: 100, Kind.TEMPORARY: 111}
EXIT_STYLES = {"sysexits": SYSEXITS, "qmail": QMAIL}


def exit_code(outcome: Outcome, style: str = "sysexits") -> int:
    return EXIT_STYLES.get(style, SYSEXITS)[outcome.kind]


class RelayError(Exception):
    """Raised by the core for anything that ends a delivery; carries its outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.line())
        self.outcome = outcome


class ConfigError(RelayError):
    def __init__(self, detail: str) -> None:
        super().__init__(Outcome(Reason.CONFIG, detail))


class InvalidMessage(RelayError):
    def __init__(self, detail: str, reason: Reason = Reason.INVALID_MESSAGE) -> None:
        super().__init__(Outcome(reason, detail))


def wrong_ingress_path(url: str) -> bool:
    path = urlsplit(url).path
    return any(segment in path for segment in _WRONG_INGRESS_SEGMENTS)


def _not_found_detail(url: str) -> str:
    if wrong_ingress_path(url):
        fixed = url.split("/rails/action_mailbox/")[0] + RELAY_PATH
        return (
            f"no relay ingress at {url} (HTTP 404): Rails only routes {RELAY_PATH}; "
            f"use {fixed} (the app must set config.action_mailbox.ingress = :relay)"
        )
    return (
        f"no relay ingress at {url} (HTTP 404): check the URL ends in {RELAY_PATH} and the app "
        "sets config.action_mailbox.ingress = :relay"
    )


def classify_response(
    status: int,
    *,
    url: str,
    location: Optional[str] = None,
    size: Optional[int] = None,
    password_source: str = "the configured password",
    retry_after: Optional[float] = None,
) -> Outcome:
    """Map an HTTP status from the ingress to its outcome and a line that says what to do."""
    if 200 <= status < 300:
        return DELIVERED
    if 300 <= status < 400:
        where = location or "(no Location header)"
        return Outcome(
            Reason.REDIRECT,
            f"ingress redirected to {where} (HTTP {status}): set the URL to the final address; "
            "mailbox-relay never follows redirects",
        )
    if status == 401:
        return Outcome(
            Reason.AUTH,
            f"ingress rejected the password for user actionmailbox (HTTP 401): make {password_source} "
            "match the app's RAILS_INBOUND_EMAIL_PASSWORD or action_mailbox.ingress_password",
        )
    if status == 403:
        return Outcome(
            Reason.FORBIDDEN,
            f"ingress refused access (HTTP 403): something in front of the app (proxy, firewall, "
            f"allow-list) blocks this client at {url}",
        )
    if status == 404:
        return Outcome(Reason.NOT_FOUND, _not_found_detail(url))
    if status == 413:
        of = f" of {size} bytes" if size is not None else ""
        return Outcome(
            Reason.INGRESS_LIMIT,
            f"message{of} is larger than the ingress accepts (HTTP 413): raise the proxy's body "
            "limit (nginx client_max_body_size, 1m by default)",
        )
    if status == 415:
        return Outcome(
            Reason.WRONG_MEDIA_TYPE,
            "ingress refused Content-Type message/rfc822 (HTTP 415): a proxy rewrites the "
            "Content-Type, or the URL is not an Action Mailbox relay ingress",
        )
    if status in (408, 429):
        what = "timed out reading the request" if status == 408 else "is rate limiting this client"
        return Outcome(
            Reason.BUSY,
            f"ingress {what} (HTTP {status}): it will be retried; lower the sending rate if it persists",
            retry_after,
        )
    if status >= 500:
        return Outcome(
            Reason.SERVER_ERROR,
            f"ingress failed with HTTP {status}: see the app's log (database, Active Storage, job "
            "queue, or no ingress password set on the server)",
            retry_after,
        )
    return Outcome(
        Reason.CLIENT_ERROR,
        f"ingress answered HTTP {status}, which Action Mailbox never sends: check the URL points at "
        f"the relay ingress ({url})",
    )


def check_exit_code(outcome: Outcome) -> int:
    """Exit codes of `check`, for people and monitoring: 0 ready, 77 password, 78 config, 69 down."""
    return outcome.reason.check_code
