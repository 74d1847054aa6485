"""`watch --listen`: /healthz, /readyz and /metrics, answered from inside watch's event loop.

No http.server thread: a side thread would keep answering "healthy" after the loop hung. The
listen socket and each connection are non-blocking and registered with `loop.add_reader`, so
every request is read, judged and answered by the loop itself; when the loop stops turning,
/healthz stops answering, which is what a liveness probe must see.

A tiny HTTP/1.0 responder: GET or HEAD, one request per connection, the request head at most
MAX_REQUEST bytes, the whole exchange within DEADLINE seconds, at most MAX_CONNECTIONS at once.
Nothing here blocks the loop: a reply the socket cannot take at once is sent on later turns.

- GET /healthz: 200 "ok" (the loop turns: it answered).
- GET /readyz: 200 or 503, with JSON naming each folder that is not ready and why (health.py).
- GET /metrics: the Prometheus text format (metrics.py).
"""

from __future__ import annotations

import errno
import json
import socket
from typing import Callable, Dict, Optional, Tuple

from mailbox_relay.fetch.health import Health
from mailbox_relay.notify import Handle, Loop
from mailbox_relay.outcome import ConfigError
from mailbox_relay.settings import Address

MAX_REQUEST = 4096  # bytes of request line and headers; a probe sends about a hundred
DEADLINE = 5.0  # seconds for a connection to send its request and take the answer
MAX_CONNECTIONS = 32  # open at once; more are closed at once (a probe retries)
SEND_AGAIN = 0.01  # seconds before trying again to send what the socket could not take
BACKLOG = 16

Reply = Tuple[int, str, bytes]  # status, content type, body
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    503: "Service Unavailable",
}


class ListenError(ConfigError):
    """The address cannot be listened on (in use, not ours): a setting to fix (exit 78)."""


class Listener:
    """The listen socket, its connections, and the three pages."""

    def __init__(
        self,
        address: Address,
        loop: Loop,
        health: Health,
        metrics: Optional[Callable[[], Tuple[str, bytes]]] = None,
    ) -> None:
        self.address = address
        self.loop = loop
        self.health = health
        self.metrics = metrics  # () -> (content type, exposition)
        self.sock: Optional[socket.socket] = None
        self.connections: Dict[int, _Connection] = {}

    @property
    def port(self) -> int:
        assert self.sock is not None
        return int(self.sock.getsockname()[1])

    def start(self) -> None:
        """Bind and listen (ListenError says why not); requests are answered once the loop runs."""
        host, port = self.address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(BACKLOG)
        except OSError as error:
            sock.close()
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            raise ListenError(f"cannot listen on {shown}: {error.strerror or error}") from None
        sock.setblocking(False)
        self.sock = sock
        self.loop.add_reader(sock, self._accept)

    def close(self) -> None:
        for connection in list(self.connections.values()):
            connection.close()
        if self.sock is not None:
            self.loop.remove_reader(self.sock)
            self.sock.close()
            self.sock = None

    def _accept(self) -> None:
        assert self.sock is not None
        while True:
            try:
                conn, _peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of descriptors, or the peer gave up before accept
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                    return
                raise
            if len(self.connections) >= MAX_CONNECTIONS:
                conn.close()
                continue
            connection = _Connection(self, conn)
            self.connections[conn.fileno()] = connection
            connection.begin()

    def answer(self, method: str, path: str) -> Reply:
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"only GET and HEAD\n"
        path = path.split("?", 1)[0]
        if path == "/healthz":
            return 200, "text/plain", b"ok\n"
        if path == "/readyz":
            ready, stale = self.health.ready()
            body = {"ready": ready, "status": self.health.status_line(), "not_ready": stale}
            return (200 if ready else 503), "application/json", json.dumps(body).encode() + b"\n"
        if path == "/metrics" and self.metrics is not None:
            content_type, text = self.metrics()
            return 200, content_type, text
        return 404, "text/plain", b"/healthz, /readyz or /metrics\n"


class _Connection:
    """One client: read the request head, answer it, close. All on the loop, never blocking."""

    def __init__(self, listener: Listener, sock: socket.socket) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.sock = sock
        self.fileno = sock.fileno()
        self.request = b""
        self.reply = b""
        self.expiry: Optional[Handle] = None
        self.again: Optional[Handle] = None
        self.closed = False
        self.reading = False

    def begin(self) -> None:
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock, self._readable)
        self.reading = True
        self.expiry = self.loop.call_later(DEADLINE, self.close)

    def _readable(self) -> None:
        try:
            chunk = self.sock.recv(MAX_REQUEST + 1 - len(self.request))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        if not chunk:  # the client went away before a whole request
            self.close()
            return
        self.request += chunk
        head_ends = max(self.request.find(b"\r\n\r\n"), self.request.find(b"\n\n"))
        if head_ends < 0 and len(self.request) <= MAX_REQUEST:
            return
        self._stop_reading()
        self._respond(*self._answer(head_ends >= 0))

    def _answer(self, whole: bool) -> Tuple[str, Reply]:
        if not whole:
            return "GET", (400, "text/plain", b"request too large\n")
        line = self.request.split(b"\n", 1)[0].decode("latin-1").strip()
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return "GET", (400, "text/plain", b"not an HTTP request\n")
        return parts[0], self.listener.answer(parts[0], parts[1])

    def _respond(self, method: str, reply: Reply) -> None:
        status, content_type, body = reply
        head = (
            f"HTTP/1.0 {status} {REASONS.get(status, '')}\r\n"
            f"Content-Type: {content_type}\r\n"
            f"Content-Length: {len(body)}\r\n"
            "Cache-Control: no-store\r\n"
            "Connection: close\r\n\r\n"
        )
        self.reply = head.encode("latin-1") + (b"" if method == "HEAD" else body)
        self._send()

    def _send(self) -> None:
        self.again = None
        if self.closed:
            return
        try:
            sent = self.sock.send(self.reply)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close()
            return
        self.reply = self.reply[sent:]
        if self.reply:  # the socket's buffer is full: try again on a later turn
            self.again = self.loop.call_later(SEND_AGAIN, self._send)
        else:
            self.close()

    def _stop_reading(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for handle in (self.expiry, self.again):
            if handle is not None:
                handle.cancel()
        self._stop_reading()
        self.sock.close()
        self.listener.connections.pop(self.fileno, None)
