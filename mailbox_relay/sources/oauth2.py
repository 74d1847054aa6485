"""OAuth2 for IMAP (XOAUTH2): access tokens for `auth = "xoauth2"` accounts, and the two flows
by which `mailbox-relay auth` obtains the first grant (device code, loopback with PKCE).

Tokens are secrets: they never reach a log line, argv, an exception's text or `status`. The
grant lives in a 0600 JSON file that is replaced atomically (rename), so a rotated refresh token
is never lost half-written; a lock file serialises refreshes across threads and processes, so
two watchers never spend the same rotating refresh token.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import html
import json
import os
import secrets
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, Optional, Tuple
from urllib.parse import parse_qs, urlencode, urlsplit

from mailbox_relay.accounts import Account, OAuth2, run_secret_command
from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import PasswordFileWarning

if TYPE_CHECKING:
    import requests

FRESH_FOR = 120.0  # an access token with less life left than this is refreshed before use
DEFAULT_LIFE = 3600.0  # when the provider does not say (expires_in), and for a token command's
MIN_SESSION = 2.0  # seconds a connection lives at least, whatever the token's lifetime
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


class TokenProblem(Exception):
    """Why no token could be had, in one line that says what to do.

    kind: grant (run `auth` again) | client (a setting is wrong) | network (try again later) |
    denied | timeout (the person did not sign in)."""

    def __init__(self, kind: str, line: str) -> None:
        super().__init__(line)
        self.kind = kind
        self.line = line


@dataclass(frozen=True)
class Token:
    access: str = field(repr=False)
    issued_at: float  # epoch seconds
    expires_at: float
    scopes: str  # as granted, when the provider says; else ""
    source: str  # where it came from, for check
    # The issuer said it had run out already (expires_in <= 0, an expires_at or a JWT's exp in
    # the past): if the server refuses it, that is the issuer's (or this host's clock's) doing.
    expired_when_issued: bool = False

    def replace_session_at(self) -> float:
        """When a connection that logged in with it should be replaced by one with a new token
        (Exchange Online ends the session when its token expires): a quarter of its life, at
        most a minute, before the end; never sooner than MIN_SESSION after it was issued, so a
        provider's tiny expires_in cannot make a watch reconnect in a tight loop."""
        margin = min(60.0, (self.expires_at - self.issued_at) / 4)
        return max(self.expires_at - margin, self.issued_at + MIN_SESSION)

    def describe(self) -> str:
        minutes = max(0, round((self.expires_at - time.time()) / 60))
        scopes = f"scopes {self.scopes}" if self.scopes else "scopes not stated"
        return f"obtained from {self.source}; expires in {minutes} min; {scopes}"


# --- the grant file ---------------------------------------------------------------------------

_LOCKS: Dict[str, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


@contextlib.contextmanager
def _locked(path: str, wait: float = 60.0) -> Iterator[None]:
    """One refresh at a time per grant file: across threads (a lock) and processes (flock).
    Waits at most `wait` seconds for another refresh (itself bounded by `timeout`), so a hung
    holder never holds every other folder of the account: TokenProblem("network") then."""
    with _LOCKS_LOCK:
        lock = _LOCKS.setdefault(path, threading.Lock())
    until = time.monotonic() + wait
    if not lock.acquire(timeout=max(0.0, wait)):
        raise _lock_held(path, wait)
    try:
        try:
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            handle = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as error:
            raise ConfigError(
                f"cannot use the OAuth2 grant file {path} ({error.strerror or error}): "
                "set oauth2_token_file, or XDG_STATE_HOME, to a writable place"
            ) from None
        try:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= until:
                        raise _lock_held(path, wait) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(handle)
    finally:
        lock.release()


def _lock_held(path: str, wait: float) -> TokenProblem:
    return TokenProblem(
        "network",
        f"another refresh of the OAuth2 grant {path} held it for over {wait:g}s; trying again later",
    )


def read_grant(path: str) -> Optional[Dict[str, Any]]:
    """The stored grant, or None when `auth` has not stored one yet."""
    try:
        with open(path, encoding="utf-8") as handle:
            if os.fstat(handle.fileno()).st_mode & 0o077:
                warnings.warn(
                    f"OAuth2 grant file {path} is readable by others; chmod 600 {path}",
                    PasswordFileWarning,
                    stacklevel=2,
                )
            grant = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"cannot read the OAuth2 grant file {path} ({getattr(error, 'strerror', None) or error}): "
            "run `mailbox-relay auth` again"
        ) from None
    if not isinstance(grant, dict) or not isinstance(grant.get("refresh_token"), str):
        raise ConfigError(
            f"the OAuth2 grant file {path} holds no refresh token: run `mailbox-relay auth` again"
        )
    return grant


