"""The POP3 source of `fetch`, `watch` and `check --account`, on the standard library's poplib
(imported here only, and this module only when a POP3 account is read: never on deliver's path).

POP3 has one maildrop, no flags and no cursor: keys are UIDLs (or, where the server has none or
repeats them, a digest of each message's headers, as getmail's BrokenUIDL retriever does), the
epoch is "", and every delivered key is recorded (`Listing.remember`) and pruned to what the
server still lists (`Listing.present`). DELE takes effect only at a clean QUIT, so a connection
lost before it deletes nothing: the next pass finds those messages recorded as delivered and
still there, and deletes them without posting them again (`Listing.linger`, fetch/rules.py).

Every command is bounded as a whole by the account's `timeout` (a server that trickles its
answer is cut off); RETR gets a second more per MIN_RATE bytes of the message's LIST size.
Multi-line answers are read here rather than by poplib, which drops the line ends it reads
(a bare LF and a CRLF come out alike) and refuses lines over 2048 bytes: the bytes posted are
the server's, with only the dot-stuffing undone.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import hashlib
import poplib
import re
import socket
import ssl
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, TypeVar

from mailbox_relay.accounts import POP3_FOLDER, Account, After
from mailbox_relay.outcome import ConfigError
from mailbox_relay.sources.imap import (
    MIN_RATE,
    _bounded,
    _keepalive,
    _open_socket,
    _ssl_reason,
    tls_context,
)
from mailbox_relay.sources.mailbox import Key, Listing, Opened, SourceProblem, describe

T = TypeVar("T")
CHUNK = 64 * 1024  # bytes per read of a multi-line answer: a long line comes in several
HEADER_KEY = "headers:"  # keys of the fallback (no usable UIDL): a digest of TOP n 0
# RFC 2449 and 3206 response codes that say "not now" rather than "no".
TEMPORARY_CODES = ("IN-USE", "LOGIN-DELAY", "SYS/TEMP")
_UIDL = re.compile(rb"[\x21-\x7e]{1,70}")  # RFC 1939: 1 to 70 printable characters


class Pop3Problem(SourceProblem):
    """Why a POP3 connection or command failed. Kinds: dns | connect | tls | login | unavailable
    | grant | folder | after | protocol | network (lost or too slow: reconnect)."""


# --- the connection ---------------------------------------------------------------------------


class _Client(poplib.POP3):
    """poplib's POP3 over our socket: registered with the deadline from its birth, implicit TLS
    when asked (POP3_SSL would open its own socket)."""

    def __init__(self, host: str, port: int, timeout: float, context: Optional[ssl.SSLContext]) -> None:
        self._connect_timeout = timeout
        self._context = context
        super().__init__(host, port, timeout)

    # poplib's own line I/O, typed (typeshed leaves its private methods out).
    def send(self, line: str) -> None:
        self._putcmd(line)  # type: ignore[attr-defined]

    def answer(self) -> bytes:
        """The status line; -ERR raises error_proto."""
        return self._getresp()  # type: ignore[attr-defined,no-any-return]

    def line(self) -> bytes:
        return self._getline()[0]  # type: ignore[attr-defined,no-any-return]

    def _create_socket(self, timeout: Any) -> socket.socket:
        sock = _open_socket(self.host, self.port, self._connect_timeout)
        if self._context is not None:
            return self._context.wrap_socket(sock, server_hostname=self.host)
        return sock


def _said(error: BaseException) -> str:
    """A -ERR answer's words, without the -ERR."""
    text = error.args[0] if error.args else str(error)
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return re.sub(r"^-ERR\s*", "", str(text)).strip() or "no reason given"


def _is_lost(error: BaseException) -> bool:
    """The connection broke, as opposed to the server answering -ERR."""
    if isinstance(error, (OSError, EOFError)):
        return True
    return isinstance(error, poplib.error_proto) and _said(error) == "EOF"


