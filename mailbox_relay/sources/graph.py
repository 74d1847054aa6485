"""The Microsoft Graph source of `fetch`, `watch` and `check --account` (source = "graph"):
one mailbox (a user's or a shared one) read by an app registration, over HTTPS.

How it keeps the promises (the facts are in docs/ and the README's Graph section):
- New mail is what a delta round per folder brings (`changeType=created`: arrivals and moves
  in, not flag changes), page by page (`@odata.nextLink`) until the `@odata.deltaLink`, which
  is the folder's cursor (`Listing.final`), stored only once the whole round is handled.
- Keys are immutable ids (`Prefer: IdType="ImmutableId"` on every request), which survive
  moves; delivered ones are recorded (`Listing.remember`), so a resync after an expired delta
  link (410 SyncStateNotFound) delivers nothing twice.
- Exchange rebuilds the MIME on every download, so `$value` is downloaded once into a spool
  file (0600 in a 0700 directory, streamed: memory stays bounded) and every retry, and a run
  after a crash, posts those bytes. A spooled message is removed only after it was
  acknowledged and the state recorded that (at the next pass).
- Throttling: at most 4 requests in flight per mailbox in this process (Graph's limit), and
  429/503 Retry-After honoured. Every request is bounded as a whole by `timeout` in any
  thread (deadline.py), never follows a redirect, and goes through sessions.new_session.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import email.utils
import hashlib
import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import quote, urlsplit

from mailbox_relay.accounts import Account, After
from mailbox_relay.sources.mailbox import Key, Listing, Opened, SourceProblem

if TYPE_CHECKING:
    import requests

CONCURRENT = 4  # Graph's limit of requests in flight per app and mailbox
PAGE_SIZE = 100  # Prefer: odata.maxpagesize (Graph's default is 10)
MIN_RATE = 64 * 1024  # bytes a second a download must keep up, beyond `timeout`
MAX_WAIT = 60.0  # a Retry-After longer than this ends the pass ("unavailable"): later
THROTTLE_TRIES = 6  # 429/503 answers in a row before the pass gives up for now
START_NEW = "start:new"  # the cursor of a first round that delivers nothing (start = "new")
RESYNC_CODES = ("syncstatenotfound", "resyncrequired", "syncstateinvalid")
WELL_KNOWN = (
    "inbox",
    "archive",
    "clutter",
    "conflicts",
    "deleteditems",
    "drafts",
    "junkemail",
    "outbox",
    "sentitems",
)
SELECT = "receivedDateTime,lastModifiedDateTime"
ACKED_KEEP = 86400.0  # seconds an acknowledged spool file of another process is kept (a crash)

_SLOTS: Dict[Tuple[str, str], threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


class GraphProblem(SourceProblem):
    """Kinds: login (the app may not: a person fixes a permission or a policy) | folder |
    after | unavailable (throttled) | network | protocol."""


def _slots(account: Account) -> threading.BoundedSemaphore:
    """The one semaphore of a mailbox in this process: watch's folders share it."""
    key = (account.graph_url, account.username.lower())
    with _SLOTS_LOCK:
        return _SLOTS.setdefault(key, threading.BoundedSemaphore(CONCURRENT))


