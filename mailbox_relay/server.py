"""`serve`: a local relay ingress that answers exactly like Action Mailbox's, into a Maildir.

Same checks in the same order as Rails' relay controller: path (404), Basic auth (401), media
type (415), empty body (422, as Rails >= 7.1.4), then 204. Byte-identical re-posts are
deduplicated the way Rails' unique index on (Message-ID, SHA1 of the bytes) does: for identical
bytes the Message-ID is identical too, so the SHA1 alone is the key.
"""

from __future__ import annotations

import base64
import hmac
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional

from mailbox_relay.endpoint import RELAY_PATH
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


def make_handler(password: str, maildir: MaildirWriter, log: Log) -> type[BaseHTTPRequestHandler]:
    class RelayHandler(BaseHTTPRequestHandler):
        server_version = "mailbox-relay-serve"
        protocol_version = "HTTP/1.1"  # keep-alive, as puma does

        def do_POST(self) -> None:
            body = self._read_body()
            if body is None:  # the client went away mid-body: store nothing, answer nobody
                self.close_connection = True
                return
            if self.path.split("?")[0] != RELAY_PATH:
                return self._answer(404, "Not Found\n", len(body))
            if not _authorized(self.headers.get("Authorization"), password):
                return self._answer(401, "HTTP Basic: Access denied.\n", len(body), UNAUTHORIZED_HEADER)
            media_type = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            if media_type != "message/rfc822":
                return self._answer(415, "", len(body))
            if not body:
                return self._answer(422, "", 0)
            stored, name = maildir.store(body)
            self._answer(204, "", len(body), note=f"new/{name}" if stored else "duplicate, not stored")

        def _not_routed(self) -> None:
            if self._read_body() is not None:
                self._answer(404, "Not Found\n", 0)

        do_GET = do_PUT = do_DELETE = do_PATCH = _not_routed

        def _read_body(self) -> Optional[bytes]:
            """The whole body, or None if the connection ended before all of it arrived."""
            try:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    return self._read_chunked()
                length = int(self.headers.get("Content-Length") or 0)
            except (ValueError, OSError):
                return None
            body = self.rfile.read(length)
            return body if len(body) == length else None

        def _read_chunked(self) -> bytes:
            chunks: List[bytes] = []
            while True:
                line = self.rfile.readline()
                if not line:
                    raise OSError("connection closed before the last chunk")
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunk = self.rfile.read(size)
                if len(chunk) < size:
                    raise OSError("connection closed mid-chunk")
                chunks.append(chunk)
                self.rfile.readline()

        def _answer(self, status: int, text: str, size: int, authenticate: str = "", note: str = "") -> None:
            payload = text.encode()
            # Logged before answering, so a client that saw the answer also sees its log line.
            log(f"{self.client_address[0]} {self.command} {self.path} {status} {size} bytes {note}".rstrip())
            self.send_response_only(status)
            self.send_header("Date", self.date_time_string())
            if authenticate:
                self.send_header("WWW-Authenticate", authenticate)
            if payload:
                self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            pass  # one concise line per request comes from _answer

    return RelayHandler


class RelayServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def make_server(host: str, port: int, password: str, maildir: MaildirWriter, log: Log) -> RelayServer:
    return RelayServer((host, port), make_handler(password, maildir, log))