def save_grant(path: str, grant: Dict[str, Any]) -> None:
    """Write to a new 0600 file, fsync, rename over the old one: readers see old or new, whole."""
    directory = os.path.dirname(path) or "."
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{threading.get_ident()}")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        handle = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            json.dump(grant, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
        directory_handle = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_handle)
        finally:
            os.close(directory_handle)
    except OSError as error:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise ConfigError(f"cannot save the OAuth2 grant file {path}: {error.strerror or error}") from None


def grant_stamp(account: Account) -> Optional[int]:
    """Changes when the grant file is replaced (by `auth`, or a refresh): a paused watch looks."""
    if account.oauth2 is None:
        return None
    try:
        return os.stat(account.oauth2.token_file).st_mtime_ns
    except OSError:
        return None


def _stored_token(grant: Dict[str, Any], source: str) -> Optional[Token]:
    access, expires = grant.get("access_token"), grant.get("expires_at")
    if not isinstance(access, str) or not isinstance(expires, (int, float)):
        return None
    issued = grant.get("issued_at")
    issued = issued if isinstance(issued, (int, float)) else expires - DEFAULT_LIFE
    return Token(access, float(issued), float(expires), str(grant.get("scope") or ""), source)


def _granted(answer: Dict[str, Any], source: str) -> Token:
    now = time.time()
    life = _seconds(answer.get("expires_in"), DEFAULT_LIFE)
    return Token(
        str(answer["access_token"]),
        now,
        now + life,
        str(answer.get("scope") or ""),
        source,
        _expired_when_issued(answer, now),
    )


def _expired_when_issued(answer: Dict[str, Any], now: float) -> bool:
    """True when the answer itself says the token has run out (it is still tried: the IMAP
    server's clock decides, and a nonsense lifetime counts as DEFAULT_LIFE)."""
    expires_in, expires_at = answer.get("expires_in"), answer.get("expires_at")
    with contextlib.suppress(TypeError, ValueError):
        if expires_in is not None and float(expires_in) <= 0:
            return True
    with contextlib.suppress(TypeError, ValueError):
        if expires_at is not None and float(expires_at) <= now:
            return True
    return False


def _jwt_expiry(access: str) -> Optional[float]:
    """The `exp` of an access token that is a JWT (Microsoft's are), else None. Not verified:
    only to know when it runs out."""
    parts = access.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        expiry = float(claims["exp"])
    except (ValueError, TypeError, KeyError, IndexError):
        return None
    return expiry if 0 < expiry < 10**11 else None


# --- the token endpoint -----------------------------------------------------------------------


def _session(url: str) -> requests.Session:
    """OAuth2's session (sessions.new_session): JSON answers, and its connections bounded by
    the thread's deadline in any thread."""
    from mailbox_relay import __version__
    from mailbox_relay.sessions import new_session

    session = new_session(url, f"mailbox-relay/{__version__}", threaded=True)
    session.headers["Accept"] = "application/json"
    return session