class GraphError(Exception):
    """A Graph answer that is not 2xx: its status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class Client:
    """Graph requests for one account: a token on each (renewed once on a 401), the immutable-id
    preference, the mailbox's concurrency slots, Retry-After, and a whole-request deadline."""

    def __init__(self, account: Account) -> None:
        from mailbox_relay import __version__
        from mailbox_relay.sessions import new_session
        from mailbox_relay.sources.oauth2 import token_source

        self.account = account
        self.base = account.graph_url.rstrip("/")
        self.user = f"{self.base}/users/{quote(account.username, safe='@')}"
        self.tokens = token_source(account)
        self.session = new_session(
            account.graph_url, f"mailbox-relay/{__version__}", verify=account.ca_bundle, threaded=True
        )
        self.slots = _slots(account)

    def close(self) -> None:
        self.session.close()

    def json(self, method: str, url: str, what: str, body: Any = None, page: bool = False) -> Dict[str, Any]:
        with self.request(method, url, what, body=body, page=page) as response:
            try:
                answer = response.json() if response.content else {}
            except ValueError:
                raise GraphProblem("protocol", f"Graph answered {what} with something not JSON") from None
        return answer if isinstance(answer, dict) else {}

    @contextlib.contextmanager
    def request(
        self, method: str, url: str, what: str, *, body: Any = None, page: bool = False, stream: bool = False
    ) -> Iterator[requests.Response]:
        """A 2xx answer, inside the deadline (a streamed body is read inside the block); a
        GraphError for any other status, after Retry-After and one token renewal."""
        renewed = False
        for attempt in range(THROTTLE_TRIES + 1):
            with self.slots, self._sent(method, url, what, body, page, stream) as response:
                status = response.status_code
                if 200 <= status < 300:
                    yield response
                    return
                if status == 401 and not renewed:
                    renewed = True
                    self._renew()
                    continue
                error = _error_of(response)
                wait = _retry_after(response, attempt) if status in (429, 503) else None
            if wait is None or attempt == THROTTLE_TRIES:
                raise error
            if wait > MAX_WAIT:
                raise GraphProblem(
                    "unavailable",
                    f"Graph throttles mailbox {self.account.username} (HTTP {status}, Retry-After "
                    f"{wait:.0f}s); trying again later",
                )
            time.sleep(wait)  # outside the slot: the others may go on meanwhile
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def _sent(
        self, method: str, url: str, what: str, body: Any, page: bool, stream: bool
    ) -> Iterator[requests.Response]:
        import requests

        from mailbox_relay.deadline import bounded

        self._check_url(url)
        token = self._token()
        prefer = 'IdType="ImmutableId"' + (f", odata.maxpagesize={PAGE_SIZE}" if page else "")
        headers = {"Authorization": f"Bearer {token.access}", "Prefer": prefer, "Accept": "application/json"}
        seconds = self.account.timeout + (3600.0 if stream else 0.0)  # a download's own bound is below
        with bounded(seconds, what) as guard:
            try:
                response = self.session.request(
                    method,
                    url,
                    json=body,
                    headers=headers,
                    timeout=self.account.timeout,
                    allow_redirects=False,
                    stream=stream,
                )
                try:
                    yield response
                finally:
                    response.close()
            except requests.RequestException as error:
                if guard.expired:
                    raise self._too_slow(what, guard.seconds) from None
                raise GraphProblem(
                    "network", f"cannot reach Graph at {self.account.host} for {what}: {_why(error)}"
                ) from None
            except OSError:  # the spool file, or a connection shut by the deadline
                if guard.expired:
                    raise self._too_slow(what, guard.seconds) from None
                raise
        if guard.expired:
            raise self._too_slow(what, guard.seconds)

    def _too_slow(self, what: str, seconds: float) -> GraphProblem:
        return GraphProblem(
            "network",
            f"Graph at {self.account.host} did not answer {what} within {seconds:.3g}s; trying again later",
        )

    def _check_url(self, url: str) -> None:
        """Links Graph hands back (nextLink, deltaLink) must point where graph_url does: a token
        goes to the endpoint configured, or nowhere."""
        mine, theirs = urlsplit(self.base), urlsplit(url)
        if (theirs.scheme, theirs.netloc) != (mine.scheme, mine.netloc):
            raise GraphProblem(
                "protocol", f"Graph handed back a link to {theirs.scheme}://{theirs.netloc}, not to graph_url"
            )

    def _token(self) -> Any:
        from mailbox_relay.sources.oauth2 import TokenProblem

        try:
            return self.tokens.current()
        except TokenProblem as problem:
            raise _token_problem(problem) from None

    def _renew(self) -> None:
        from mailbox_relay.sources.oauth2 import TokenProblem

        try:
            self.tokens.renew(self.tokens.current())
        except TokenProblem as problem:
            raise _token_problem(problem) from None


def _token_problem(problem: Any) -> GraphProblem:
    """A refused app credential needs a person ("login": watch stops after a few tries)."""
    kind = {"grant": "login", "client": "login"}.get(problem.kind, "network")
    return GraphProblem(kind, problem.line)


def _error_of(response: requests.Response) -> GraphError:
    try:
        inner = response.json().get("error", {})
        code, message = str(inner.get("code", "")), str(inner.get("message", ""))
    except (ValueError, AttributeError):
        code, message = "", ""
    message = "".join(c if c.isprintable() else " " for c in message)[:200]
    return GraphError(response.status_code, code or response.reason or "", message)


