"""Whole-operation deadlines that work in any thread: `bounded(seconds, what)`.

A per-read socket timeout never fires on a server that trickles one byte every few seconds, and
SIGALRM (signals.deadline) reaches only the main thread. Here one process-wide watchdog thread,
started on first use, keeps a heap of deadlines and sleeps on a Condition until the earliest
(no polling tick). When a block's deadline passes, it shuts down (SHUT_RDWR) every socket the
block registered with `Guard.watch`: whatever read or write the block is blocked in returns
at once with EOF or an error, and the block then sees `guard.expired`.

Not on deliver's path: deliver bounds its post with SIGALRM on the main thread and never
imports this module (it starts a thread).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Set, Tuple

if TYPE_CHECKING:
    import requests


class Guard:
    """One bounded operation: the sockets to shut down if it runs past its deadline."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.expires_at = time.monotonic() + seconds
        self.expired = False  # the deadline passed (or cancel_all) and the sockets were shut down
        self.reason: Optional[str] = None  # "deadline", or cancel_all's reason
        self._lock = threading.Lock()
        self._watched: List[socket.socket] = []  # our own duplicates of the watched descriptors
        self._done = False

    def left(self) -> float:
        """Seconds until the deadline (0 once passed)."""
        return max(0.0, self.expires_at - time.monotonic())

    def watch(self, sock: Optional[socket.socket]) -> None:
        """Shut `sock` down at expiry (at once if already expired). The descriptor is duplicated:
        shutdown acts on the connection, not the descriptor, so this holds even after TLS
        wraps the socket (or STARTTLS replaces it) and detaches the original object."""
        try:
            fd = os.dup(sock.fileno()) if sock is not None else -1
        except (OSError, ValueError):
            return  # closed already: nothing left to bound
        if fd < 0:
            return
        duplicate = socket.socket(fileno=fd)
        with self._lock:
            if not self._done:
                self._watched.append(duplicate)
                if self.expired:
                    _shut_down(duplicate)
                return
        duplicate.close()

    def _expire(self, reason: str) -> None:
        with self._lock:
            if self._done or self.expired:
                return
            self.expired = True
            self.reason = reason
            for sock in self._watched:
                _shut_down(sock)

    def _finish(self) -> None:
        with self._lock:
            self._done = True
            watched, self._watched = self._watched, []
        for sock in watched:
            sock.close()

    def __repr__(self) -> str:
        return f"<Guard {self.what} {self.seconds:g}s{' expired' if self.expired else ''}>"