def _post(url: str, form: Dict[str, str], timeout: float) -> Tuple[int, Dict[str, Any]]:
    """POST a form; the status and the JSON answer ({} when it is not JSON). `timeout` bounds
    the whole request (a trickled answer too), in any thread. Never follows a redirect: a grant
    must not be handed to whoever the endpoint points at (per request: a session's
    max_redirects = 0 would raise before the Location could be read)."""
    import requests

    from mailbox_relay.deadline import bounded

    with _session(url) as session, bounded(timeout, "token request") as guard:
        try:
            response = session.post(url, data=form, timeout=timeout, allow_redirects=False)
            status = response.status_code
            try:
                answer = response.json()
            except ValueError:
                answer = {}
        except requests.RequestException as error:
            if guard.expired:
                raise _too_slow(url, timeout) from None
            raise TokenProblem(
                "network", f"cannot reach the OAuth2 endpoint {url}: {_why(error)}; trying again later"
            ) from None
    if guard.expired:  # it answered, but the connection was cut meanwhile: the answer may be partial
        raise _too_slow(url, timeout)
    return status, answer if isinstance(answer, dict) else {}


def _too_slow(url: str, timeout: float) -> TokenProblem:
    return TokenProblem(
        "network", f"the OAuth2 endpoint {url} did not answer within {timeout:g}s; trying again later"
    )


def _why(error: Exception) -> str:
    reason = error
    while reason.__context__ is not None and not isinstance(reason, OSError):
        reason = reason.__context__  # type: ignore[assignment]
    return getattr(reason, "strerror", None) or type(reason).__name__


def refusal(status: int, answer: Dict[str, Any], account: Account, url: str) -> TokenProblem:
    """The one line for an endpoint's "no", by its RFC 6749 error code."""
    error = str(answer.get("error") or f"HTTP {status}")
    description = "".join(c if c.isprintable() else " " for c in str(answer.get("error_description") or ""))[
        :160
    ]
    said = f"{error}: {description}" if description else error
    name = account.name
    if 300 <= status < 400:  # never followed: a grant goes to the address configured, or nowhere
        return TokenProblem(
            "client",
            f"the OAuth2 endpoint {url} redirects (HTTP {status}): configure the address it redirects to",
        )
    if status >= 500 or status == 429 or 200 <= status < 300:
        return TokenProblem(
            "network", f"the OAuth2 endpoint {url} answered HTTP {status}; trying again later"
        )
    if "error" not in answer:  # not an OAuth2 answer at all: the wrong address
        return TokenProblem(
            "client", f"the OAuth2 endpoint {url} answered HTTP {status}: check that address in the account"
        )
    if error == "invalid_grant":
        return TokenProblem(
            "grant",
            f"the OAuth2 grant of account {name} was refused ({said}): it was revoked or has expired; "
            f"run `mailbox-relay auth {name}` again",
        )
    if error in ("invalid_client", "unauthorized_client"):
        client = account.oauth2.client_id if account.oauth2 else ""
        return TokenProblem(
            "client",
            f"the OAuth2 provider refused client {client} of account {name} ({said}): "
            f"check oauth2_client_id and oauth2_client_secret_file (after changing the client, "
            f"run `mailbox-relay auth {name}` again)",
        )
    if error == "invalid_scope":
        return TokenProblem(
            "client",
            f"the OAuth2 provider refused the scopes of account {name} ({said}): check oauth2_scopes",
        )
    return TokenProblem(
        "client", f"the OAuth2 endpoint {url} refused account {name} ({said}): check its oauth2_ settings"
    )


def _client_form(oauth2: OAuth2, account: Account, form: Dict[str, str]) -> Dict[str, str]:
    form = {**form, "client_id": oauth2.client_id}
    secret = oauth2.client_secret(account.name)
    if secret is not None:
        form["client_secret"] = secret
    return form


# --- access tokens ----------------------------------------------------------------------------