def _retry_after(response: requests.Response, attempt: int) -> float:
    """Retry-After in seconds or as an HTTP date; without one, 1, 2, 4... seconds."""
    value = response.headers.get("Retry-After", "").strip()
    if value:
        with contextlib.suppress(ValueError):
            return max(0.0, float(value))
        with contextlib.suppress(TypeError, ValueError):
            when = email.utils.parsedate_to_datetime(value)
            return max(0.0, when.timestamp() - time.time())
    return float(2**attempt)


def _why(error: Exception) -> str:
    reason: BaseException = error
    while reason.__context__ is not None and not isinstance(reason, OSError):
        reason = reason.__context__
    return getattr(reason, "strerror", None) or type(reason).__name__


def refused(error: GraphError, account: Account, what: str) -> GraphProblem:
    """A Graph refusal as one line that says who can fix it."""
    mailbox = account.username
    if error.status == 403 and "odata is disabled" in error.message.lower():
        return GraphProblem(
            "login",
            f"Graph refused {what} (403 {error.code}: {error.message}): an application access policy "
            f"or RBAC for Applications scope excludes mailbox {mailbox} from this app; add it to the "
            "policy's group or the management scope (changes take up to an hour)",
        )
    if error.status == 403:
        wanted = (
            "Mail.Read"
            if what.startswith(("the folder", "the delta", "the message's MIME"))
            else "Mail.ReadWrite"
        )
        return GraphProblem(
            "login",
            f"Graph refused {what} (403 {error.code}: {error.message}): the app needs the application "
            f"permission {wanted} with admin consent"
            + (' (or set after = "keep")' if wanted == "Mail.ReadWrite" else ""),
        )
    if error.status == 401:
        return GraphProblem(
            "login",
            f"Graph refused the app's token for {what} ({error.code}: {error.message}): check graph_url "
            "against the token's cloud, and oauth2_tenant",
        )
    if error.status == 404 and error.code in (
        "ErrorInvalidUser",
        "ResourceNotFound",
        "MailboxNotEnabledForRESTAPI",
    ):
        return GraphProblem(
            "login",
            f"Graph has no mailbox {mailbox} ({error.code}: {error.message}): check username "
            "(the mailbox's address or object id)",
        )
    if error.status in (429, 503) or error.status >= 500:
        return GraphProblem("unavailable", f"Graph answered {what} with {error}; trying again later")
    return GraphProblem("protocol", f"Graph refused {what} ({error}); if it goes on, check the account")


