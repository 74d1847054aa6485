"""A local Microsoft Graph (and its Entra token endpoint) over real HTTP on loopback, built from
../shared/reference/microsoft-graph.md, for the tests and the bench.

What it does as Exchange Online does, quirks included:
- tokens: the client credentials grant with a secret or a certificate assertion it verifies
  (signature by thumbprint, aud, iss = sub, jti once, times); Entra's error shapes and AADSTS
  codes (7000215 wrong secret, 700016 unknown app, 90002 unknown tenant, 1002012 bad scope,
  700027 bad signature); 401 InvalidAuthenticationToken for a missing or expired token;
- delta per folder: pages of `Prefer: odata.maxpagesize` (default 10) with `@odata.nextLink`
  until the `@odata.deltaLink`; later rounds bring adds, updates and `@removed`;
  `changeType=created` keeps only adds; `$filter=receivedDateTime ge` on the first call only;
  `expire_sync_states()` makes every stored link answer 410 SyncStateNotFound;
- ids: each message has an immutable id, and a regular id that changes on every move; only a
  request with `Prefer: IdType="ImmutableId"` is answered with (and accepts) immutable ids;
- `$value` is regenerated on every download (a render counter and the header order change,
  the Message-ID stays), and 405 through /mailFolders/{f}/messages/{id}/$value;
- PATCH isRead (200), move (201, a new regular id; the old one 404 ErrorItemNotFound), DELETE
  (204, again 404);
- throttling: at most 4 requests in flight per mailbox (the 5th: 429 ApplicationThrottled with
  Retry-After), and scripted 429/503 answers with Retry-After;
- an application access policy: a restricted mailbox answers 403 ErrorAccessDenied "Access to
  OData is disabled."; an app with Mail.Read only gets 403 on PATCH, move and DELETE.
"""

from __future__ import annotations

import email.utils
import json
import re
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

from .app_credentials import AssertionRefused, Certificate, b64, verify

TENANT = "contoso.onmicrosoft.com"
CLIENT_ID = "9f1c7e52-1b1e-4a36-9b9c-6a3b0d2b7a11"
SECRET = "Qx58Q~vGZ2.example-secret-value-abcdefgh"
SECRET_ID = "3f6d2e8a-5c1b-4b7e-9a2d-1c0e8f7b6a54"  # what people paste by mistake
WELL_KNOWN = ("inbox", "archive", "deleteditems", "drafts", "sentitems", "junkemail")
CONCURRENCY = 4  # Graph's Outlook limit: requests in flight per app per mailbox