class TokenSource:
    """Access tokens for one account, shared by every connection (thread) of a process."""

    def __init__(self, account: Account) -> None:
        assert account.oauth2 is not None
        self.account = account
        self.oauth2: OAuth2 = account.oauth2
        self._token: Optional[Token] = None
        self._lock = threading.Lock()

    def current(self) -> Token:
        """A token with at least FRESH_FOR seconds left: the one in hand, or a refreshed one."""
        with self._lock:
            token = self._token
        if token is not None and token.expires_at - time.time() > FRESH_FOR:
            return token
        return self._obtain(refused=None, force=False)

    def renew(self, refused: Optional[Token] = None) -> Token:
        """A new token: after the server refused `refused`, or (None) to prove the grant works."""
        return self._obtain(refused, force=refused is None)

    def _obtain(self, refused: Optional[Token], force: bool) -> Token:
        if self.oauth2.app_only:  # asked anew each time: no grant file to share, no refresh token
            token = self._for_app()
        elif self.oauth2.token_command is not None:
            token = self._from_command()
        else:
            with _locked(self.oauth2.token_file, 2 * self.account.timeout):
                token = self._from_grant(refused, force)
        with self._lock:
            self._token = token
        return token

    def _for_app(self) -> Token:
        """App-only (sources/apponly.py): the client credentials or JWT-bearer grant."""
        from mailbox_relay.sources.apponly import app_refusal, token_request

        url, form = token_request(self.account, self.oauth2)
        status, answer = _post(url, form, self.account.timeout)
        if status != 200 or not isinstance(answer.get("access_token"), str):
            explained = app_refusal(status, answer, self.account, url)
            if explained is not None:
                raise TokenProblem(*explained)
            raise refusal(status, answer, self.account, url)
        return _granted(answer, urlsplit(url).netloc or url)

    def _from_command(self) -> Token:
        command = str(self.oauth2.token_command)
        try:
            access = run_secret_command(command, "oauth2_token_command", self.account.name)
        except ConfigError as error:  # its own refresh may have met a network problem: try later
            raise TokenProblem("network", error.outcome.detail) from None
        now = time.time()  # the command does not say; a JWT does (and both providers' live an hour)
        expiry = _jwt_expiry(access)
        if expiry is not None and expiry > now:
            return Token(access, now, expiry, "", "oauth2_token_command")
        return Token(access, now, now + DEFAULT_LIFE, "", "oauth2_token_command", expiry is not None)

    def _from_grant(self, refused: Optional[Token], force: bool) -> Token:
        """Under the lock: what another process stored meanwhile is used before a refresh."""
        grant = read_grant(self.oauth2.token_file)
        if grant is None:
            name = self.account.name
            raise TokenProblem(
                "grant", f"account {name} has no OAuth2 grant yet: run `mailbox-relay auth {name}`"
            )
        stored = _stored_token(grant, self._source())
        usable = stored is not None and stored.expires_at - time.time() > FRESH_FOR
        if (
            stored is not None
            and usable
            and not force
            and (refused is None or stored.access != refused.access)
        ):
            return stored
        return self._refresh(grant)

    def _refresh(self, grant: Dict[str, Any]) -> Token:
        form = {"grant_type": "refresh_token", "refresh_token": str(grant["refresh_token"])}
        if self.oauth2.provider.scopes:
            form["scope"] = " ".join(self.oauth2.provider.scopes)
        url = self.oauth2.provider.token_url
        status, answer = _post(url, _client_form(self.oauth2, self.account, form), self.account.timeout)
        if status != 200 or not isinstance(answer.get("access_token"), str):
            raise refusal(status, answer, self.account, url)
        token = _granted(answer, self._source())
        # A provider may rotate the refresh token (Microsoft does): the new one replaces the old.
        save_grant(self.oauth2.token_file, _grant_record(grant, answer, token))
        return token

    def _source(self) -> str:
        return urlsplit(self.oauth2.provider.token_url).netloc or self.oauth2.provider.token_url


def _grant_record(grant: Dict[str, Any], answer: Dict[str, Any], token: Token) -> Dict[str, Any]:
    return {
        **grant,
        "refresh_token": answer.get("refresh_token") or grant.get("refresh_token"),
        "access_token": token.access,
        "issued_at": token.issued_at,
        "expires_at": token.expires_at,
        "scope": token.scopes or grant.get("scope", ""),
    }


_SOURCES: Dict[Tuple[str, OAuth2], TokenSource] = {}


def token_source(account: Account) -> TokenSource:
    """The one TokenSource of an account in this process (watch runs a thread per folder)."""
    assert account.oauth2 is not None
    key = (account.name, account.oauth2)  # an account changed (another client, endpoint): another source
    with _LOCKS_LOCK:
        if key not in _SOURCES:
            _SOURCES[key] = TokenSource(account)
        return _SOURCES[key]