class Spool:
    """Downloaded messages waiting to be acknowledged, one file each, named by a hash of the
    key: `.eml` while waiting, `.acked` once acknowledged (removed at the next pass, when the
    state has recorded it; a crash in between finds the same bytes again)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._made = False

    def path(self, key: Key, suffix: str = ".eml") -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:40] + suffix)

    def make(self) -> None:
        if not self._made:
            try:
                os.makedirs(self.directory, mode=0o700, exist_ok=True)
                os.chmod(self.directory, 0o700)
            except OSError as error:
                from mailbox_relay.outcome import ConfigError

                raise ConfigError(
                    f"cannot use the spool directory {self.directory} ({error.strerror or error}): "
                    "set spool_dir"
                ) from None
            self._made = True

    def find(self, key: Key) -> Optional[str]:
        for suffix in (".eml", ".acked"):
            path = self.path(key, suffix)
            if os.path.exists(path):
                return path
        return None

    def acked(self, key: Key) -> Optional[str]:
        path = self.path(key)
        done = self.path(key, ".acked")
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, done)
        return done if os.path.exists(done) else None

    def sweep(self, paths: Sequence[str]) -> None:
        """Remove acknowledged files: those this process acknowledged before (recorded by now),
        and any left by a crash long enough ago that every pass since has seen them."""
        for path in paths:
            with contextlib.suppress(OSError):
                os.unlink(path)
        with contextlib.suppress(OSError):
            now = time.time()
            for entry in os.scandir(self.directory):
                if entry.name.endswith((".acked", ".part")) and now - entry.stat().st_mtime > ACKED_KEEP:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


class GraphSource:
    """One mailbox over Graph as fetch and watch see every source (sources/mailbox.py): keys
    are immutable ids, the epoch is "", the cursor a delta link (JSON: the folder, the link,
    and what a resync must leave alone)."""

    key_label = "message"

    def __init__(self, account: Account) -> None:
        self.account = account
        self.client = Client(account)
        assert account.spool_dir is not None
        self.spool = Spool(account.spool_dir)
        self.name = ""
        self.folder_id = ""
        self._folders: Dict[str, Dict[str, Any]] = {}
        self._acked: List[str] = []

    # --- folders -------------------------------------------------------------------------------

    def folder(self, name: str) -> Dict[str, Any]:
        """The folder's JSON (id, displayName, totalItemCount): a well-known name, else the one
        top-level folder with this display name."""
        what = f"the folder {name!r}"
        try:
            if name.lower() in WELL_KNOWN:
                return self.client.json("GET", f"{self.client.user}/mailFolders/{name.lower()}", what)
            quoted = "'" + name.replace("'", "''") + "'"  # OData doubles a quote inside one
            found = self.client.json(
                "GET",
                f"{self.client.user}/mailFolders?$filter={quote(f'displayName eq {quoted}')}",
                what,
            ).get("value", [])
            if len(found) == 1:
                return dict(found[0])
            every = self.client.json("GET", f"{self.client.user}/mailFolders?$top=100", "the folder list")
        except GraphError as error:
            raise refused(error, self.account, what) from None
        names = ", ".join(str(f.get("displayName")) for f in every.get("value", [])[:20])
        raise GraphProblem(
            "folder",
            f"there is no folder {name!r} in mailbox {self.account.username} (account {self.account.name}); "
            f"it has: {names or 'no folders'} (and the well-known names: {', '.join(WELL_KNOWN)})",
        )

    def open(self, name: str) -> Opened:
        self.spool.sweep(self._acked)
        self._acked = []
        info = self.folder(name)
        self._folders[name] = info
        self.name, self.folder_id = name, str(info["id"])
        if self.account.after.action == "move":
            self._target()
        return Opened("", int(info.get("totalItemCount") or 0), START_NEW)

    def _target(self) -> str:
        folder = self.account.after.folder
        if folder not in self._folders:
            try:
                self._folders[folder] = self.folder(folder)
            except GraphProblem as problem:
                raise GraphProblem(
                    "folder", f"after = move:{folder} of account {self.account.name}: {problem.line}"
                ) from None
        return str(self._folders[folder]["id"])

    # --- listing -------------------------------------------------------------------------------

    def listing(
        self, cursor: Optional[str], since: Optional[datetime.date], through: Optional[str] = None
    ) -> Listing:
        """What is new after the delta link (or, without one, per start); `through` needs no
        use: the first round's delta link passes everything the date left alone."""
        try:
            return self._listing(cursor, since)
        except GraphError as error:
            raise refused(error, self.account, "the delta round") from None

    def _listing(self, cursor: Optional[str], since: Optional[datetime.date]) -> Listing:
        started = time.time()
        if cursor == START_NEW:  # the first round of start = "new": everything there now is old
            link, _ = self._round(self._first_url(None), collect=False)
            return Listing(
                [], final=_cursor(self.folder_id, link, floor=_iso(started), seen=started), remember=True
            )
        if cursor is None:
            floor = since.isoformat() if since is not None else None
            link, keys = self._round(self._first_url(since), collect=True)
            return Listing(keys, final=_cursor(self.folder_id, link, floor, started), remember=True)
        state = _parse_cursor(cursor)
        if state.get("folder") == self.folder_id:
            try:
                link, keys = self._round(str(state["delta"]), collect=True)
                return Listing(
                    keys, final=_cursor(self.folder_id, link, state.get("floor"), started), remember=True
                )
            except GraphError as error:
                if not _resync(error):
                    raise refused(error, self.account, "the delta round") from None
        return self._resync(state, started)

    def _resync(self, state: Mapping[str, Any], started: float) -> Listing:
        """The delta link expired (410 SyncStateNotFound) or the folder was made anew: a full
        round, from which the rules deliver only what is not recorded. What the account's start
        left alone stays alone: a message received before its floor counts only if it changed
        since the last round began (a move in, with its old date)."""
        floor, seen = state.get("floor"), float(state.get("seen") or 0)
        link, found = self._round(self._first_url(None), collect=True, dates=True)
        changed_since = _iso(seen - 300) if seen else ""
        keys = [
            key
            for key, (received, modified) in found
            if not floor or received >= _bound(str(floor)) or (changed_since and modified >= changed_since)
        ]
        return Listing(keys, final=_cursor(self.folder_id, link, floor, started), remember=True)

    def _first_url(self, since: Optional[datetime.date]) -> str:
        folder = f"{self.client.user}/mailFolders/{quote(self.folder_id, safe='')}"
        url = f"{folder}/messages/delta?changeType=created&$select={SELECT}"
        if since is not None:
            url += f"&$filter={quote(f'receivedDateTime ge {since.isoformat()}T00:00:00Z')}"
        return url

    def _round(self, url: str, collect: bool, dates: bool = False) -> Tuple[str, Any]:
        """Follow nextLinks to the deltaLink: (the delta link, the keys in order — with their
        dates when asked). A key `@removed` later in the round is dropped."""
        found: Dict[str, Tuple[str, str]] = {}
        pages = 0
        while True:
            try:
                answer = self.client.json("GET", url, "the delta round", page=True)
            except GraphError as error:
                if pages == 0 or not _resync(error):
                    raise
                raise GraphError(410, "SyncStateNotFound", "a nextLink expired mid-round") from None
            pages += 1
            for item in answer.get("value", []):
                key = str(item.get("id") or "")
                if not key:
                    continue
                if "@removed" in item:
                    found.pop(key, None)
                elif collect:
                    found[key] = (
                        str(item.get("receivedDateTime") or ""),
                        str(item.get("lastModifiedDateTime") or ""),
                    )
            if "@odata.deltaLink" in answer:
                link = str(answer["@odata.deltaLink"])
                self.client._check_url(link)
                return link, (list(found.items()) if dates else list(found))
            if "@odata.nextLink" not in answer:
                raise GraphProblem(
                    "protocol", "Graph ended a delta round with neither nextLink nor deltaLink"
                )
            url = str(answer["@odata.nextLink"])

    # --- messages ------------------------------------------------------------------------------

    def sizes(self, keys: Sequence[Key]) -> Dict[Key, int]:
        """Each message spooled (downloaded once, at most 4 at a time) and its size; a key
        Graph no longer has is absent (gone)."""
        self.spool.make()
        if not keys:
            return {}
        with ThreadPoolExecutor(CONCURRENT, thread_name_prefix="graph download") as pool:
            paths = list(pool.map(self._spooled, keys))
        return {key: os.path.getsize(path) for key, path in zip(keys, paths) if path is not None}

    def _spooled(self, key: Key) -> Optional[str]:
        found = self.spool.find(key)
        if found is not None:
            return found
        return self._download(key)

    def _download(self, key: Key) -> Optional[str]:
        """GET $value streamed into a .part file, fsynced, renamed: a half download is never
        mistaken for the message."""
        from mailbox_relay.deadline import bounded, watch

        url = f"{self.client.user}/messages/{quote(key, safe='')}/$value"
        path, part = self.spool.path(key), self.spool.path(key, ".part")
        what = "the message's MIME ($value)"
        try:
            with self.client.request("GET", url, what, stream=True) as response:
                size = int(response.headers.get("Content-Length") or 0)
                with bounded(self.account.timeout + size / MIN_RATE, what) as guard:
                    watch(getattr(getattr(response.raw, "connection", None), "sock", None))
                    try:
                        self._write(response, part)
                    except Exception:
                        if guard.expired:
                            raise self.client._too_slow(what, guard.seconds) from None
                        raise
                if guard.expired:
                    raise self.client._too_slow(what, guard.seconds)
        except GraphError as error:
            with contextlib.suppress(OSError):
                os.unlink(part)
            if error.status == 404:
                return None  # deleted (or moved out of reach) before we got to it: gone
            raise refused(error, self.account, what) from None
        os.replace(part, path)
        return path

    def _write(self, response: requests.Response, part: str) -> None:
        import requests

        handle = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(handle, "wb") as out:
                try:
                    for chunk in response.iter_content(64 * 1024):
                        out.write(chunk)
                except requests.RequestException as error:
                    raise GraphProblem(
                        "network", f"the download from Graph at {self.account.host} broke: {_why(error)}"
                    ) from None
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise

    def fetch(self, keys: Sequence[Key], sizes: Mapping[Key, int]) -> Dict[Key, bytes]:
        """The spooled bytes: the first download's, on every call."""
        bodies: Dict[Key, bytes] = {}
        for key in keys:
            path = self.spool.find(key) or self._download(key)
            if path is not None:
                with open(path, "rb") as handle:
                    bodies[key] = handle.read()
        return bodies

    def acknowledge(self, keys: Sequence[Key], after: After) -> None:
        """`after` for messages the ingress accepted; a 404 (moved or deleted already, by us
        before a crash or by someone else) counts as done. Then their spool files are marked
        acknowledged, to be removed at the next pass."""
        if not keys:
            return
        if after.action != "keep":
            target = self._target() if after.action == "move" else ""
            with ThreadPoolExecutor(CONCURRENT, thread_name_prefix="graph after") as pool:
                list(pool.map(lambda key: self._apply(key, after, target), keys))
        for key in keys:
            done = self.spool.acked(key)
            if done is not None:
                self._acked.append(done)

    def _apply(self, key: Key, after: After, target: str) -> None:
        url = f"{self.client.user}/messages/{quote(key, safe='')}"
        try:
            if after.action == "seen":
                self.client.json("PATCH", url, "marking it read", body={"isRead": True})
            elif after.action == "move":
                self.client.json(
                    "POST", f"{url}/move", f"the move to {after.folder}", body={"destinationId": target}
                )
            elif after.action == "delete":
                with self.client.request("DELETE", url, "the delete"):
                    pass
        except GraphError as error:
            if error.status == 404:
                return  # done already: a second move or delete, or someone else's
            problem = refused(error, self.account, f"after = {after}")
            raise GraphProblem(
                "after" if problem.kind in ("unavailable", "network", "protocol") else problem.kind,
                f"the ingress took message {key[-12:]} of {self.account.name}/{self.name}, "
                f"but after = {after} "
                f"failed: {problem.line}",
            ) from None

    # --- watch ---------------------------------------------------------------------------------

    @property
    def waiting(self) -> str:
        return f"polling every {self.account.poll_interval:g}s"

    def start_waiting(self) -> Optional[socket.socket]:
        """Graph has no push a relay behind NAT could receive: watch polls, and the next delta
        round is the news (and the round trip)."""
        return None

    def readable(self) -> bool:
        return False  # never called: there is no socket to watch while waiting

    def stop_waiting(self) -> None:
        """Nothing to end: the pass that follows is the round trip."""

    @property
    def refresh_every(self) -> float:
        return float(self.account.poll_interval)

    def replace_at(self) -> Optional[float]:
        return None  # each request takes a current token

    def close(self) -> None:
        self.spool.sweep(self._acked)
        self._acked = []
        self.client.close()


