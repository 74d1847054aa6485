"""`serve`: a local relay ingress that answers exactly like Action Mailbox's, into a Maildir.

Same checks in the same order as Rails' relay controller: path (404), Basic auth (401), media
type (415), empty body (422, as Rails >= 7.1.4), then 204. Byte-identical re-posts are
deduplicated the way Rails' unique index on (Message-ID, SHA1 of the bytes) does: for identical
bytes the Message-ID is identical too, so the SHA1 alone is the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, List, Optional, Set, Tuple

from mailbox_relay.outcome import RELAY_PATH

Log = Callable[[str], None]
UNAUTHORIZED_HEADER = 'Basic realm="Action Mailbox"'


class Maildir:
    """A Maildir that stores each distinct message once: tmp/, fsync, rename into new/."""

    def __init__(self, path: str) -> None:
        self.path = path
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self._lock = threading.Lock()
        self._keys: Set[str] = {self._key_of(name) for sub in ("new", "cur") for name in self._list(sub)}
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def _list(self, sub: str) -> list[str]:
        return [name for name in os.listdir(os.path.join(self.path, sub)) if not name.startswith(".")]

    @staticmethod
    def _key_of(name: str) -> str:
        parts = name.split(":")[0].split(".")
        return parts[1] if len(parts) > 2 else name

    def store(self, raw: bytes) -> Tuple[bool, str]:
        """(stored?, file name). A duplicate of a stored message is not written again."""
        key = hashlib.sha1(raw).hexdigest()
        with self._lock:
            if key in self._keys:
                return False, key
            name = f"{int(time.time())}.{key}.{self._host}"
            self._write(name, raw)
            self._keys.add(key)
            return True, name

    def _write(self, name: str, raw: bytes) -> None:
        temporary = os.path.join(self.path, "tmp", name)
        with open(temporary, "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, os.path.join(self.path, "new", name))
        directory = os.open(os.path.join(self.path, "new"), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def count(self) -> int:
        return len(self._list("new")) + len(self._list("cur"))


def _authorized(header: Optional[str], password: str) -> bool:
    if not header or not header.startswith("Basic "):
        return False
    try:
        user, _, given = base64.b64decode(header[6:].strip()).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return False
    expected = f"actionmailbox:{password}".encode()
    return hmac.compare_digest(f"{user}:{given}".encode(), expected)


def make_handler(password: str, maildir: Maildir, log: Log) -> type[BaseHTTPRequestHandler]:
    class RelayHandler(BaseHTTPRequestHandler):
        server_version = "mailbox-relay-serve"
        protocol_version = "HTTP/1.1"  # keep-alive, as puma does

        def do_POST(self) -> None:
            body = self._read_body()
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
            self._read_body()
            self._answer(404, "Not Found\n", 0)

        do_GET = do_PUT = do_DELETE = do_PATCH = _not_routed

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _read_chunked(self) -> bytes:
            chunks: List[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
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


def make_server(host: str, port: int, password: str, maildir: Maildir, log: Log) -> RelayServer:
    return RelayServer((host, port), make_handler(password, maildir, log))
