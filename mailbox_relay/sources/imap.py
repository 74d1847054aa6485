"""The IMAP source of `fetch`, `watch` and `check --account`, on IMAPClient (imported here only).

`connect` opens and logs in, turning every way that can fail into an `ImapProblem` with one
line that says what to do; every command is bounded as a whole by the account's `timeout`
(`Connection`). `ImapSource` is the mailbox protocol of sources/mailbox.py for IMAP: it reads
with `BODY.PEEK[]` (the exact bytes, no \\Seen), and changes a message only when told to after
the ingress said 2xx.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import imaplib
import logging
import re
import socket
import ssl
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

from mailbox_relay.accounts import Account, After
from mailbox_relay.outcome import ConfigError
from mailbox_relay.sources.mailbox import Key, Listing, Opened, SourceProblem

# IMAPClient logs warnings through `logging`, which would reach stderr on its own.
logging.getLogger("imapclient").addHandler(logging.NullHandler())
logging.getLogger("imapclient").propagate = False

PIECE = 4 * 1024 * 1024  # larger messages are fetched in pieces of this size
MIN_RATE = 64 * 1024  # bytes a second a body fetch must keep up, beyond `timeout` (see Connection.reading)
KEEPALIVE = (60, 15, 4)  # idle seconds, interval, probes: a peer gone silent is noticed in ~2 min


class ImapProblem(SourceProblem):
    """Why an IMAP connection or command failed. Kinds: dns | connect | tls | login |
    unavailable (the server refused the login for now) | grant | folder | after | protocol |
    network (lost or too slow: reconnect)."""


# --- the connection ---------------------------------------------------------------------------


def _open_socket(host: str, port: int, timeout: Optional[float]) -> socket.socket:
    """TCP to the server, registered with the current deadline (the greeting and a TLS
    handshake are read before IMAPClient returns, so the socket is watched from its birth)."""
    from mailbox_relay import deadline

    guard = deadline.current()
    left = guard.left if guard is not None else (lambda: timeout or 30.0)
    addresses = _resolve(host, port, left())
    error: Optional[OSError] = None
    for family, kind, proto, _, address in addresses:
        sock = socket.socket(family, kind, proto)
        deadline.watch(sock)  # registered before connect: a blackholed SYN is cut too
        sock.settimeout(max(0.05, min(timeout or left(), left())))
        try:
            sock.connect(address)
        except OSError as failed:
            sock.close()
            error = failed
            if left() <= 0.05:
                break
            continue
        return sock
    raise error or OSError(f"no address of {host} could be reached")


def _resolve(host: str, port: int, seconds: float) -> List[Any]:
    """getaddrinfo within `seconds`: it runs before there is a socket a deadline could shut, so
    it runs in a helper thread that is not waited for past the bound."""
    found: List[Any] = []
    failure: List[BaseException] = []

    def resolve() -> None:
        try:
            found.extend(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except BaseException as error:  # gaierror above all: handed to the caller
            failure.append(error)

    helper = threading.Thread(target=resolve, name=f"resolve {host}", daemon=True)
    helper.start()
    helper.join(max(0.05, seconds))
    if failure:
        raise failure[0]
    if helper.is_alive():
        raise socket.gaierror(f"no answer from the resolver within {seconds:.0f}s")
    return found


class _Imap4(imaplib.IMAP4):
    def __init__(self, host: str, port: int, timeout: Optional[float]) -> None:
        self._connect_timeout = timeout
        super().__init__(host, port)

    def _create_socket(self, timeout: Optional[float] = None) -> socket.socket:
        return _open_socket(self.host, self.port, self._connect_timeout)


class _Imap4Tls(imaplib.IMAP4):
    """Implicit TLS (port 993)."""

    def __init__(
        self, host: str, port: int, context: Optional[ssl.SSLContext], timeout: Optional[float]
    ) -> None:
        self._connect_timeout = timeout
        self._context = context or ssl.create_default_context()
        super().__init__(host, port)

    def _create_socket(self, timeout: Optional[float] = None) -> socket.socket:
        sock = _open_socket(self.host, self.port, self._connect_timeout)
        return self._context.wrap_socket(sock, server_hostname=self.host)


_client: Any = None


def _client_class() -> Any:
    """IMAPClient, connecting through the two classes above (imported here only, on first use)."""
    global _client
    if _client is None:
        from imapclient import IMAPClient

        class Client(IMAPClient):  # type: ignore[misc]  # IMAPClient has no type information
            def _create_IMAP4(self) -> imaplib.IMAP4:
                timeout = getattr(self._timeout, "connect", None)
                if self.ssl:
                    return _Imap4Tls(self.host, self.port, self.ssl_context, timeout)
                return _Imap4(self.host, self.port, timeout)

        _client = Client
    return _client


def tls_context(account: Account) -> ssl.SSLContext:
    try:
        return ssl.create_default_context(cafile=account.ca_bundle)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"ca_bundle of account {account.name} cannot be used: {error}") from None


def open_connection(account: Account) -> Connection:
    """Connected (and TLS-protected, unless tls = none to loopback), not yet logged in. The
    connection and greeting, and STARTTLS, are each bounded as a whole by `timeout`."""
    where = f"{account.host}:{account.port}"
    try:
        with _bounded(account, "the greeting"):
            client = _client_class()(
                account.host,
                account.port,
                ssl=account.tls == "implicit",
                ssl_context=tls_context(account) if account.tls != "none" else None,
                timeout=account.timeout,
            )
        connection = Connection(client, account)
        if account.tls == "starttls":
            connection.starttls(tls_context(account))
    except (ImapProblem, ConfigError):
        raise
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
    _keepalive(connection.socket())
    return connection


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


@contextlib.contextmanager
def _bounded(account: Account, command: str, seconds: Optional[float] = None) -> Iterator[None]:
    """The block bounded as a whole (`timeout` of the account, or `seconds`); past it, the
    connection is shut down and the block ends in ImapProblem("network"), whatever it raised."""
    from mailbox_relay import deadline

    limit = account.timeout if seconds is None else seconds
    with deadline.bounded(limit, command) as guard:
        try:
            yield
        except BaseException:
            if guard.expired:
                raise _cut(account, command, guard) from None
            raise
    if guard.expired:
        raise _cut(account, command, guard)


def _cut(account: Account, command: str, guard: Any) -> ImapProblem:
    if guard.reason not in (None, "deadline"):  # deadline.cancel_all: the watch is stopping
        return ImapProblem("network", f"{account.host}: {command} cut off ({guard.reason})")
    return ImapProblem(
        "network",
        f"{account.host}: no answer to {command} within {guard.seconds:.3g}s "
        "(the server is too slow or the connection hangs); trying again later",
        cause="timeout",
    )


# What IMAPClient's methods send, for the lines that name a command.
_COMMANDS = {
    "login": "LOGIN",
    "plain_login": "AUTHENTICATE PLAIN",
    "oauth2_login": "AUTHENTICATE XOAUTH2",
    "capabilities": "CAPABILITY",
    "has_capability": "CAPABILITY",
    "starttls": "STARTTLS",
    "search": "UID SEARCH",
    "fetch": "UID FETCH",
    "add_flags": "UID STORE",
    "remove_flags": "UID STORE",
    "set_flags": "UID STORE",
    "move": "UID MOVE",
    "copy": "UID COPY",
    "uid_expunge": "UID EXPUNGE",
    "noop": "NOOP",
    "idle": "IDLE",
    "idle_check": "IDLE",
    "idle_done": "DONE",
    "folder_exists": "LIST",
    "list_folders": "LIST",
    "logout": "LOGOUT",
    "id_": "ID",
}
_LOCAL = frozenset({"socket", "shutdown"})  # no round trip: never bounded
_LOGIN_COMMANDS = ("LOGIN", "AUTHENTICATE")


def _command(name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    if name == "select_folder":
        readonly = kwargs.get("readonly", args[1] if len(args) > 1 else False)
        return "EXAMINE" if readonly else "SELECT"
    if name == "sasl_login":
        return f"AUTHENTICATE {args[0] if args else ''}".strip()
    return _COMMANDS.get(name, name.upper())


class Connection:
    """An IMAPClient whose every command is bounded as a whole by the account's `timeout` (a
    server that trickles its answer is cut off, not waited for), and whose lost connection is
    an ImapProblem("network") naming the command. Once lost, every later command raises that
    same problem at once. Anything else is IMAPClient's own."""

    def __init__(self, client: Any, account: Account) -> None:
        self.client = client
        self.account = account
        self.lost: Optional[ImapProblem] = None
        self._extra = 0.0  # seconds a body fetch may take beyond `timeout` (see reading)

    @contextlib.contextmanager
    def reading(self, size: int) -> Iterator[None]:
        """Commands inside fetch about `size` bytes of bodies: each may take `timeout` plus a
        second per MIN_RATE bytes, so a large message on a slow but steady link is fetched, while
        a server that trickles (slower than MIN_RATE) is still cut off."""
        self._extra = size / MIN_RATE
        try:
            yield
        finally:
            self._extra = 0.0

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if name.startswith("_") or name in _LOCAL or not callable(attribute):
            return attribute
        return functools.partial(self._run, name, attribute)

    def _run(self, name: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if self.lost is not None:
            raise ImapProblem(self.lost.kind, self.lost.line)
        command = _command(name, args, kwargs)
        seconds = self.account.timeout + self._extra
        if name == "idle_check":
            seconds += float(kwargs.get("timeout", args[0] if args else 0) or 0)
        from mailbox_relay import deadline

        try:
            with _bounded(self.account, command, seconds):
                deadline.watch(self._socket())
                return method(*args, **kwargs)
        except ImapProblem as problem:
            self.lost = problem
            raise
        except BaseException as error:
            if _is_lost(error) and not (command == "STARTTLS" and isinstance(error, ssl.SSLError)):
                self.lost = _lost(self.account, command, error)
                raise self.lost from None
            raise

    def raw(self, command: str, step: Callable[[], None]) -> None:
        """A step of ours on the raw socket (IDLE, DONE), bounded and failing like a command."""
        self._run(command.lower() if command != "DONE" else "idle_done", lambda: step())

    def _socket(self) -> Optional[socket.socket]:
        try:
            return self.client.socket()  # type: ignore[no-any-return]
        except Exception:  # already closed
            return None

    def socket(self) -> socket.socket:
        return self.client.socket()  # type: ignore[no-any-return]

    def shutdown(self) -> None:
        self.client.shutdown()


def _is_lost(error: BaseException) -> bool:
    """The connection broke (reset, closed, timed out), as opposed to the server saying no.
    IMAPClient turns a broken connection at login into LoginError; its context tells."""
    if isinstance(error, imaplib.IMAP4.readonly):  # an answer (the folder is read-only), not a loss
        return False
    if isinstance(error, (OSError, EOFError, imaplib.IMAP4.abort)):
        return True
    return type(error).__name__ == "LoginError" and isinstance(
        error.__context__, (imaplib.IMAP4.abort, OSError, EOFError)
    )


def _lost(account: Account, command: str, error: BaseException) -> ImapProblem:
    why = describe(error.__context__ if type(error).__name__ == "LoginError" and error.__context__ else error)
    why = re.sub(r"^command: \S+( \S+)? => ", "", why)  # imaplib's prefix to what the server said
    if command.startswith(_LOGIN_COMMANDS):
        if refused_for_now(why):  # "* BYE [UNAVAILABLE] ...": the server's cap, said as it hangs up
            return ImapProblem(
                "unavailable", f"{account.host} refused the login for now ({why}); trying again later"
            )
        return ImapProblem("network", f"connection to {account.host} lost at login: {why}", _cause(error))
    return ImapProblem("network", f"connection to {account.host} lost during {command}: {why}", _cause(error))


def _cause(error: BaseException) -> str:
    """How a connection was lost, for watch's listeners."""
    if isinstance(error, socket.timeout):
        return "timeout"
    if isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return "reset"
    if isinstance(error, (EOFError, imaplib.IMAP4.abort, ssl.SSLError)):
        return "closed"
    return "error"


# --- login ------------------------------------------------------------------------------------

TEMPORARY_CODES = ("UNAVAILABLE", "INUSE", "LIMIT", "SERVERBUG")  # RFC 5530: try again later
# Said with no code, or with [ALERT], by servers at their connection cap (Gmail: "Too many
# simultaneous connections"): no verdict on the password either.
_CAP_WORDS = re.compile(r"too many (simultaneous )?connections|maximum number of connections", re.IGNORECASE)


def refused_for_now(said: str) -> bool:
    """A refusal that is no verdict on the credentials: try again later."""
    return response_code(said) in TEMPORARY_CODES or bool(_CAP_WORDS.search(said))


def response_code(text: str) -> Optional[str]:
    """The RFC 5530 response code of a server's answer ("[UNAVAILABLE] ..." -> "UNAVAILABLE")."""
    found = re.match(r"\s*\[([A-Za-z][A-Za-z0-9.-]*)[^\]]*\]", text)
    return found.group(1).upper() if found else None


def login(client: Any, account: Account) -> None:
    if account.oauth2 is not None:
        _xoauth2_login(client, account)
        return
    from imapclient.exceptions import IMAPClientError, LoginError

    password = account.password()
    try:
        if password.isascii() and account.username.isascii():
            client.login(account.username, password)
        else:  # LOGIN's quoted strings are ASCII; AUTHENTICATE PLAIN carries UTF-8 (RFC 4616)
            client.plain_login(account.username, password)
    except LoginError as error:
        if _is_lost(error):  # a client that is not a Connection (there, it is an ImapProblem)
            raise _lost(account, "LOGIN", error) from None
        said = describe(error)
        _temporary(account, said)
        raise ImapProblem(
            "login",
            f"IMAP login of {account.username} at {account.host} was rejected ({said}): "
            + (
                f"the password of account {account.name} has expired; set a new one"
                if response_code(said) == "EXPIRED"
                else f"check the password of account {account.name}"
            ),
        ) from None
    except (OSError, EOFError, IMAPClientError) as error:
        if _is_lost(error):
            raise _lost(account, "LOGIN", error) from None
        # e.g. AUTHENTICATE PLAIN not offered
        raise ImapProblem("protocol", f"{account.host} refused the login: {describe(error)}") from None


def _temporary(account: Account, said: str) -> None:
    """Raise for a refusal that is no verdict on the credentials (RFC 5530)."""
    code = response_code(said)
    if refused_for_now(said):
        raise ImapProblem(
            "unavailable", f"{account.host} refused the login for now ({said}); trying again later"
        )
    if code == "PRIVACYREQUIRED":
        raise ImapProblem(
            "tls",
            f"{account.host} requires TLS before login ({said}): "
            f'set tls = "starttls" (or "implicit") in account {account.name}',
        )


def _xoauth2_login(client: Any, account: Account) -> None:
    """AUTHENTICATE XOAUTH2 with a fresh token; if refused, one new token and one more try (the
    token in hand may have been revoked, or expired early). A refusal that says "not now"
    (RFC 5530 UNAVAILABLE, INUSE, LIMIT) is no verdict on the token: no renewal. Tokens never
    reach a message."""
    from mailbox_relay.sources.oauth2 import token_source

    if not client.has_capability("AUTH=XOAUTH2"):
        raise ImapProblem(
            "login",
            f"{account.host} does not offer AUTHENTICATE XOAUTH2: "
            f"check host and auth of account {account.name}",
        )
    source = token_source(account)
    token = _token(source.current)
    said = _xoauth2(client, account, token.access)
    if said is not None:
        _temporary(account, said)
        refused = token
        token = _token(lambda: source.renew(refused))
        said = _xoauth2(client, account, token.access)
        if said is not None:
            _temporary(account, said)
            raise _token_refused(account, token, said)
    client.mailbox_relay_replace_at = token.replace_session_at()


def _token_refused(account: Account, token: Any, said: str) -> ImapProblem:
    """The server refused a new token too: say whose fault that most likely is."""
    assert account.oauth2 is not None
    name, command = account.name, account.oauth2.token_command is not None
    refused = (
        f"AUTHENTICATE XOAUTH2 of {account.username} at {account.host} was refused even with a new "
        f"token ({said})"
    )
    if getattr(token, "expired_when_issued", False):  # not the username: the issuer, or our clock
        issuer = "oauth2_token_command printed" if command else f"the OAuth2 endpoint {token.source} issued"
        return ImapProblem(
            "network",
            f"{refused}: {issuer} a token that had already expired: check this host's clock"
            f"{', or the command' if command else ''}; trying again later",
        )
    if response_code(said) == "EXPIRED":
        fix = (
            "check what oauth2_token_command prints" if command else f"run `mailbox-relay auth {name}` again"
        )
        return ImapProblem("login", f"{refused}: the token or grant has expired: {fix}")
    if command:
        return ImapProblem(
            "login",
            f"{refused}: check what oauth2_token_command of account {name} prints (a current access "
            f"token for the mailbox {account.username})",
        )
    return ImapProblem(
        "login",
        f"{refused}: username of account {name} must be the mailbox the grant is for "
        f"(else run `mailbox-relay auth {name}` again)",
    )


def _token(obtain: Callable[[], Any]) -> Any:
    """A Token, or the TokenProblem as an ImapProblem of the kind the callers act on."""
    from mailbox_relay.sources.oauth2 import TokenProblem

    try:
        return obtain()
    except TokenProblem as problem:
        kind = {"grant": "grant", "client": "login"}.get(problem.kind, "network")
        raise ImapProblem(kind, problem.line) from None


def _xoauth2(client: Any, account: Account, access: str) -> Optional[str]:
    """None when the server took the token; the server's words when it refused it."""
    from imapclient.exceptions import LoginError

    try:
        client.sasl_login("XOAUTH2", _Xoauth2(account.username, access))
    except LoginError as error:
        if _is_lost(error):
            raise _lost(account, "AUTHENTICATE", error) from None
        return describe(error)
    except (OSError, EOFError) as error:
        raise _lost(account, "AUTHENTICATE", error) from None
    return None


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


def connect(account: Account) -> Connection:
    client = open_connection(account)
    try:
        login(client, account)
    except BaseException:
        close(client)
        raise
    return client


def close(client: Any) -> None:
    """LOGOUT (bounded) if the connection still works; never raises."""
    try:
        client.logout()
    except Exception:
        with contextlib.suppress(Exception):
            client.shutdown()


# Dovecot ends each tagged answer with its timing: "... (0.001 + 0.000 secs)."
_TIMING = re.compile(r"\s*\(\d+\.\d+(?: \+ \d+\.\d+)* secs\)\.?$")


def describe(error: BaseException) -> str:
    """One error as words: "timed out", the OS's reason, or the server's text (without b''
    and without Dovecot's timing)."""
    if isinstance(error, socket.timeout):
        return "timed out"
    text = getattr(error, "strerror", None) or str(error) or type(error).__name__
    if len(text) > 2 and text[0] == "b" and text[1] in "'\"" and text[-1] == text[1]:
        text = text[2:-1]  # bytes' repr, as IMAPClient words some errors
    return _TIMING.sub("", text)


def server_said(error: BaseException) -> str:
    """The server's own words of a refused command (IMAPClient prefixes "select failed: ")."""
    return re.sub(r"^[a-z_ ]+ failed: ", "", describe(error))


def capabilities(client: Any) -> List[str]:
    return sorted(c.decode("ascii", "replace") for c in client.capabilities())


def folder_names(client: Any) -> List[str]:
    """The account's folders (LIST), for a line that says which exist."""
    return sorted(str(entry[2]) for entry in client.list_folders())


def folder_refused(client: Any, account: Account, name: str, error: BaseException) -> Tuple[bool, str]:
    """Why the server refused SELECT/EXAMINE of `name`: (True, the folders that do exist) when
    there is no such folder; else (False, the server's words). A connection lost meanwhile
    raises ImapProblem."""
    said = server_said(error)
    try:
        names = folder_names(client)
    except ImapProblem:
        raise
    except Exception:  # a refused LIST: the server's words will do
        return False, said
    if name in names:
        return False, said
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return True, f"there is no folder {name!r} in account {account.name}; it has: {listed or 'no folders'}"


class _Idle:
    """One IDLE command, read by us: IMAPClient's idle_check swallows EOF and socket errors and
    answers "nothing new" (a dropped connection would spin), and its buffered reader can lose a
    partial line on a non-blocking socket. Commands stay IMAPClient's (they are bounded, parsed
    and tested); only the IDLE's lines are ours, from the raw socket (an SSLSocket's recv gives
    decrypted bytes; reading until it would block also empties what TLS holds decrypted, which
    select() cannot see). Complete lines only: a partial one waits in `pending`."""

    def __init__(self, connection: Connection, account: Account) -> None:
        self.connection = connection
        self.account = account
        self.imap: Any = connection.client._imap
        self.sock: socket.socket = connection.socket()
        self.tag: bytes = self.imap._new_tag()
        self.imap.tagged_commands.pop(self.tag, None)  # answered here, never by imaplib
        self.pending = bytearray()
        self.news = False
        self.ended = False  # the server answered the IDLE itself (it ended it): no DONE
        self.timeout = self.sock.gettimeout()

    def start(self) -> socket.socket:
        self.connection.raw("IDLE", self._start)
        return self.sock

    def _start(self) -> None:
        self.pending += _read_ahead(self.imap)
        self.sock.sendall(self.tag + b" IDLE\r\n")
        self.sock.settimeout(self.account.timeout)
        while True:
            line = self._line()
            if line.startswith(b"+"):
                break
            if self._answer(line):  # refused: reconnecting is the one cure we have
                raise EOFError(f"the server refused IDLE: {line.decode('utf-8', 'replace').strip()}")
        self.sock.setblocking(False)

    def readable(self) -> bool:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise self._lost(EOFError("the server closed the connection"), "closed")
                self.pending += chunk
        except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            pass  # all there was
        except ImapProblem:
            raise
        except ssl.SSLError as error:
            raise self._lost(error, "closed") from None
        except OSError as error:
            raise self._lost(error, "reset") from None
        while b"\r\n" in self.pending:
            line, _, rest = bytes(self.pending).partition(b"\r\n")
            self.pending = bytearray(rest)
            if line.startswith(b"* BYE"):
                said = line[5:].decode("utf-8", "replace").strip()
                raise self._lost(EOFError(f"the server said goodbye ({said})"), "closed")
            self._answer(line)
        return self.news

    def _lost(self, error: BaseException, cause: str) -> ImapProblem:
        """Every later command on the connection raises this too."""
        problem = ImapProblem(
            "network", f"{self.account.host}: connection lost during IDLE ({describe(error)})", cause
        )
        self.connection.lost = problem
        return problem

    def stop(self) -> None:
        self.connection.raw("DONE", self._stop)

    def _stop(self) -> None:
        self.sock.settimeout(self.account.timeout)
        try:
            if not self.ended:
                self.sock.sendall(b"DONE\r\n")
                while not self._answer(self._line()):
                    pass
        finally:
            self.sock.settimeout(self.timeout)

    def _answer(self, line: bytes) -> bool:
        """One line while idling; True for the tagged answer to our IDLE."""
        if line.startswith(self.tag + b" "):
            self.ended = self.news = True
            return True
        if not line.startswith(b"* OK"):  # "* OK Still here" is a keep-alive, not news
            self.news = True
        return False

    def _line(self) -> bytes:
        """The next whole line, blocking (under the command's deadline)."""
        while b"\r\n" not in self.pending:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("the server closed the connection")
            self.pending += chunk
        line, _, rest = bytes(self.pending).partition(b"\r\n")
        self.pending = bytearray(rest)
        return line


def _read_ahead(imap: Any) -> bytes:
    """What imaplib's buffered reader already holds (normally nothing), taken so no line is lost
    when we read the raw socket. Never blocks: the socket is non-blocking meanwhile."""
    sock = imap.sock
    previous = sock.gettimeout()
    sock.setblocking(False)
    try:
        data = imap.file.peek(65536)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        data = b""
    finally:
        sock.settimeout(previous)
    return bytes(imap.file.read(len(data))) if data else b""


class ImapSource:
    """One account over one IMAP connection, as fetch and watch see every source (see
    sources/mailbox.py): keys are UIDs, the epoch is UIDVALIDITY, the cursor the last handled
    UID. Reads with BODY.PEEK[] (the exact bytes, no \\Seen); changes a message only when told
    to after the ingress said 2xx."""

    key_label = "UID"  # what log lines call a key

    def __init__(self, client: Connection, account: Account) -> None:
        self.client = client
        self.account = account
        self.name = ""
        self._target_checked = False
        self._idle: Optional[bool] = None
        self._idling: Optional[_Idle] = None  # the IDLE in progress (watch)

    # --- a pass --------------------------------------------------------------------------------

    def open(self, name: str) -> Opened:
        """SELECT (EXAMINE when nothing will be changed, so even flags stay as they are)."""
        from imapclient.exceptions import IMAPClientError

        try:  # a lost or too slow connection is an ImapProblem("network") of the Connection
            info = self.client.select_folder(name, readonly=self.account.after.action == "keep")
        except imaplib.IMAP4.readonly:
            raise ImapProblem(
                "folder",
                f"folder {name!r} of account {self.account.name} is read-only, but after = "
                f'{self.account.after} changes it: set after = "keep", or give {self.account.username} '
                "write access",
            ) from None
        except IMAPClientError as error:  # NO or BAD: this folder
            why = folder_refused(self.client, self.account, name, error)[1]
            raise ImapProblem(
                "folder", f"folder {name!r} of account {self.account.name} cannot be opened: {why}"
            ) from None
        self.name = name
        self._check_move_target()
        uidnext = int(info.get(b"UIDNEXT", 0))
        if not uidnext:  # an old server: the highest UID + 1
            uidnext = max(self.client.search(["ALL"]) or [0]) + 1
        return Opened(str(int(info[b"UIDVALIDITY"])), int(info.get(b"EXISTS", 0)), str(uidnext - 1))

    @contextlib.contextmanager
    def _refused(self, command: str) -> Iterator[None]:
        """A NO or BAD to a command of a pass is this folder's answer (the connection works): one
        line with the server's words, and the pass stops; a lost connection stays "network"."""
        from imapclient.exceptions import IMAPClientError

        try:
            yield
        except imaplib.IMAP4.abort:
            raise
        except IMAPClientError as error:
            raise ImapProblem(
                "folder",
                f"{self.account.name}/{self.name}: the server refused {command} ({server_said(error)}); "
                "if it goes on, check the folder with the mail provider",
            ) from None

    def _check_move_target(self) -> None:
        """Before anything is posted: a message the ingress took must be movable afterwards."""
        after = self.account.after
        if after.action == "move" and not self._target_checked:
            with self._refused("LIST"):
                exists = self.client.folder_exists(after.folder)
            if not exists:
                raise ImapProblem(
                    "folder",
                    f"after = move:{after.folder} of account {self.account.name}, but there is no folder "
                    f"{after.folder!r}: create it, or change after",
                )
            self._target_checked = True

    def listing(
        self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
    ) -> Listing:
        """UIDs above the cursor (and on or after `since`, among those up to `through`),
        ascending; each, once handled, is the new cursor. `N:*` always matches the highest UID
        even below N: filtered out."""
        after_uid = int(cursor or 0)
        criteria: List[Any] = ["UID", f"{after_uid + 1}:*"]
        if since is not None and through is not None:  # UID > through, or SINCE the date
            criteria += ["OR", "UID", f"{int(through) + 1}:*", "SINCE", since]
        elif since is not None:
            criteria += ["SINCE", since]
        with self._refused("UID SEARCH"):
            found = self.client.search(criteria)
        uids = sorted(uid for uid in found if uid > after_uid)
        keys = [str(uid) for uid in uids]
        final = str(max([int(through), *uids])) if since is not None and through is not None else None
        return Listing(keys, checkpoints={key: key for key in keys}, final=final)

    def sizes(self, keys: Sequence[Key]) -> Dict[Key, int]:
        if not keys:
            return {}
        with self._refused("UID FETCH"):
            found = self.client.fetch([int(key) for key in keys], ["RFC822.SIZE"])
        return {str(uid): int(data[b"RFC822.SIZE"]) for uid, data in found.items() if b"RFC822.SIZE" in data}

    def fetch(self, keys: Sequence[Key], sizes: Mapping[Key, int]) -> Dict[Key, bytes]:
        """The exact bytes (BODY.PEEK[]: nothing is marked \\Seen). A UID expunged meanwhile is
        simply absent. A large message comes in pieces, so memory stays near its size."""
        small = [int(key) for key in keys if sizes.get(key, 0) <= PIECE]
        with self._refused("UID FETCH"), self.client.reading(sum(sizes.get(str(uid), 0) for uid in small)):
            found = self.client.fetch(small, ["BODY.PEEK[]"]) if small else {}
        bodies = {str(uid): data[b"BODY[]"] for uid, data in found.items() if data.get(b"BODY[]") is not None}
        for key in keys:
            if sizes.get(key, 0) > PIECE:
                whole = self._in_pieces(int(key))
                if whole is not None:
                    bodies[key] = whole
        return bodies

    def _in_pieces(self, uid: int) -> Optional[bytes]:
        """BODY.PEEK[]<offset.length> into one buffer: parsing a 50 MB literal in one response
        costs several times its size. A piece shorter than asked for is the last one."""
        whole = bytearray()
        while True:
            offset = len(whole)
            with self._refused("UID FETCH"), self.client.reading(PIECE):
                found = self.client.fetch([uid], [f"BODY.PEEK[]<{offset}.{PIECE}>"]).get(uid, {})
            piece = found.get(f"BODY[]<{offset}>".encode())
            if piece is None:
                return None  # expunged meanwhile: never half a message
            whole += piece
            if len(piece) < PIECE:
                return whole  # type: ignore[return-value]  # a bytearray: no copy of 50 MB

    def acknowledge(self, keys: Sequence[Key], after: After) -> None:
        """What `after` says, for messages the ingress accepted. With UIDPLUS only our messages
        are expunged (plain EXPUNGE would remove other clients' \\Deleted mail too)."""
        uids = [int(key) for key in keys]
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

    # --- watch ---------------------------------------------------------------------------------

    @property
    def idle(self) -> bool:
        if self._idle is None:
            self._idle = bool(self.client.has_capability("IDLE"))
        return self._idle

    @property
    def waiting(self) -> str:
        return "IDLE" if self.idle else f"polling every {self.account.poll_interval:g}s"

    @property
    def refresh_every(self) -> float:
        """Seconds between round trips that prove the connection alive while waiting."""
        return self.account.idle_refresh if self.idle else self.account.poll_interval

    def start_waiting(self) -> Optional[socket.socket]:
        """IDLE (bounded by `timeout`) and the socket to watch for its news; None where the
        server has no IDLE (the watch polls: stop_waiting is then a NOOP)."""
        if not self.idle:
            return None
        self._idling = _Idle(self.client, self.account)
        return self._idling.start()

    def readable(self) -> bool:
        """What the IDLE socket holds, read without blocking: True once news came (or the server
        ended IDLE). A FIN, an RST or a TLS close raises ImapProblem("network") at once."""
        return self._idling.readable() if self._idling is not None else True

    def stop_waiting(self) -> None:
        """DONE and its answer (IDLE), or a NOOP (polling): a round trip bounded by `timeout`."""
        idling, self._idling = self._idling, None
        if idling is not None:
            idling.stop()
        else:
            self.client.noop()

    def replace_at(self) -> Optional[float]:
        return session_replace_at(self.client)

    def close(self) -> None:
        close(self.client)


def connect_source(account: Account) -> ImapSource:
    """The account's IMAP source, logged in (see sources/mailbox.py)."""
    return ImapSource(connect(account), account)