# --- the first grant: `mailbox-relay auth` ------------------------------------------------------


def store_first_grant(account: Account, answer: Dict[str, Any]) -> Token:
    oauth2 = refreshable(account)
    if not isinstance(answer.get("refresh_token"), str):
        raise TokenProblem(
            "client",
            f"the provider granted account {account.name} no refresh token: ask for offline access "
            "(Microsoft: scope offline_access; Google: the loopback flow asks for it)",
        )
    token = _granted(answer, urlsplit(oauth2.provider.token_url).netloc)
    grant = {"client_id": oauth2.client_id, "token_url": oauth2.provider.token_url}
    with _locked(oauth2.token_file):
        save_grant(oauth2.token_file, _grant_record(grant, answer, token))
    return token


def refreshable(account: Account) -> OAuth2:
    """The OAuth2 settings of an account whose tokens mailbox-relay refreshes itself."""
    if account.oauth2 is None:
        raise TokenProblem("client", f'account {account.name} does not use OAuth2: set auth = "xoauth2"')
    if account.oauth2.app_only:
        raise TokenProblem(
            "client",
            f"account {account.name} signs in as an app (auth = {account.auth}): there is no sign-in "
            "to store; `mailbox-relay check --account` shows whether its credential works",
        )
    if account.oauth2.token_command is not None:
        raise TokenProblem(
            "client",
            f"account {account.name} gets its tokens from oauth2_token_command: "
            "authorise with that tool instead",
        )
    return account.oauth2


def device_flow(account: Account, say: Callable[[str], None], wait: float) -> Dict[str, Any]:
    """RFC 8628: show a code to enter on another device, then poll until it is entered."""
    oauth2 = refreshable(account)
    url = oauth2.provider.device_url
    if not url:
        raise TokenProblem(
            "client",
            f"account {account.name} has no device-code endpoint: "
            "use --flow loopback, or set oauth2_device_url",
        )
    scope = {"scope": " ".join(oauth2.provider.scopes)}
    status, answer = _post(url, _client_form(oauth2, account, scope), account.timeout)
    if status != 200 or not isinstance(answer.get("device_code"), str):
        raise refusal(status, answer, account, url)
    page = answer.get("verification_uri") or answer.get("verification_url")
    lifetime = _seconds(answer.get("expires_in"), 900)
    minutes = max(1, round(lifetime / 60))
    say(f"Open {page} and enter the code {answer.get('user_code')} (within {minutes} min).")
    deadline = time.monotonic() + min(lifetime, wait)
    return _poll_device(
        account, oauth2, str(answer["device_code"]), max(1.0, _seconds(answer.get("interval"), 5)), deadline
    )


def _poll_device(
    account: Account, oauth2: OAuth2, device_code: str, interval: float, deadline: float
) -> Dict[str, Any]:
    url = oauth2.provider.token_url
    form = _client_form(oauth2, account, {"grant_type": DEVICE_GRANT, "device_code": device_code})
    while True:
        time.sleep(interval)
        if time.monotonic() > deadline:
            raise _timed_out(account)
        status, answer = _post(url, form, account.timeout)
        error = answer.get("error")
        if status == 200 and isinstance(answer.get("access_token"), str):
            return answer
        if error == "authorization_pending":
            continue
        if error == "slow_down":  # RFC 8628 3.5: wait 5 s longer from now on
            interval += 5
            continue
        if error in ("access_denied", "authorization_declined"):
            raise _denied(account)
        if error in ("expired_token", "code_expired"):
            raise _timed_out(account)
        raise refusal(status, answer, account, url)


