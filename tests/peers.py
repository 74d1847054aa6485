"""Real peers for tests: a raw socket server for resets and stalls, and free ports."""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
import time
from typing import List, Optional, Set, Tuple

from .helpers import RELAY_PATH


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def read_request(conn: socket.socket) -> bytes:
    """Read one HTTP request with a Content-Length body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


# Whole answers a hostile or broken ingress gives, by behaviour name.
CANNED = {
    "204": b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n",
    "bad-gzip": b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 12\r\n\r\nnot gzip at all",
    "503-retry-now": b"HTTP/1.1 503 Busy\r\nRetry-After: 0\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    "503-retry-past": (
        b"HTTP/1.1 503 Busy\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\nContent-Length: 0\r\n"
        b"Connection: close\r\n\r\n"
    ),
    "retry-after-junk": (
        b"HTTP/1.1 503 Busy\r\nRetry-After: \xb2\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    ),
}


class RawServer:
    """Each connection gets the next behaviour: "reset", "stall", "close", "endless", "trickle",
    "tls-trickle", or one of CANNED's answers.

    "reset" answers with a TCP RST after reading the request; "stall" reads and never answers;
    "close" closes cleanly without a response; "endless" answers 200 with a chunked body that
    never ends; "trickle" sends a 204 one byte every half second; "keepalive-trickle" answers a
    first request at once (keep-alive) and trickles the answer to the second. The last behaviour
    repeats for any later connections.
    """

    def __init__(self, behaviours: List[str]) -> None:
        self.behaviours = behaviours
        self.requests: List[bytes] = []
        self.connections = 0
        self.accepted = threading.Event()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self._sock.settimeout(0.2)
        self.port = int(self._sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}{RELAY_PATH}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            behaviour = self.behaviours[min(self.connections, len(self.behaviours) - 1)]
            self.connections += 1
            self.accepted.set()
            threading.Thread(target=self._handle, args=(conn, behaviour), daemon=True).start()

    def _handle(self, conn: socket.socket, behaviour: str) -> None:
        with conn:
            if behaviour == "tls-trickle":  # no HTTP request comes: a TLS ClientHello does
                conn.recv(65536)
            else:
                self.requests.append(read_request(conn))
            if behaviour == "reset":
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif behaviour == "stall":
                self._stop.wait(60)
            elif behaviour in CANNED:
                conn.sendall(CANNED[behaviour])
            elif behaviour == "endless":
                self._endless(conn)
            elif behaviour == "trickle":
                self._trickle(conn, CANNED["204"])
            elif behaviour == "keepalive-trickle":  # a kept-alive connection that then slows down
                conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                self.requests.append(read_request(conn))
                self._trickle(conn, CANNED["204"])
            elif behaviour == "tls-trickle":  # a TLS record header promising 16 KiB, then a crawl
                self._trickle(conn, b"\x16\x03\x03\x40\x00" + b"x" * 16384)

    def _endless(self, conn: socket.socket) -> None:
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        try:
            conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not self._stop.is_set():
                conn.sendall(chunk)
        except OSError:
            return  # the client hung up, as it should

    def _trickle(self, conn: socket.socket, answer: bytes) -> None:
        try:
            for byte in answer:
                if self._stop.wait(0.5):
                    return
                conn.sendall(bytes([byte]))
        except OSError:
            return

    def close(self) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Ingress204(threading.Thread):
    """A minimal HTTP(S) server answering 204 to every POST, recording bodies.

    `delay` slows each answer; `fail_every=N` answers every Nth request with 500 instead (a busy
    Rails on SQLite); `status` answers everything with that status.
    """

    def __init__(
        self, ssl_context: object = None, *, delay: float = 0.0, fail_every: int = 0, status: int = 204
    ) -> None:
        super().__init__(daemon=True)
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        bodies = self.bodies = []  # type: List[bytes]
        self.requests = 0
        self.status = status
        self.poison = b""
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                body = self.rfile.read(length)
                if len(body) < length:  # the client went away mid-request: nothing arrived
                    self.close_connection = True
                    return
                time.sleep(delay)
                with lock:
                    outer.requests += 1
                    status = outer.status
                    if fail_every and outer.requests % fail_every == 0:
                        status = 500
                    if outer.poison and outer.poison in body:  # Rails failing on one message
                        status = 500
                    if status == 204:
                        bodies.append(body)
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)  # type: ignore[attr-defined]
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}{RELAY_PATH}"

    def run(self) -> None:
        self.server.serve_forever(poll_interval=0.05)

    def __enter__(self) -> Ingress204:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class LocalServe:
    """`mailbox-relay serve`'s server, in a thread, on a free port."""

    def __init__(self, maildir: str, password: str = "pw", ingress: str = "relay") -> None:
        from mailbox_relay.ingress.formats import INGRESSES
        from mailbox_relay.maildir import MaildirWriter
        from mailbox_relay.server import make_server

        self.lines: List[str] = []
        self.maildir = MaildirWriter(maildir)
        chosen = INGRESSES[ingress]
        self.server = make_server("127.0.0.1", 0, password, self.maildir, self.lines.append, chosen)
        self.port = int(self.server.server_address[1])
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = self.base + chosen.path
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05})

    def __enter__(self) -> LocalServe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