def response_code(said: str) -> Optional[str]:
    found = re.match(r"\s*\[([A-Za-z/-]+)\]", said)
    return found.group(1).upper() if found else None


class Session:
    """A poplib client whose every command is bounded as a whole by the account's `timeout`, and
    whose lost connection is a Pop3Problem("network") naming the command; once lost, every
    later command raises that same problem at once. A -ERR stays poplib's error_proto."""

    def __init__(self, client: _Client, account: Account) -> None:
        self.client = client
        self.account = account
        self.lost: Optional[SourceProblem] = None
        self.uidl_problem: Optional[str] = None  # why keys are header digests, for check

    def run(self, command: str, call: Callable[[], T], extra: float = 0.0) -> T:
        if self.lost is not None:
            raise Pop3Problem(self.lost.kind, self.lost.line)
        from mailbox_relay import deadline

        try:
            with _bounded(self.account, command, self.account.timeout + extra):
                deadline.watch(self.client.sock)
                return call()
        except SourceProblem as problem:  # cut off by the deadline
            self.lost = problem
            raise
        except (OSError, EOFError, poplib.error_proto) as error:
            if not _is_lost(error):
                raise
            why = (
                "the server closed the connection"
                if isinstance(error, poplib.error_proto)
                else describe(error)
            )
            self.lost = Pop3Problem(
                "network", f"connection to {self.account.host} lost during {command}: {why}"
            )
            raise self.lost from None

    def short(self, line: str) -> str:
        """A one-line command; its +OK answer."""
        command = line.split(" ")[0]

        def call() -> bytes:
            self.client.send(line)
            return self.client.answer()

        return self.run(command, call).decode("utf-8", "replace")

    def multiline(self, line: str, extra: float = 0.0) -> bytes:
        """A multi-line command (RETR, TOP, UIDL, LIST): the answer's bytes as the server sent
        them, dot-stuffing undone, line ends kept."""
        command = line.split(" ")[0]

        def call() -> bytes:
            self.client.send(line)
            self.client.answer()
            return read_multiline(self.client.file)

        return self.run(command, call, extra)


def read_multiline(stream: Any) -> bytes:
    """Up to the lone "." line: every byte as received, but the one dot stuffed in front of a
    line that began with a dot (RFC 1939, 3). A line longer than CHUNK comes in pieces; only
    a piece that starts a line can be the end or be stuffed."""
    whole = bytearray()
    at_start = True
    while True:
        piece: bytes = stream.readline(CHUNK)
        if not piece:
            raise EOFError("the server closed the connection in the middle of an answer")
        if at_start:
            if piece in (b".\r\n", b".\n"):
                return bytes(whole)
            if piece.startswith(b"."):
                piece = piece[1:]
        whole += piece
        at_start = piece.endswith(b"\n")


def open_session(account: Account) -> Session:
    """Connected (and TLS-protected, unless tls = none to loopback), greeted, not logged in."""
    where = f"{account.host}:{account.port}"
    implicit = tls_context(account) if account.tls == "implicit" else None
    try:
        with _bounded(account, "the greeting"):
            client = _Client(account.host, account.port, account.timeout, implicit)
        session = Session(client, account)
        if account.tls == "starttls":
            _stls(session, account)
    except (SourceProblem, ConfigError):
        raise
    except socket.gaierror as error:
        raise Pop3Problem("dns", f"cannot resolve {account.host}: {error.strerror}") from None
    except ssl.SSLError as error:
        hint = (
            f"; a private CA goes in ca_bundle of account {account.name}"
            if isinstance(error, ssl.SSLCertVerificationError)
            else (
                f' (is port {account.port} implicit TLS? for STLS set tls = "starttls")' if implicit else ""
            )
        )
        raise Pop3Problem("tls", f"TLS with {where} failed: {_ssl_reason(error)}{hint}") from None
    except (OSError, EOFError) as error:
        raise Pop3Problem("connect", f"cannot connect to {where}: {describe(error)}") from None
    except poplib.error_proto as error:  # no +OK greeting
        raise Pop3Problem("protocol", f"{where} does not speak POP3 as expected: {_said(error)}") from None
    _keepalive(client.sock)
    return session


