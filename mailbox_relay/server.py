"""`serve`: a local ingress that answers exactly like Action Mailbox's, into a Maildir.

Same checks in the same order as Rails' relay controller: path (404), Basic auth (401), media
type (415), empty body (422, as Rails >= 7.1.4), then 204. With another ingress (postmark,
sendgrid, mailgun, mandrill) the request is taken as that controller takes it
(formats.receive): its path, its Basic auth or signature, its JSON or form. Byte-identical re-posts are
deduplicated the way Rails' unique index on (Message-ID, SHA1 of the bytes) does: for identical
bytes the Message-ID is identical too, so the SHA1 alone is the key.
"""

from __future__ import annotations

import base64
import hmac
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, List, Optional

from mailbox_relay.ingress.formats import RELAY, Ingress, receive
from mailbox_relay.log import Log
from mailbox_relay.maildir import MaildirWriter

UNAUTHORIZED_HEADER = 'Basic realm="Action Mailbox"'


def _authorized(header: Optional[str], password: str) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, given = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    expected = f"actionmailbox:{password}".encode()
    return hmac.compare_digest(f"{user}:{given}".encode(), expected)


MAX_BODY = 1024**3  # larger bodies are refused (413) unread: no message is that big
_READ = 1024 * 1024  # the body is read in pieces of this size, so a lying Content-Length costs nothing


class _Refused(Exception):
    """A request that is refused before its body is read: (status, reason for the log)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


def make_handler(
    password: str, maildir: MaildirWriter, log: Log, ingress: Ingress = RELAY
) -> type[BaseHTTPRequestHandler]:
    class RelayHandler(BaseHTTPRequestHandler):
        server_version = "mailbox-relay-serve"
        protocol_version = "HTTP/1.1"  # keep-alive, as puma does
        timeout = 60  # seconds a connection may stay silent: a stalled client frees its thread

        def do_POST(self) -> None:
            body = self._body()
            if body is None:
                return
            if self.path.split("?")[0] != ingress.path:
                return self._answer(404, "Not Found\n", len(body))
            if ingress.basic_auth and not _authorized(self.headers.get("Authorization"), password):
                return self._answer(401, "HTTP Basic: Access denied.\n", len(body), UNAUTHORIZED_HEADER)
            if ingress is not RELAY:
                return self._wrapped(body)
            media_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if media_type != "message/rfc822":
                return self._answer(415, "", len(body))
            if not body:
                return self._answer(422, "", 0)
            stored, name = maildir.store(body)
            self._answer(204, "", len(body), note=f"new/{name}" if stored else "duplicate, not stored")

        def _wrapped(self, body: bytes) -> None:
            url = f"http://{self.headers.get('Host', '')}{self.path}"  # Rails' request.url
            headers = {name.lower(): value for name, value in self.headers.items()}
            received = receive(ingress, password, url, headers, body)
            notes = [received.why] if received.why else []
            for raw in received.messages:
                stored, name = maildir.store(raw)
                notes.append(f"new/{name}" if stored else "duplicate, not stored")
            self._answer(received.status, "", len(body), note="; ".join(notes))

        def _not_routed(self) -> None:
            """Every other method: Rails routes none of them here (404), but for Mandrill's
            health check (GET or HEAD on its path, 200)."""
            if self._body() is None:
                return
            health = ingress.name == "mandrill" and self.command in ("GET", "HEAD")
            if health and self.path.split("?")[0] == ingress.path:
                return self._answer(200, "", 0)
            self._answer(404, "Not Found\n", 0)

        def __getattr__(self, name: str) -> Any:
            if name.startswith("do_"):  # HEAD, OPTIONS, TRACE, PROPFIND, ...: not 501, but 404
                return self._not_routed
            raise AttributeError(name)

        def _body(self) -> Optional[bytes]:
            """The whole body; None (after answering or logging) if there is none to act on."""
            try:
                return self._read_body()
            except _Refused as refused:
                self.close_connection = True
                self._answer(refused.status, f"{refused}\n", 0, note=str(refused))
            except (OSError, ValueError) as error:  # the client went away mid-body: store nothing
                self.close_connection = True
                where = f"{self.client_address[0]} {self.command} {self.path}"
                log(f"{where}: no complete body ({error}); nothing stored")
            return None

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            return self._read_exactly(self._content_length())

        def _content_length(self) -> int:
            values = {
                value.strip()
                for line in self.headers.get_all("Content-Length") or []
                for value in line.split(",")
            }
            if len(values) > 1:  # which one is true? Rails' puma refuses too
                raise _Refused(400, "conflicting Content-Length headers")
            text = values.pop() if values else "0"
            if not (text.isascii() and text.isdigit()):
                raise _Refused(400, f"Content-Length {text!r} is not a number")
            if int(text) > MAX_BODY:
                raise _Refused(413, f"Content-Length {text} is more than serve accepts ({MAX_BODY} bytes)")
            return int(text)

        def _read_exactly(self, length: int) -> bytes:
            pieces: List[bytes] = []
            left = length
            while left:
                piece = self.rfile.read(min(left, _READ))
                if not piece:
                    raise OSError(f"connection closed after {length - left} of {length} bytes")
                pieces.append(piece)
                left -= len(piece)
            return b"".join(pieces)

        def _read_chunked(self) -> bytes:
            chunks: List[bytes] = []
            total = 0
            while True:
                line = self.rfile.readline(1024)
                if not line:
                    raise OSError("connection closed before the last chunk")
                try:
                    size = int(line.split(b";")[0].strip(), 16)
                except ValueError:
                    raise _Refused(400, "a malformed chunk size") from None
                total += size
                if total > MAX_BODY:
                    raise _Refused(413, f"a chunked body of more than {MAX_BODY} bytes")
                if size == 0:
                    while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self._read_exactly(size))
                self.rfile.readline(1024)

        def _answer(self, status: int, text: str, size: int, authenticate: str = "", note: str = "") -> None:
            payload = b"" if self.command == "HEAD" else text.encode()
            # Logged before answering, so a client that saw the answer also sees its log line.
            log(f"{self.client_address[0]} {self.command} {self.path} {status} {size} bytes {note}".rstrip())
            self.send_response_only(status)
            self.send_header("Date", self.date_time_string())
            if authenticate:
                self.send_header("WWW-Authenticate", authenticate)
            if payload:
                self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one concise line per request comes from _answer

    return RelayHandler


class RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    log: Log

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One line, never a traceback: a client that resets or lies is not our bug."""
        import sys

        error = sys.exc_info()[1]
        self.log(f"{client_address[0]}: request failed ({type(error).__name__}: {error})")


def listen(host: str, port: int, log: Log) -> RelayServer:
    """Bind first (OSError if the port is taken), so nothing is created for a server that cannot run;
    `answer` then says how it answers and where it stores."""
    server = RelayServer((host, port), BaseHTTPRequestHandler)
    server.log = log
    return server


def answer(
    server: RelayServer, password: str, maildir: MaildirWriter, ingress: Ingress = RELAY
) -> RelayServer:
    server.RequestHandlerClass = make_handler(password, maildir, server.log, ingress)
    return server


def make_server(
    host: str, port: int, password: str, maildir: MaildirWriter, log: Log, ingress: Ingress = RELAY
) -> RelayServer:
    return answer(listen(host, port, log), password, maildir, ingress)