def _seconds(value: Any, default: float) -> float:
    """A positive number of seconds from a provider's JSON (a number or a numeric string)."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return default
    return seconds if 0 < seconds < 10**7 else default


def _timed_out(account: Account) -> TokenProblem:
    return TokenProblem(
        "timeout",
        f"no sign-in for account {account.name} in time; nothing was saved: "
        f"run `mailbox-relay auth {account.name}` again",
    )


def _denied(account: Account) -> TokenProblem:
    return TokenProblem(
        "denied",
        f"the sign-in for account {account.name} was declined; nothing was saved: "
        f"run `mailbox-relay auth {account.name}` again and allow access",
    )


def loopback_flow(account: Account, say: Callable[[str], None], port: int, wait: float) -> Dict[str, Any]:
    """RFC 8252 with PKCE (RFC 7636): the browser comes back to 127.0.0.1 with a code."""
    oauth2 = refreshable(account)
    if not oauth2.provider.authorize_url:
        raise TokenProblem(
            "client",
            f"account {account.name} has no authorize endpoint: "
            "set oauth2_authorize_url, or use --flow device",
        )
    verifier = secrets.token_urlsafe(64)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    state = secrets.token_urlsafe(24)
    listener = _Listener(port, state, account)
    try:
        redirect = f"http://127.0.0.1:{listener.port}/"
        query = {
            "response_type": "code",
            "client_id": oauth2.client_id,
            "redirect_uri": redirect,
            "scope": " ".join(oauth2.provider.scopes),
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            **dict(oauth2.provider.authorize_extra),
        }
        joiner = "&" if "?" in oauth2.provider.authorize_url else "?"
        address = f"{oauth2.provider.authorize_url}{joiner}{urlencode(query)}"
        say(f"Open this address in a browser and sign in as {account.username}:\n\n  {address}\n")
        say(f"Waiting up to {max(1, round(wait / 60))} min for the browser to come back to {redirect} ...")
        code = listener.wait(time.monotonic() + wait)
    finally:
        listener.close()
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": redirect,
        "code_verifier": verifier,
    }
    url = oauth2.provider.token_url
    status, answer = _post(url, _client_form(oauth2, account, form), account.timeout)
    if status != 200 or not isinstance(answer.get("access_token"), str):
        raise refusal(status, answer, account, url)
    return answer


class _Listener:
    """A one-shot HTTP listener on 127.0.0.1 for the browser's redirect. It answers only a
    request that carries our `state` (anything else could be a forged redirect)."""

    def __init__(self, port: int, state: str, account: Account) -> None:
        from http.server import BaseHTTPRequestHandler, HTTPServer

        listener = self
        self.state = state
        self.account = account
        self.result: Optional[Tuple[str, str]] = None  # ("code" | "error", value)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = {key: values[0] for key, values in parse_qs(urlsplit(self.path).query).items()}
                status, page = listener.answer(query)
                body = f"<!doctype html><title>mailbox-relay</title><p>{page}</p>\n".encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # the URL holds the code
                pass

        try:
            self.server = HTTPServer(("127.0.0.1", port), Handler)
        except OSError as error:
            raise TokenProblem(
                "client",
                f"cannot listen on 127.0.0.1:{port} ({error.strerror or error}): choose another --port",
            ) from None
        self.server.timeout = 0.5
        self.port = int(self.server.server_address[1])

    def answer(self, query: Dict[str, str]) -> Tuple[int, str]:
        if not secrets.compare_digest(query.get("state", ""), self.state):
            return 400, "This is not the sign-in mailbox-relay is waiting for."
        if "code" in query:
            self.result = ("code", query["code"])
            return (
                200,
                f"mailbox-relay: account {self.account.name} is authorised. You can close this window.",
            )
        self.result = ("error", query.get("error", "no code"))
        return (
            200,
            f"mailbox-relay: the sign-in for account {self.account.name} did not complete "
            f"({html.escape(self.result[1][:80])}).",
        )

    def wait(self, deadline: float) -> str:
        while self.result is None:
            if time.monotonic() > deadline:
                raise _timed_out(self.account)
            self.server.handle_request()
        kind, value = self.result
        if kind == "code":
            return value
        if value == "access_denied":
            raise _denied(self.account)
        raise TokenProblem(
            "client",
            f"the sign-in for account {self.account.name} failed ({value[:80]}): check its oauth2_ settings",
        )

    def close(self) -> None:
        self.server.server_close()