def _stls(session: Session, account: Account) -> None:
    context = tls_context(account)
    try:
        session.run("STLS", lambda: session.client.stls(context))
    except poplib.error_proto as error:
        raise Pop3Problem(
            "tls",
            f'{account.host} refused STLS ({_said(error)}): use tls = "implicit" (port 995) '
            f"in account {account.name}, or ask the provider",
        ) from None


# --- login ------------------------------------------------------------------------------------


def login(session: Session, account: Account) -> None:
    if account.oauth2 is not None:
        _xoauth2_login(session, account)
        return
    password = account.password()
    try:
        session.short(f"USER {account.username}")
        session.short(f"PASS {password}")
    except poplib.error_proto as error:
        said = _said(error)
        _temporary(account, said)
        raise Pop3Problem(
            "login",
            f"POP3 login of {account.username} at {account.host} was rejected ({said}): "
            f"check the password of account {account.name}",
        ) from None


def _temporary(account: Account, said: str) -> None:
    """Raise for a refusal that is no verdict on the credentials."""
    if response_code(said) in TEMPORARY_CODES:
        raise Pop3Problem(
            "unavailable", f"{account.host} refused the login for now ({said}); trying again later"
        )
    if "plaintext" in said.lower() or "ssl" in said.lower() or "tls" in said.lower():
        raise Pop3Problem(
            "tls",
            f"{account.host} requires TLS before login ({said}): "
            f'set tls = "starttls" (or "implicit") in account {account.name}',
        )


def _xoauth2_login(session: Session, account: Account) -> None:
    """AUTH XOAUTH2 with a fresh token; if refused, one new token and one more try."""
    from mailbox_relay.sources.oauth2 import TokenProblem, token_source

    def token(obtain: Callable[[], Any]) -> Any:
        try:
            return obtain()
        except TokenProblem as problem:
            kind = {"grant": "grant", "client": "login"}.get(problem.kind, "network")
            raise Pop3Problem(kind, problem.line) from None

    source = token_source(account)
    first = token(source.current)
    said = session.run("AUTH", lambda: _xoauth2(session.client, account.username, first.access))
    if said is None:
        return
    _temporary(account, said)
    second = token(lambda: source.renew(first))
    said = session.run("AUTH", lambda: _xoauth2(session.client, account.username, second.access))
    if said is not None:
        _temporary(account, said)
        raise Pop3Problem(
            "login",
            f"AUTH XOAUTH2 of {account.username} at {account.host} was refused even with a new token "
            f"({said}): username of account {account.name} must be the mailbox the grant is for "
            f"(else run `mailbox-relay auth {account.name}` again)",
        )


def _xoauth2(client: _Client, username: str, access: str) -> Optional[str]:
    """None when the server took the token; its words when it refused it. To the error
    challenge (a JSON status after "+ ") an empty line, as Google and Microsoft require."""
    client.send("AUTH XOAUTH2")
    answer = client.line()
    if answer.startswith(b"+") and not answer.startswith(b"+OK"):
        client.send(base64.b64encode(f"user={username}\x01auth=Bearer {access}\x01\x01".encode()).decode())
        answer = client.line()
    if answer.startswith(b"+") and not answer.startswith(b"+OK"):
        client.send("")
        answer = client.line()
    if answer.startswith(b"+OK"):
        return None
    return _said(poplib.error_proto(answer))


def connect(account: Account) -> Session:
    session = open_session(account)
    try:
        login(session, account)
    except BaseException:
        close(session)
        raise
    return session


def close(session: Optional[Session]) -> None:
    """QUIT (bounded), which applies the DELEs, if the connection still works; never raises."""
    if session is None:
        return
    with contextlib.suppress(Exception):
        session.short("QUIT")
    with contextlib.suppress(Exception):
        session.client.close()


