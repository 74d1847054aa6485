"""The IMAP side of `fetch`, `watch` and `check --account`, on IMAPClient (imported here only).

`connect` opens and logs in, turning every way that can fail into an `ImapProblem` with one
line that says what to do. `ImapFolder` is the only code that talks IMAP for a sync: it reads
with `BODY.PEEK[]` (the exact bytes, no \\Seen), and changes a message only when told to after
the ingress said 2xx.
"""

from __future__ import annotations

import contextlib
import datetime
import imaplib
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from mailbox_relay.accounts import Account, After
from mailbox_relay.outcome import ConfigError

# IMAPClient logs warnings through `logging`, which would reach stderr on its own.
logging.getLogger("imapclient").addHandler(logging.NullHandler())
logging.getLogger("imapclient").propagate = False

PIECE = 4 * 1024 * 1024  # larger messages are fetched in pieces of this size
KEEPALIVE = (60, 15, 4)  # idle seconds, interval, probes: a peer gone silent is noticed in ~2 min


class ImapProblem(Exception):
    """Why an IMAP connection or command failed. `login` problems need a person; others pass."""

    def __init__(self, kind: str, line: str) -> None:
        super().__init__(line)
        self.kind = kind  # dns | connect | tls | login | grant | folder | after | protocol | network
        self.line = line


@dataclass(frozen=True)
class FolderInfo:
    uidvalidity: int
    uidnext: int
    exists: int


def _client_class() -> Any:
    from imapclient import IMAPClient

    return IMAPClient


def tls_context(account: Account) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=account.ca_bundle)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"ca_bundle of account {account.name} cannot be used: {error}") from None


def open_connection(account: Account) -> Any:
    """Connected (and TLS-protected, unless tls = none to loopback), not yet logged in."""
    where = f"{account.host}:{account.port}"
    try:
        client = _client_class()(
            account.host,
            account.port,
            ssl=account.tls == "implicit",
            ssl_context=tls_context(account) if account.tls != "none" else None,
            timeout=account.timeout,
        )
        if account.tls == "starttls":
            client.starttls(tls_context(account))
    except socket.gaierror as error:
        raise ImapProblem("dns", f"cannot resolve {account.host}: {error.strerror}") from None
    except ssl.SSLError as error:
        raise ImapProblem(
            "tls", f"TLS with {where} failed: {_ssl_reason(error)}{_tls_hint(account, error)}"
        ) from None
    except (OSError, EOFError) as error:
        raise ImapProblem("connect", f"cannot connect to {where}: {describe(error)}") from None
    except imaplib.IMAP4.abort as error:  # the server hung up before we could log in
        raise ImapProblem(
            "connect", f"{where} closed the connection before login: {describe(error)}"
        ) from None
    except Exception as error:  # IMAPClient's own errors: no IMAP greeting, STARTTLS refused
        raise ImapProblem("protocol", f"{where} does not speak IMAP as expected: {error}") from None
    _keepalive(client.socket())
    return client


def _ssl_reason(error: ssl.SSLError) -> str:
    return getattr(error, "verify_message", None) or error.reason or str(error)


def _tls_hint(account: Account, error: ssl.SSLError) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return f"; a private CA goes in ca_bundle of account {account.name}"
    if account.tls == "implicit":
        return f' (is port {account.port} implicit TLS? for STARTTLS set tls = "starttls")'
    return ""


