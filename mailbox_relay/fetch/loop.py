"""One event loop in one thread: sockets that became readable, timers, and callbacks handed over
from other threads. No polling tick: the loop sleeps in select() until a socket is readable,
the earliest timer is due, or another thread (or a signal handler) writes to its self-pipe.

Callbacks run in the loop's thread, one at a time, and must not block (no server, no ingress,
no SQLite): whatever may block goes to a worker thread, which hands its result back with
`call_soon_threadsafe`. A callback that raises is logged and the loop goes on.

Test hook: MAILBOX_RELAY_TEST_HANG_LOOP_AFTER=SECONDS (read only when set) makes the loop's
thread sleep forever that many seconds after `run()` started, as a hung loop would (for the
tests of whatever proves the loop turns: a watchdog ping, /healthz).
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import itertools
import os
import selectors
import socket
import time
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

Callback = Callable[[], None]
HANG_HOOK = "MAILBOX_RELAY_TEST_HANG_LOOP_AFTER"


class Handle:
    """A timer; `cancel()` before it is due and it never runs."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.turned = time.monotonic()  # the last iteration: a hung loop stops moving it
        self._selector = selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, Handle]] = []
        self._order = itertools.count()
        self._handed: Deque[Callback] = collections.deque()  # append/popleft are atomic: no lock,
        # so a signal handler that interrupts the loop's own thread can hand over too
        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self._wake_write, False)
        self._selector.register(self._wake_read, selectors.EVENT_READ, self._drain_wakes)
        self._readers: Dict[int, Any] = {}
        self._stopped = False

    # --- the API --------------------------------------------------------------------------------

    def add_reader(self, sock: socket.socket, callback: Callback) -> None:
        """`callback()` in the loop's thread whenever `sock` is readable, until remove_reader."""
        fd = sock.fileno()
        if fd in self._readers:
            self._selector.modify(fd, selectors.EVENT_READ, callback)
        else:
            self._selector.register(fd, selectors.EVENT_READ, callback)
        self._readers[fd] = sock

    def remove_reader(self, sock: socket.socket) -> None:
        """Never raises: a socket already closed is forgotten by its last known descriptor."""
        for fd, known in list(self._readers.items()):
            if known is sock:
                del self._readers[fd]
                with contextlib.suppress(KeyError, ValueError, OSError):
                    self._selector.unregister(fd)

    def call_later(self, seconds: float, callback: Callback) -> Handle:
        """`callback()` in the loop's thread `seconds` from now (loop thread only)."""
        handle = Handle(time.monotonic() + max(0.0, seconds), callback)
        heapq.heappush(self._timers, (handle.when, next(self._order), handle))
        return handle

    def call_soon(self, callback: Callback) -> None:
        """`callback()` at the loop's next iteration (loop thread only)."""
        self._handed.append(callback)

    def call_soon_threadsafe(self, callback: Callback) -> None:
        """`callback()` in the loop's thread, from any thread or a signal handler."""
        self._handed.append(callback)
        with contextlib.suppress(OSError):  # the pipe is full: the loop is waking anyway
            os.write(self._wake_write, b"\0")

    def stop(self) -> None:
        """`run()` returns after the current iteration."""
        self._stopped = True
        self.call_soon_threadsafe(lambda: None)

    # --- running -----------------------------------------------------------------------------

    def run(self) -> None:
        hang_at = _hang_at()
        while not self._stopped:
            self._run_handed()
            if self._stopped:
                break
            for key, _ in self._selector.select(self._sleep_for()):
                self._call(key.data)
            self._run_due()
            self.turned = time.monotonic()
            if hang_at is not None and self.turned >= hang_at:
                while True:  # the test hook: a hung loop
                    time.sleep(3600)

    def close(self) -> None:
        self._selector.close()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _sleep_for(self) -> Optional[float]:
        """Until the earliest timer (None: until a socket or the pipe wakes us)."""
        if self._handed:
            return 0.0
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return None
        return max(0.0, self._timers[0][0] - time.monotonic())

    def _run_due(self) -> None:
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            handle = heapq.heappop(self._timers)[2]
            if not handle.cancelled:
                self._call(handle.callback)

    def _run_handed(self) -> None:
        for _ in range(len(self._handed)):  # not those handed over meanwhile: the sockets first
            self._call(self._handed.popleft())

    def _drain_wakes(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _call(self, callback: Callback) -> None:
        try:
            callback()
        except Exception as error:  # a bug of ours: say so, and keep every other folder going
            what = f"{type(error).__name__}: {error}"
            self.log(f"internal error in the event loop ({what}); please report this")


def _hang_at() -> Optional[float]:
    value = os.environ.get(HANG_HOOK)
    return time.monotonic() + float(value) if value else None