# --- the maildrop -----------------------------------------------------------------------------


def _numbered(answer: bytes) -> List[Tuple[int, bytes]]:
    """ "n value" lines (UIDL, LIST) as (n, value)."""
    found = []
    for line in answer.splitlines():
        number, _, value = line.strip().partition(b" ")
        if number.isdigit():
            found.append((int(number), value.strip()))
    return found


def uidl_trouble(pairs: Sequence[Tuple[int, bytes]], count: int) -> Optional[str]:
    """Why these UIDLs cannot be keys, or None: every message needs one, unique and well formed."""
    uidls = [uidl for _, uidl in pairs]
    if len(uidls) != count:
        return f"the server gave UIDLs for {len(uidls)} of {count} messages"
    if len(set(uidls)) != len(uidls):
        return "the server gives two messages the same UIDL"
    bad = next((uidl for uidl in uidls if not _UIDL.fullmatch(uidl)), None)
    if bad is not None:
        return f"the server gives a malformed UIDL ({bad[:80]!r})"
    return None


def header_keys(headers: Sequence[bytes]) -> List[Key]:
    """Keys from each message's header bytes, in order: a digest, numbered when two messages
    have the same headers (the second copy is "#2")."""
    seen: Dict[str, int] = {}
    keys = []
    for raw in headers:
        digest = hashlib.sha256(raw).hexdigest()[:40]
        seen[digest] = seen.get(digest, 0) + 1
        keys.append(f"{HEADER_KEY}{digest}" + (f"#{seen[digest]}" if seen[digest] > 1 else ""))
    return keys