def _keepalive(sock: socket.socket) -> None:
    """A connection that died without FIN or RST (NAT timeout, a host gone) raises in ~2 min."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    idle, interval, count = KEEPALIVE
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval), ("TCP_KEEPCNT", count)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)


def login(client: Any, account: Account) -> None:
    if account.oauth2 is not None:
        _xoauth2_login(client, account)
        return
    from imapclient.exceptions import IMAPClientAbortError, IMAPClientError, LoginError

    password = account.password()
    try:
        if password.isascii() and account.username.isascii():
            client.login(account.username, password)
        else:  # LOGIN's quoted strings are ASCII; AUTHENTICATE PLAIN carries UTF-8 (RFC 4616)
            client.plain_login(account.username, password)
    except LoginError as error:
        if isinstance(error.__context__, (imaplib.IMAP4.abort, OSError)):  # IMAPClient wraps those
            raise _lost_at_login(account, error) from None
        raise ImapProblem(
            "login",
            f"IMAP login of {account.username} at {account.host} was rejected ({describe(error)}): "
            f"check the password of account {account.name}",
        ) from None
    except (OSError, EOFError, IMAPClientAbortError) as error:
        raise _lost_at_login(account, error) from None
    except IMAPClientError as error:  # e.g. AUTHENTICATE PLAIN not offered
        raise ImapProblem("protocol", f"{account.host} refused the login: {describe(error)}") from None


def _lost_at_login(account: Account, error: BaseException) -> ImapProblem:
    return ImapProblem("network", f"connection to {account.host} lost at login: {describe(error)}")


def _xoauth2_login(client: Any, account: Account) -> None:
    """AUTHENTICATE XOAUTH2 with a fresh token; if refused, one new token and one more try (the
    token in hand may have been revoked, or expired early). Tokens never reach a message."""
    from mailbox_relay.oauth2 import token_source

    if not client.has_capability("AUTH=XOAUTH2"):
        raise ImapProblem(
            "login",
            f"{account.host} does not offer AUTHENTICATE XOAUTH2: "
            f"check host and auth of account {account.name}",
        )
    source = token_source(account)
    token = _token(source.current)
    if not _xoauth2(client, account, token.access):
        refused = token
        token = _token(lambda: source.renew(refused))
        if not _xoauth2(client, account, token.access):
            raise ImapProblem(
                "login",
                f"AUTHENTICATE XOAUTH2 of {account.username} at {account.host} was refused even with a new "
                f"token: username of account {account.name} must be the mailbox the grant is for "
                f"(else run `mailbox-relay auth {account.name}` again)",
            )
    client.mailbox_relay_replace_at = token.replace_session_at()


def _token(obtain: Callable[[], Any]) -> Any:
    """A Token, or the TokenProblem as an ImapProblem of the kind the callers act on."""
    from mailbox_relay.oauth2 import TokenProblem

    try:
        return obtain()
    except TokenProblem as problem:
        kind = {"grant": "grant", "client": "login"}.get(problem.kind, "network")
        raise ImapProblem(kind, problem.line) from None


def _xoauth2(client: Any, account: Account, access: str) -> bool:
    """True when the server took the token; False when it refused it."""
    from imapclient.exceptions import LoginError

    try:
        client.sasl_login("XOAUTH2", _Xoauth2(account.username, access))
    except LoginError as error:
        if isinstance(error.__context__, (imaplib.IMAP4.abort, OSError)):
            raise _lost_at_login(account, error) from None
        return False
    except (OSError, EOFError) as error:
        raise _lost_at_login(account, error) from None
    return True


class _Xoauth2:
    """The SASL XOAUTH2 exchange: the token first; to the server's error challenge (a JSON
    status) an empty answer, as Google and Microsoft require, after which it says NO."""

    def __init__(self, username: str, access: str) -> None:
        self.initial: Optional[bytes] = f"user={username}\x01auth=Bearer {access}\x01\x01".encode()

    def __call__(self, challenge: bytes) -> bytes:
        response, self.initial = self.initial or b"", None
        return response

    def __repr__(self) -> str:  # never the token, should anything print this object
        return "<XOAUTH2>"


def session_replace_at(client: Any) -> Optional[float]:
    """When (epoch seconds) this connection's OAuth2 token runs out and it should be replaced
    by a new connection; None for a password login, which does not run out."""
    value = getattr(client, "mailbox_relay_replace_at", None)
    return float(value) if value is not None else None


def connect(account: Account) -> Any:
    client = open_connection(account)
    try:
        login(client, account)
    except BaseException:
        close(client)
        raise
    return client


def close(client: Any) -> None:
    """LOGOUT if the connection still works; never raises."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()


def describe(error: BaseException) -> str:
    """One error as words: "timed out", the OS's reason, or the server's text (without b'')."""
    if isinstance(error, socket.timeout):
        return "timed out"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    return text[2:-1] if text.startswith("b'") else text


def capabilities(client: Any) -> List[str]:
    return sorted(c.decode("ascii", "replace") for c in client.capabilities())