class FaultProxy(threading.Thread):
    """A TCP proxy to `upstream` that can break its connections the ways networks do: `rst()`
    (reset), `fin()` (an orderly close) or `blackhole()` (stop forwarding, close nothing); and
    slow them the way a hostile server does: `trickle_after(pattern, delay)`."""

    def __init__(self, upstream_port: int, tls: Optional[ssl.SSLContext] = None) -> None:
        super().__init__(daemon=True)
        self.upstream_port = upstream_port
        self.tls = tls  # a server context: clients then speak TLS to the proxy (implicit TLS)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.pairs: List[Tuple[socket.socket, socket.socket]] = []
        self.holed: Set[socket.socket] = set()  # connections whose bytes are swallowed
        self.hide: List[bytes] = []  # removed from what the server says (b" IDLE": no IDLE)
        self.drop_lines: List[bytes] = []  # server lines holding one of these are never sent
        self.connections = 0
        self.trickle: Optional[Tuple[bytes, float]] = None
        self.trickling: Set[socket.socket] = set()  # client sides whose answers trickle
        self.triggered: List[bytes] = []  # the client lines that started a trickle
        # A client line containing this is never forwarded: both sides are reset instead (a
        # connection lost just before POP3's QUIT, whose DELEs the server then never applies).
        self.cut_before: Optional[bytes] = None
        self.cuts = 0
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def trickle_after(self, pattern: bytes, delay: float) -> None:
        """Once the client sends a line containing `pattern`, forward the server's answers on
        that connection one byte every `delay` seconds, for as long as it lasts: each read gets
        a byte in time, yet no answer ever completes. `pattern` b"": from the start of every new
        connection, so the greeting trickles."""
        self.trickle = (pattern, delay)

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    client = self.tls.wrap_socket(client, server_side=True)
                except (OSError, ssl.SSLError):
                    continue  # a client that did not trust us
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            with self._lock:
                self.pairs.append((client, upstream))
                self.connections += 1
                if self.trickle is not None and not self.trickle[0]:
                    self.trickling.add(client)
                    self.triggered.append(b"(greeting)")
            for source, target, from_server in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pump, args=(source, target, from_server), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, from_server: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    target.shutdown(socket.SHUT_WR)
                    return
                if source not in self.holed and target not in self.holed:
                    if from_server:
                        for word in self.hide:
                            data = data.replace(word, b"")
                        if self.drop_lines:  # a notification the server "never sent"
                            lines = data.splitlines(keepends=True)
                            data = b"".join(
                                line for line in lines if not any(p in line for p in self.drop_lines)
                            )
                    elif self.cut_before is not None and self.cut_before in data:
                        self.cuts += 1
                        self.rst()
                        return
                    else:
                        self._maybe_trickle(source, data)
                    if from_server and target in self.trickling:
                        self._trickle(target, data)
                    else:
                        target.sendall(data)
        except OSError:
            return

    def _maybe_trickle(self, client: socket.socket, data: bytes) -> None:
        trickle = self.trickle
        if trickle is not None and trickle[0] and client not in self.trickling:
            for line in data.split(b"\r\n"):
                if trickle[0] in line:
                    with self._lock:
                        self.trickling.add(client)
                        self.triggered.append(line)
                    return

    def _trickle(self, client: socket.socket, data: bytes) -> None:
        delay = self.trickle[1] if self.trickle is not None else 0.5
        for byte in data:
            if self._closed.wait(delay):
                return
            client.sendall(bytes([byte]))

    def _take(self) -> List[Tuple[socket.socket, socket.socket]]:
        with self._lock:
            pairs, self.pairs = self.pairs, []
        return pairs

    def rst(self) -> None:
        for client, upstream in self._take():
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            # Wake the pump blocked in recv first: while a thread is inside recv, close() only
            # drops the descriptor, and the RST would wait until the client next sent something.
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RD)
            client.close()
            _hang_up(upstream)

    def fin(self) -> None:
        for client, upstream in self._take():
            with contextlib.suppress(OSError):  # a connection the client already closed
                client.shutdown(socket.SHUT_RDWR)
            client.close()
            _hang_up(upstream)

    def blackhole(self) -> None:
        """Swallow everything on the current connections, closing nothing (a dead NAT entry);
        later connections work again."""
        with self._lock:
            for client, upstream in self.pairs:
                self.holed.update((client, upstream))

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed.set()
        self.listener.close()
        self.rst()