def connect_source(account: Account) -> GraphSource:
    """The account's Graph source; the first token is asked for now, so a refused credential
    is said before any folder."""
    source = GraphSource(account)
    try:
        source.client._token()
    except BaseException:
        source.close()
        raise
    return source


def _resync(error: GraphError) -> bool:
    return error.status == 410 or error.code.lower() in RESYNC_CODES


def _cursor(folder: str, link: str, floor: Optional[str], seen: float) -> str:
    return json.dumps(
        {"folder": folder, "delta": link, "floor": floor, "seen": round(seen, 3)}, sort_keys=True
    )


def _parse_cursor(cursor: str) -> Dict[str, Any]:
    try:
        state = json.loads(cursor)
    except ValueError:
        return {}
    return state if isinstance(state, dict) else {}


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _bound(floor: str) -> str:
    """A floor as Graph's receivedDateTime compares: a date is its midnight UTC."""
    return floor if "T" in floor else f"{floor}T00:00:00Z"


def token_roles(access: str) -> List[str]:
    """The application permissions (`roles`) an Entra access token carries; not verified, only
    to show what the app was granted. [] when it is not a JWT or has none."""
    parts = access.split(".")
    if len(parts) != 3:
        return []
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return []
    roles = claims.get("roles") if isinstance(claims, dict) else None
    return [str(role) for role in roles] if isinstance(roles, list) else []