class ImapFolder:
    """One selected folder of one connection: what the sync needs, nothing more."""

    def __init__(self, client: Any, account: Account) -> None:
        self.client = client
        self.account = account
        self.name = ""
        self._target_checked = False

    def select(self, name: str) -> FolderInfo:
        """SELECT (EXAMINE when nothing will be changed, so even flags stay as they are)."""
        from imapclient.exceptions import IMAPClientError

        try:
            info = self.client.select_folder(name, readonly=self.account.after.action == "keep")
        except IMAPClientError as error:
            raise ImapProblem(
                "folder",
                f"folder {name!r} of account {self.account.name} cannot be opened: {describe(error)}",
            ) from None
        self.name = name
        self._check_move_target()
        uidnext = int(info.get(b"UIDNEXT", 0))
        if not uidnext:  # an old server: the highest UID + 1
            uidnext = max(self.client.search(["ALL"]) or [0]) + 1
        return FolderInfo(int(info[b"UIDVALIDITY"]), uidnext, int(info.get(b"EXISTS", 0)))

    def _check_move_target(self) -> None:
        """Before anything is posted: a message the ingress took must be movable afterwards."""
        after = self.account.after
        if after.action == "move" and not self._target_checked:
            if not self.client.folder_exists(after.folder):
                raise ImapProblem(
                    "folder",
                    f"after = move:{after.folder} of account {self.account.name}, but there is no folder "
                    f"{after.folder!r}: create it, or change after",
                )
            self._target_checked = True

    def search(self, after_uid: int, since: Optional[datetime.date]) -> List[int]:
        """UIDs above `after_uid` (and on or after `since`), ascending. `N:*` always matches the
        highest UID even below N, so that one is filtered out here."""
        criteria: List[Any] = ["UID", f"{after_uid + 1}:*"]
        if since is not None:
            criteria += ["SINCE", since]
        return sorted(uid for uid in self.client.search(criteria) if uid > after_uid)

    def sizes(self, uids: Sequence[int]) -> Dict[int, int]:
        if not uids:
            return {}
        found = self.client.fetch(list(uids), ["RFC822.SIZE"])
        return {uid: int(data[b"RFC822.SIZE"]) for uid, data in found.items() if b"RFC822.SIZE" in data}

    def fetch(self, uids: Sequence[int], sizes: Mapping[int, int]) -> Dict[int, bytes]:
        """The exact bytes (BODY.PEEK[]: nothing is marked \\Seen). A UID expunged meanwhile is
        simply absent. A large message comes in pieces, so memory stays near its size."""
        small = [uid for uid in uids if sizes.get(uid, 0) <= PIECE]
        found = self.client.fetch(small, ["BODY.PEEK[]"]) if small else {}
        bodies = {uid: data[b"BODY[]"] for uid, data in found.items() if data.get(b"BODY[]") is not None}
        for uid in uids:
            if sizes.get(uid, 0) > PIECE:
                whole = self._in_pieces(uid)
                if whole is not None:
                    bodies[uid] = whole
        return bodies

    def _in_pieces(self, uid: int) -> Optional[bytes]:
        """BODY.PEEK[]<offset.length> into one buffer: parsing a 50 MB literal in one response
        costs several times its size. A piece shorter than asked for is the last one."""
        whole = bytearray()
        while True:
            offset = len(whole)
            found = self.client.fetch([uid], [f"BODY.PEEK[]<{offset}.{PIECE}>"]).get(uid, {})
            piece = found.get(f"BODY[]<{offset}>".encode())
            if piece is None:
                return None  # expunged meanwhile: never half a message
            whole += piece
            if len(piece) < PIECE:
                return whole  # type: ignore[return-value]  # a bytearray: no copy of 50 MB

    def acknowledge(self, uids: Iterable[int], after: After) -> None:
        """What `after` says, for messages the ingress accepted. With UIDPLUS only our messages
        are expunged (plain EXPUNGE would remove other clients' \\Deleted mail too)."""
        uids = list(uids)
        if not uids or after.action == "keep":
            return
        from imapclient.exceptions import IMAPClientAbortError, IMAPClientError

        try:
            self._apply(uids, after)
        except IMAPClientAbortError:
            raise  # the connection broke: the caller reconnects
        except IMAPClientError as error:  # refused: say so; the next pass posts again (Rails dedups)
            raise ImapProblem(
                "after",
                f"the ingress took UIDs {uids[0]}..{uids[-1]} of {self.account.name}/{self.name}, but "
                f"after = {after} failed: {describe(error)}",
            ) from None

    def _apply(self, uids: List[int], after: After) -> None:
        if after.action == "seen":
            self.client.add_flags(uids, [b"\\Seen"], silent=True)
        elif after.action == "move" and self.client.has_capability("MOVE"):
            self.client.move(uids, after.folder)
        else:
            if after.action == "move":
                self.client.copy(uids, after.folder)
            self.client.add_flags(uids, [b"\\Deleted"], silent=True)
            self._expunge(uids)

    def _expunge(self, uids: List[int]) -> None:
        if self.client.has_capability("UIDPLUS"):
            self.client.uid_expunge(uids)
        # Without UIDPLUS the messages stay flagged \Deleted: a plain EXPUNGE could remove mail
        # another client flagged but still wanted (it is the server's or the user's to purge).