def _id(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(30).replace("_", "-") + "="


@dataclass
class Message:
    immutable: str
    regular: str
    raw: bytes
    folder: str
    received: str  # ISO 8601, Z
    is_read: bool = False
    modified: str = ""
    downloads: int = 0
    deleted: bool = False


@dataclass
class Folder:
    id: str
    name: str
    well_known: str = ""
    log: List[Tuple[int, str, str]] = field(default_factory=list)  # (generation, created|updated|removed, id)


@dataclass
class Mailbox:
    upn: str
    object_id: str
    folders: Dict[str, Folder] = field(default_factory=dict)
    in_flight: int = 0


class LocalGraph(threading.Thread):
    def __init__(self, *, lifetime: int = 3600, delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.lock = threading.RLock()
        self.lifetime = lifetime
        self.delay = delay  # seconds each Graph request takes: makes concurrency visible
        self.certificate = Certificate()
        self.roles: Set[str] = {"Mail.ReadWrite"}
        self.restricted: Set[str] = set()  # mailboxes an application access policy excludes
        self.mailboxes: Dict[str, Mailbox] = {}
        self.messages: Dict[str, Message] = {}  # by immutable id
        self.regular: Dict[str, str] = {}  # every regular id a message had -> its immutable id
        self.tokens: Dict[str, float] = {}  # access token -> expires at
        self.sync_states: Dict[str, Tuple[str, int, str]] = {}  # deltatoken -> folder, generation, changeType
        self.skip_states: Dict[str, Dict[str, Any]] = {}  # skiptoken -> the round in progress
        self.generation = 0
        self.scripted: List[Tuple[int, float]] = []  # (429 | 503, Retry-After) for the next requests
        self.seen_jti: Set[str] = set()
        self.token_requests: List[Dict[str, str]] = []
        self.requests: List[Tuple[str, str, float]] = []  # (method, path, when)
        self.without_immutable: List[str] = []  # message requests that did not ask for immutable ids
        self.max_in_flight = 0
        self.throttled = 0
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.server.request_queue_size = 64
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.graph_url = f"{self.url}/v1.0"
        self.token_url = f"{self.url}/{TENANT}/oauth2/v2.0/token"

    def __enter__(self) -> LocalGraph:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.05)

    # --- what a test does -------------------------------------------------------------------

    def mailbox(self, upn: str, *folders: str) -> Mailbox:
        """A mailbox with the well-known folders and any others by display name."""
        with self.lock:
            box = Mailbox(upn, str(uuid.uuid4()))
            for name in WELL_KNOWN:
                folder = Folder(_id("AAMkAGFolder"), name.capitalize() if name != "inbox" else "Inbox", name)
                box.folders[folder.id] = folder
            for name in folders:
                folder = Folder(_id("AAMkAGFolder"), name)
                box.folders[folder.id] = folder
            self.mailboxes[upn.lower()] = box
            return box

    def folder(self, upn: str, name: str) -> Folder:
        box = self.mailboxes[upn.lower()]
        for folder in box.folders.values():
            if name in (folder.well_known, folder.name, folder.id):
                return folder
        raise KeyError(name)

    def deliver(
        self, upn: str, raw: bytes, folder: str = "inbox", received: Optional[float] = None
    ) -> Message:
        """A message arrives in a folder."""
        with self.lock:
            target = self.folder(upn, folder)
            stamp = _iso(received if received is not None else time.time())
            message = Message(
                _id("AAkALgAAAAAAHYQDEapmEc2byACqAC-EWg0A"), _id("AAMkAGI2T"), raw, target.id, stamp
            )
            message.modified = stamp
            self.messages[message.immutable] = message
            self.regular[message.regular] = message.immutable
            self._log(target, "created", message.immutable)
            return message

    def in_folder(self, upn: str, folder: str) -> List[Message]:
        target = self.folder(upn, folder)
        with self.lock:
            return [m for m in self.messages.values() if m.folder == target.id and not m.deleted]

    def move(self, message: Message, upn: str, folder: str) -> None:
        """A person (or a rule) moves a message: a new regular id, the same immutable one."""
        with self.lock:
            self._move(message, self.folder(upn, folder))

    def mark_read(self, message: Message) -> None:
        with self.lock:
            message.is_read = True
            message.modified = _iso(time.time())
            self._log(self._folder_of(message), "updated", message.immutable)

    def expire_sync_states(self) -> None:
        """Exchange dropped its cache of sync generations: every stored link answers 410."""
        with self.lock:
            self.sync_states.clear()
            self.skip_states.clear()

    def script(self, status: int, retry_after: float, count: int = 1) -> None:
        with self.lock:
            self.scripted.extend([(status, retry_after)] * count)

    def account(self, upn: str, tmp: Any, *, certificate: bool = False, **keys: Any) -> Dict[str, Any]:
        """The account keys that point mailbox-relay at this Graph as this app."""
        table: Dict[str, Any] = {
            "source": "graph",
            "auth": "client_credentials",
            "username": upn,
            "oauth2_client_id": CLIENT_ID,
            "oauth2_tenant": TENANT,
            "oauth2_token_url": self.token_url,
            "graph_url": self.graph_url,
            "spool_dir": str(tmp / "spool"),
        }
        if certificate:
            table["oauth2_certificate_file"] = self.certificate.write(tmp / "app.pem")
        else:
            secret = tmp / "secret"
            secret.write_text(SECRET + "\n")
            secret.chmod(0o600)
            table["oauth2_client_secret_file"] = str(secret)
        table.update(keys)
        return table

    # --- the store ------------------------------------------------------------------------------

    def _log(self, folder: Folder, kind: str, immutable: str) -> None:
        self.generation += 1
        folder.log.append((self.generation, kind, immutable))

    def _folder_of(self, message: Message) -> Folder:
        for box in self.mailboxes.values():
            if message.folder in box.folders:
                return box.folders[message.folder]
        raise KeyError(message.folder)

    def _move(self, message: Message, target: Folder) -> None:
        self._log(self._folder_of(message), "removed", message.immutable)
        message.folder = target.id
        message.regular = _id("AAMkAGI2T")  # a move changes the regular id
        self.regular[message.regular] = message.immutable
        message.modified = _iso(time.time())
        self._log(target, "created", message.immutable)

    def _find(self, box: Mailbox, ident: str, immutable: bool) -> Optional[Message]:
        message = self.messages.get(ident) if immutable else self.messages.get(self.regular.get(ident, ""))
        if message is None or message.deleted or message.folder not in box.folders:
            return None
        if not immutable and message.regular != ident:  # an old regular id: moved since
            return None
        return message

    def render(self, message: Message) -> bytes:
        """The MIME, rebuilt on each download as Exchange does: the Message-ID stays, but the
        header order and a render stamp change, so two downloads never have the same SHA1."""
        message.downloads += 1
        head, _, body = message.raw.partition(b"\r\n\r\n")
        if not body and b"\n\n" in message.raw:
            head, _, body = message.raw.partition(b"\n\n")
        lines = re.split(rb"\r?\n(?![ \t])", head)
        turn = message.downloads % max(1, len(lines))
        lines = lines[turn:] + lines[:turn]
        stamp = f"X-MS-Exchange-Render: {message.downloads}; {secrets.token_hex(8)}".encode()
        importance = b"Importance: " + (b"low" if message.is_read else b"normal")
        return b"\r\n".join([stamp, importance, *lines]) + b"\r\n\r\n" + body

    # --- tokens -------------------------------------------------------------------------------

    def token(self, path: str, form: Dict[str, str]) -> Tuple[int, Dict[str, Any]]:
        self.token_requests.append(dict(form))
        tenant = path.split("/")[1]
        if tenant != TENANT:
            return _aad(400, "invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if form.get("grant_type") != "client_credentials":
            return _aad(400, "unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("client_id") != CLIENT_ID:
            return _aad(
                400,
                "unauthorized_client",
                700016,
                f"Application with identifier '{form.get('client_id')}' was not found in the directory.",
            )
        scope = form.get("scope", "")
        if not scope.endswith("/.default") or " " in scope:
            return _aad(400, "invalid_scope", 1002012, f"The provided value for scope {scope} is not valid.")
        if "client_assertion" in form:
            if form.get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer":
                return _aad(400, "invalid_request", 50027, "Invalid client_assertion_type.")
            try:
                verify(
                    form["client_assertion"],
                    self.certificate,
                    audience=self.token_url,
                    issuer=CLIENT_ID,
                    seen=self.seen_jti,
                )
            except AssertionRefused as refused:
                return _aad(401, "invalid_client", refused.code, f"Client assertion refused: {refused.why}.")
        elif form.get("client_secret") != SECRET:
            return _aad(
                401,
                "invalid_client",
                7000215,
                "Invalid client secret provided. Ensure the secret being sent in the request is the "
                f"client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'.",
            )
        claims = {
            "aud": "https://graph.microsoft.com",
            "appid": CLIENT_ID,
            "roles": sorted(self.roles),
            "exp": int(time.time() + self.lifetime),
        }
        access = (
            ".".join(b64(json.dumps(part).encode()) for part in ({"typ": "JWT", "alg": "RS256"}, claims))
            + "."
            + secrets.token_urlsafe(32)
        )
        with self.lock:
            self.tokens[access] = time.time() + self.lifetime
        return 200, {
            "token_type": "Bearer",
            "expires_in": self.lifetime,
            "ext_expires_in": self.lifetime,
            "access_token": access,
        }

    def forget_tokens(self) -> None:
        with self.lock:
            self.tokens.clear()

    # --- Graph ----------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Any, body: bytes
    ) -> Tuple[int, Dict[str, str], bytes]:
        """One Graph request: (status, headers, body)."""
        self.requests.append((method, target, time.time()))
        auth = headers.get("Authorization", "")
        with self.lock:
            expires = self.tokens.get(auth[7:], 0.0) if auth.startswith("Bearer ") else 0.0
        if expires < time.time():
            return _error(
                401,
                "InvalidAuthenticationToken",
                "Access token has expired or is not yet valid.",
                {"WWW-Authenticate": 'Bearer realm="", error="invalid_token"'},
            )
        parts = urlsplit(target)
        path = unquote(parts.path)
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        found = re.match(r"^/v1\.0/users/([^/]+)(/.*)?$", path)
        if not found:
            return _error(400, "BadRequest", "Resource not found for the segment.")
        user = found.group(1)
        with self.lock:
            box = self.mailboxes.get(user.lower()) or next(
                (b for b in self.mailboxes.values() if b.object_id == user), None
            )
        if box is None:
            return _error(404, "ErrorInvalidUser", f"The requested user '{user}' is invalid.")
        if box.upn.lower() in self.restricted:
            return _error(403, "ErrorAccessDenied", "Access to OData is disabled.")
        with self.lock:
            scripted = self.scripted.pop(0) if self.scripted else None
            if scripted is None and box.in_flight >= CONCURRENCY:
                scripted = (429, 1.0)
            if scripted is not None:
                self.throttled += 1
                status, after = scripted
                code = "ApplicationThrottled" if status == 429 else "ServiceUnavailable"
                said = "Application is over its MailboxConcurrency limit." if status == 429 else "Try again."
                return _error(status, code, said, {"Retry-After": f"{after:g}"})
            box.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, box.in_flight)
        try:
            if self.delay:
                time.sleep(self.delay)
            immutable = 'IdType="ImmutableId"' in headers.get("Prefer", "")
            rest = found.group(2) or ""
            if rest.startswith(("/messages", "/mailFolders")) and "/messages" in rest and not immutable:
                self.without_immutable.append(f"{method} {rest}")
            with self.lock:
                return self._route(method, box, rest, query, headers, body, immutable)
        finally:
            with self.lock:
                box.in_flight -= 1

    def _route(
        self,
        method: str,
        box: Mailbox,
        rest: str,
        query: Dict[str, str],
        headers: Any,
        body: bytes,
        immutable: bool,
    ) -> Tuple[int, Dict[str, str], bytes]:
        if rest in ("", "/"):
            return _json(200, {"id": box.object_id, "userPrincipalName": box.upn, "mail": box.upn})
        if rest == "/mailFolders" and method == "GET":
            wanted = re.match(r"^displayName eq '(.*)'$", query.get("$filter", ""))
            folders = [
                f for f in box.folders.values() if not wanted or f.name == wanted.group(1).replace("''", "'")
            ]
            return _json(200, {"value": [self._folder_json(f) for f in folders]})
        found = re.match(r"^/mailFolders(?:\('([^']+)'\)|/([^/]+))(/.*)?$", rest)
        if found:
            ident = found.group(1) or found.group(2)
            folder = next((f for f in box.folders.values() if ident in (f.id, f.well_known)), None)
            if folder is None:
                return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            tail = found.group(3) or ""
            if tail == "" and method == "GET":
                return _json(200, self._folder_json(folder))
            if tail == "/messages/delta" and method == "GET":
                return self._delta(box, folder, query, headers, immutable)
            if re.match(r"^/messages/[^/]+/\$value$", tail):
                return _error(405, "ErrorInvalidRequest", "The OData request is not supported.")
            return _error(400, "BadRequest", "Unsupported segment.")
        found = re.match(r"^/messages/([^/]+)(/\$value|/move)?$", rest)
        if not found:
            return _error(400, "BadRequest", "Resource not found for the segment.")
        message = self._find(box, found.group(1), immutable)
        if message is None:
            return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
        action = found.group(2) or ""
        if action == "/$value" and method == "GET":
            if not self.roles & {"Mail.Read", "Mail.ReadWrite"}:
                return _error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
            return 200, {"Content-Type": "text/plain"}, self.render(message)
        if method in ("PATCH", "POST", "DELETE") and "Mail.ReadWrite" not in self.roles:
            return _error(403, "ErrorAccessDenied", "Access is denied. Check credentials and try again.")
        if action == "" and method == "PATCH":
            changes = json.loads(body or b"{}")
            if "isRead" in changes:
                message.is_read = bool(changes["isRead"])
                message.modified = _iso(time.time())
                self._log(self._folder_of(message), "updated", message.immutable)
            return _json(200, self._message_json(message, immutable))
        if action == "/move" and method == "POST":
            destination = str(json.loads(body or b"{}").get("destinationId", ""))
            target = next((f for f in box.folders.values() if destination in (f.id, f.well_known)), None)
            if target is None:
                return _error(404, "ErrorItemNotFound", "The specified object was not found in the store.")
            self._move(message, target)
            return _json(201, self._message_json(message, immutable))
        if action == "" and method == "DELETE":
            message.deleted = True
            self._log(self._folder_of(message), "removed", message.immutable)
            return 204, {}, b""
        return _error(405, "ErrorInvalidRequest", "The OData request is not supported.")

    def _folder_json(self, folder: Folder) -> Dict[str, Any]:
        inside = [m for m in self.messages.values() if m.folder == folder.id and not m.deleted]
        return {
            "id": folder.id,
            "displayName": folder.name,
            "totalItemCount": len(inside),
            "unreadItemCount": sum(not m.is_read for m in inside),
        }

    def _message_json(self, message: Message, immutable: bool) -> Dict[str, Any]:
        return {
            "@odata.etag": f'W/"{message.modified}"',
            "id": message.immutable if immutable else message.regular,
            "receivedDateTime": message.received,
            "lastModifiedDateTime": message.modified,
            "isRead": message.is_read,
        }

    def _delta(
        self, box: Mailbox, folder: Folder, query: Dict[str, str], headers: Any, immutable: bool
    ) -> Tuple[int, Dict[str, str], bytes]:
        size = 10
        wanted = re.search(r"odata\.maxpagesize=(\d+)", headers.get("Prefer", ""))
        if wanted:
            size = max(1, min(1000, int(wanted.group(1))))
        if "$skiptoken" in query:
            round_ = self.skip_states.pop(query["$skiptoken"], None)
            if round_ is None:
                return _sync_gone()
        elif "$deltatoken" in query:
            state = self.sync_states.get(query["$deltatoken"])
            if state is None or state[0] != folder.id:
                return _sync_gone()
            _, since, change_type = state
            round_ = {"items": self._changes(folder, since, change_type), "change_type": change_type}
        else:
            since_filter = re.match(r"^receivedDateTime (ge|gt) (\S+)$", query.get("$filter", ""))
            items = [
                ("created", m.immutable)
                for m in self.messages.values()
                if m.folder == folder.id
                and not m.deleted
                and (not since_filter or _after(m.received, since_filter.group(2), since_filter.group(1)))
            ]
            round_ = {"items": items, "change_type": query.get("changeType", "")}
            round_["generation"] = self.generation
        round_.setdefault("generation", self.generation)
        page, rest = round_["items"][:size], round_["items"][size:]
        value = []
        for kind, ident in page:
            message = self.messages[ident]
            shown = message.immutable if immutable else message.regular
            if kind == "removed":
                value.append({"id": shown, "@removed": {"reason": "deleted"}})
            else:
                value.append(self._message_json(message, immutable))
        base = f"{self.graph_url}/users/{quote(box.upn)}/mailFolders('{folder.id}')/messages/delta"
        answer: Dict[str, Any] = {"value": value}
        if rest:
            token = secrets.token_urlsafe(24)
            self.skip_states[token] = {**round_, "items": rest}
            answer["@odata.nextLink"] = f"{base}?{urlencode({'$skiptoken': token})}"
        else:
            token = secrets.token_urlsafe(24)
            self.sync_states[token] = (folder.id, round_["generation"], round_["change_type"])
            answer["@odata.deltaLink"] = f"{base}?{urlencode({'$deltatoken': token})}"
        return _json(200, answer, {"Preference-Applied": f"odata.maxpagesize={size}"})

    def _changes(self, folder: Folder, since: int, change_type: str) -> List[Tuple[str, str]]:
        """The latest change of each message since the generation, in order."""
        latest: Dict[str, str] = {}
        for generation, kind, ident in folder.log:
            if generation > since:
                previous = latest.pop(ident, None)
                latest[ident] = "created" if previous == "created" and kind == "updated" else kind
        items = list(latest.items())
        if change_type:
            items = [(ident, kind) for ident, kind in items if kind == change_type]
        return [(kind, ident) for ident, kind in items]

    def _handler(self) -> Any:
        graph = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()  # headers and body go out as two writes: no Nagle stall between them
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _body(self) -> bytes:
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _answer(self, status: int, headers: Dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                body = self._body()
                if self.path.endswith("/oauth2/v2.0/token"):
                    form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                    status, answer = graph.token(urlsplit(self.path).path, form)
                    self._answer(status, {"Content-Type": "application/json"}, json.dumps(answer).encode())
                    return
                self._answer(*graph.handle("POST", self.path, self.headers, body))

            def do_GET(self) -> None:
                self._answer(*graph.handle("GET", self.path, self.headers, b""))

            def do_PATCH(self) -> None:
                self._answer(*graph.handle("PATCH", self.path, self.headers, self._body()))

            def do_DELETE(self) -> None:
                self._answer(*graph.handle("DELETE", self.path, self.headers, b""))

            def log_message(self, *args: object) -> None:
                pass

        return Handler


def _iso(when: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


def _after(received: str, bound: str, op: str) -> bool:
    bound = bound if "T" in bound else bound + "T00:00:00Z"
    return received >= bound if op == "ge" else received > bound


def _json(
    status: int, body: Dict[str, Any], headers: Optional[Dict[str, str]] = None
) -> Tuple[int, Dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _error(
    status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None
) -> Tuple[int, Dict[str, str], bytes]:
    inner = {"date": email.utils.formatdate(usegmt=True), "request-id": secrets.token_hex(16)}
    return _json(status, {"error": {"code": code, "message": message, "innerError": inner}}, headers)


def _sync_gone() -> Tuple[int, Dict[str, str], bytes]:
    return _error(
        410,
        "SyncStateNotFound",
        "The sync state generation is not found; generation=149;[highest=157][157][155][156].",
    )


def _aad(status: int, error: str, code: int, description: str) -> Tuple[int, Dict[str, Any]]:
    return status, {
        "error": error,
        "error_description": f"AADSTS{code}: {description} Trace ID: {secrets.token_hex(8)} "
        f"Timestamp: {_iso(time.time())}",
        "error_codes": [code],
        "timestamp": _iso(time.time()),
        "trace_id": secrets.token_hex(8),
        "correlation_id": secrets.token_hex(8),
        "error_uri": f"https://login.microsoftonline.com/error?code={code}",
    }