def _shut_down(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected (any more): nothing blocks on it
        sock.shutdown(socket.SHUT_RDWR)


class _Watchdog:
    """The one thread that expires guards, earliest deadline first."""

    def __init__(self) -> None:
        self.condition = threading.Condition()
        self.heap: List[Tuple[float, int, Guard]] = []
        self.live: Set[Guard] = set()
        self.order = itertools.count()
        self.thread: Optional[threading.Thread] = None

    def add(self, guard: Guard) -> None:
        with self.condition:
            self.live.add(guard)
            earliest = not self.heap or guard.expires_at < self.heap[0][0]
            heapq.heappush(self.heap, (guard.expires_at, next(self.order), guard))
            if len(self.heap) > 64 + 2 * len(self.live):  # finished guards wait in the heap: drop them
                self.heap = [entry for entry in self.heap if entry[2] in self.live]
                heapq.heapify(self.heap)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mailbox-relay deadlines", daemon=True)
                self.thread.start()
            elif earliest:
                self.condition.notify()

    def remove(self, guard: Guard) -> None:
        with self.condition:
            self.live.discard(guard)
        guard._finish()

    def live_guards(self) -> List[Guard]:
        with self.condition:
            return list(self.live)

    def _run(self) -> None:
        while True:
            with self.condition:
                due = self._wait_for_due()
            for guard in due:  # outside the lock: shutdown is a system call per socket
                guard._expire("deadline")

    def _wait_for_due(self) -> List[Guard]:
        while True:
            now = time.monotonic()
            due: List[Guard] = []
            while self.heap and (self.heap[0][2] not in self.live or self.heap[0][0] <= now):
                _, _, guard = heapq.heappop(self.heap)
                if guard in self.live:
                    due.append(guard)
            if due:
                return due
            self.condition.wait(self.heap[0][0] - now if self.heap else None)


_watchdog: Optional[_Watchdog] = None
_watchdog_lock = threading.Lock()
_local = threading.local()


def _the_watchdog() -> _Watchdog:
    global _watchdog
    with _watchdog_lock:
        if _watchdog is None:
            _watchdog = _Watchdog()
        return _watchdog


def _forget_after_fork() -> None:  # the child has no watchdog thread: it starts its own
    global _watchdog, _watchdog_lock
    _watchdog, _watchdog_lock = None, threading.Lock()
    _local.__dict__.clear()


os.register_at_fork(after_in_child=_forget_after_fork)


def _stack() -> List[Guard]:
    stack: Optional[List[Guard]] = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


@contextlib.contextmanager
def bounded(seconds: float, what: str) -> Iterator[Guard]:
    """Bound the whole block by `seconds`; the thread's current guard while inside. At expiry
    the sockets registered with the guard are shut down; the block itself is not interrupted
    otherwise, so it must look at `guard.expired` (or the error a shut-down socket gave)."""
    guard = Guard(seconds, what)
    watchdog = _the_watchdog()
    watchdog.add(guard)
    stack = _stack()
    stack.append(guard)
    try:
        yield guard
    finally:
        stack.remove(guard)
        watchdog.remove(guard)


def current() -> Optional[Guard]:
    """The innermost guard of this thread, or None outside `bounded`."""
    stack = _stack()
    return stack[-1] if stack else None


def watch(sock: Optional[socket.socket]) -> None:
    """Register `sock` with this thread's current guard, if there is one."""
    guard = current()
    if guard is not None:
        guard.watch(sock)


def cancel_all(reason: str = "stopping") -> None:
    """Shut down every socket of every live guard now, in every thread (watch's SIGTERM path).
    Those guards then read expired = True, with `reason`."""
    watchdog = _watchdog
    if watchdog is None:
        return
    for guard in watchdog.live_guards():
        guard._expire(reason)


# --- requests in any thread -------------------------------------------------------------------

_adapter: Any = None


def guarded(session: requests.Session) -> requests.Session:
    """Mount an adapter whose connections register their socket with the current guard of the
    thread that uses them (a connection taken from the pool, and a new one as it connects, so
    a trickled TLS handshake is bounded too). Returns the session."""
    adapter = _adapter_class()
    for prefix in ("http://", "https://"):
        session.mount(prefix, adapter())
    return session


def _adapter_class() -> Any:
    global _adapter
    if _adapter is None:
        _adapter = _build_adapter_class()
    return _adapter


def _build_adapter_class() -> Any:
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class GuardedHTTPConnection(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watch(sock)
            return sock

    class GuardedHTTPSConnection(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            sock = super()._new_conn()
            watch(sock)
            return sock

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = GuardedHTTPConnection

        def _get_conn(self, timeout: Optional[float] = None) -> Any:
            conn = super()._get_conn(timeout)
            watch(getattr(conn, "sock", None))  # a kept-alive connection (a new one has none yet)
            return conn

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = GuardedHTTPSConnection

        def _get_conn(self, timeout: Optional[float] = None) -> Any:
            conn = super()._get_conn(timeout)
            watch(getattr(conn, "sock", None))
            return conn

    pools = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = pools

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            manager = super().proxy_manager_for(proxy, **kwargs)
            if not proxy.lower().startswith("socks"):  # SOCKS has pools of its own
                manager.pool_classes_by_scheme = pools
            return manager

    return GuardedAdapter