class Pop3Source:
    """One account over POP3 sessions, as fetch and watch see every source (sources/mailbox.py).
    watch ends its session at each wait and opens a new one when the wait is over: a POP3
    server shows mail that arrived during a session only to a new one (Dovecot, RFC 1939's
    snapshot), many lock the maildrop while a session is open, and the DELEs of the last pass
    take effect at that QUIT rather than an interval later."""

    key_label = "UIDL"

    def __init__(self, session: Session, account: Account) -> None:
        self.session: Optional[Session] = session
        self.account = account
        self.numbers: Dict[Key, int] = {}  # key -> message number in this session
        self.octets: Dict[Key, int] = {}  # key -> LIST size
        self.deleted: Set[Key] = set()

    def _session(self) -> Session:
        if self.session is None:  # after a wait, or a close
            self.session = connect(self.account)
            self.numbers, self.octets, self.deleted = {}, {}, set()
        return self.session

    @contextlib.contextmanager
    def _refused(self, command: str) -> Iterator[None]:
        try:
            yield
        except poplib.error_proto as error:
            said = _said(error)
            kind = "unavailable" if response_code(said) in TEMPORARY_CODES else "folder"
            raise Pop3Problem(
                kind,
                f"{self.account.name}: the POP3 server refused {command} ({said}); "
                "if it goes on, check the mailbox with the mail provider",
            ) from None

    # --- a pass --------------------------------------------------------------------------------

    def open(self, name: str) -> Opened:
        if name != POP3_FOLDER:
            raise Pop3Problem(
                "folder", f"account {self.account.name} is POP3: its one folder is {POP3_FOLDER}"
            )
        session = self._session()
        with self._refused("STAT"):
            stat = session.short("STAT")
        parts = stat.split()
        count = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        return Opened("", count, None)

    def listing(
        self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
    ) -> Listing:
        """Every message of the maildrop, in order; the rules take the ones not recorded."""
        session = self._session()
        with self._refused("LIST"):
            sizes = _numbered(session.multiline("LIST"))
        numbers = [number for number, _ in sizes]
        keys = self._keys(session, numbers)
        self.numbers = dict(zip(keys, numbers))
        self.octets = {key: int(size) for key, (_, size) in zip(keys, sizes) if size.isdigit()}
        after, delete_after = self.account.after.action, self.account.delete_after
        linger = 0.0 if after == "delete" else delete_after
        return Listing(list(keys), remember=True, present=frozenset(keys), linger=linger)

    def _keys(self, session: Session, numbers: List[int]) -> List[Key]:
        try:
            pairs = _numbered(session.multiline("UIDL"))
            session.uidl_problem = uidl_trouble(pairs, len(numbers))
        except poplib.error_proto as error:
            session.uidl_problem = f"the server has no UIDL ({_said(error)})"
        if session.uidl_problem is None:
            by_number = dict(pairs)
            if all(number in by_number for number in numbers):
                return [by_number[number].decode("ascii") for number in numbers]
            session.uidl_problem = "the server's UIDLs do not match its LIST"
        headers = []
        for number in numbers:
            with self._refused("TOP"):
                headers.append(session.multiline(f"TOP {number} 0"))
        return header_keys(headers)

    def sizes(self, keys: Sequence[Key]) -> Dict[Key, int]:
        return {key: self.octets[key] for key in keys if key in self.octets and key not in self.deleted}

    def fetch(self, keys: Sequence[Key], sizes: Mapping[Key, int]) -> Dict[Key, bytes]:
        """RETR each: the exact bytes. A message no longer there is absent from the answer."""
        session = self._session()
        bodies = {}
        for key in keys:
            number = self.numbers.get(key)
            if number is None or key in self.deleted:
                continue
            try:
                bodies[key] = session.multiline(f"RETR {number}", sizes.get(key, 0) / MIN_RATE)
            except poplib.error_proto as error:  # deleted by another session meanwhile: absent
                if response_code(_said(error)) in TEMPORARY_CODES:
                    raise Pop3Problem(
                        "unavailable", f"{self.account.name}: RETR refused for now ({_said(error)})"
                    ) from None
        return bodies

    def acknowledge(self, keys: Sequence[Key], after: After) -> None:
        """DELE for after = delete; they take effect at the clean QUIT of close() or wait()."""
        if after.action != "delete":
            return
        session = self._session()
        for key in keys:
            number = self.numbers.get(key)
            if number is None or key in self.deleted:
                continue
            try:
                session.short(f"DELE {number}")
            except poplib.error_proto as error:
                raise Pop3Problem(
                    "after",
                    f"the ingress took UIDL {key} of {self.account.name}, but DELE failed: {_said(error)}",
                ) from None
            self.deleted.add(key)

    # --- watch ---------------------------------------------------------------------------------

    @property
    def waiting(self) -> str:
        return f"polling every {self.account.poll_interval:g}s, a new POP3 session each time"

    def start_waiting(self) -> Optional[socket.socket]:
        """QUIT now (the DELEs take effect, the maildrop is free for other readers); POP3 has
        no push, so watch polls: it calls stop_waiting every `poll_interval` seconds."""
        self.close()
        return None

    def readable(self) -> bool:
        return False  # never called: there is no socket to watch while waiting

    def stop_waiting(self) -> None:
        """Log in again: the round trip that proves the server there; the new session sees
        what arrived meanwhile (a POP3 server shows it only to a new session)."""
        self._session()

    @property
    def refresh_every(self) -> float:
        return float(self.account.poll_interval)

    def replace_at(self) -> Optional[float]:
        return None  # a new session, with a token current then, at every poll

    def close(self) -> None:
        session, self.session = self.session, None
        close(session)


def connect_source(account: Account) -> Pop3Source:
    """The account's POP3 source, logged in (see sources/mailbox.py)."""
    return Pop3Source(connect(account), account)


def capabilities(session: Session) -> List[str]:
    """CAPA's lines ([] where the server has no CAPA)."""
    try:
        answer = session.multiline("CAPA")
    except poplib.error_proto:
        return []
    return [line.decode("ascii", "replace").strip() for line in answer.splitlines() if line.strip()]