def _hang_up(upstream: socket.socket) -> None:
    """Close the server's side for real: with its pump thread inside recv, close() alone only
    drops the descriptor, and the server would keep the connection (and count it against its
    per-user cap)."""
    with contextlib.suppress(OSError):
        upstream.shutdown(socket.SHUT_RDWR)
    upstream.close()


class ScriptedImap(threading.Thread):
    """A tiny IMAP server IMAPClient talks to for real: a greeting, CAPABILITY, LIST, LOGOUT,
    and LOGIN / AUTHENTICATE answered with `answer` (b"NO [UNAVAILABLE] busy", or b"OK ...").
    `logins` records each login command's first line (never its secret)."""

    def __init__(self, answer: bytes, capabilities: bytes = b"IMAP4rev1 AUTH=PLAIN AUTH=XOAUTH2") -> None:
        super().__init__(daemon=True)
        self.answer = answer
        self.capabilities = capabilities
        self.logins: List[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        with connection, contextlib.suppress(OSError):
            lines = connection.makefile("rb")
            connection.sendall(b"* OK ready\r\n")
            for line in lines:
                tag, _, rest = line.rstrip(b"\r\n").partition(b" ")
                command = rest.split(b" ")[0].upper()
                if command == b"CAPABILITY":
                    connection.sendall(b"* CAPABILITY " + self.capabilities + b"\r\n" + tag + b" OK done\r\n")
                elif command in (b"LOGIN", b"AUTHENTICATE"):
                    self.logins.append(b" ".join(rest.split(b" ")[:2]))
                    if command == b"AUTHENTICATE":
                        connection.sendall(b"+ \r\n")
                        lines.readline()  # the SASL response
                    connection.sendall(tag + b" " + self.answer + b"\r\n")
                elif command == b"LIST":
                    connection.sendall(b'* LIST () "/" INBOX\r\n' + tag + b" OK done\r\n")
                elif command == b"LOGOUT":
                    connection.sendall(b"* BYE bye\r\n" + tag + b" OK done\r\n")
                    return
                else:
                    connection.sendall(tag + b" BAD not in this script\r\n")

    def __enter__(self) -> ScriptedImap:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()
