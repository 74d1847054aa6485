"""A stand-in for watch's event loop (issue 20), with just what the issue-20/21 contract names:
add_reader, remove_reader, call_later, call_soon_threadsafe, `turned`, and the test hook
MAILBOX_RELAY_TEST_HANG_LOOP_AFTER. The observers of issue 21 are tested on it until they run on
the real loop (tests/test_operate_watch.py runs them there once fetch/loop.py exists)."""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable, List, Optional, Tuple


class Handle:
    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class StandInLoop:
    def __init__(self, hang_after: Optional[float] = None) -> None:
        self.selector = selectors.DefaultSelector()
        self.timers: List[Tuple[float, int, Handle]] = []
        self.order = itertools.count()
        self.soon: List[Callable[[], None]] = []
        self.lock = threading.Lock()
        self.wake_read, self.wake_write = socket.socketpair()
        self.wake_read.setblocking(False)
        self.selector.register(self.wake_read, selectors.EVENT_READ, self._drain)
        self.turned = time.monotonic()
        self.stopped = False
        hook = os.environ.get("MAILBOX_RELAY_TEST_HANG_LOOP_AFTER")
        self.hang_after = hang_after if hang_after is not None else (float(hook) if hook else None)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def add_reader(self, sock: Any, callback: Callable[[], None]) -> None:
        self.selector.register(sock, selectors.EVENT_READ, callback)

    def remove_reader(self, sock: Any) -> None:
        self.selector.unregister(sock)

    def call_later(self, seconds: float, callback: Callable[[], None]) -> Handle:
        handle = Handle(callback)
        with self.lock:
            heapq.heappush(self.timers, (time.monotonic() + seconds, next(self.order), handle))
        return handle

    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None:
        with self.lock:
            self.soon.append(callback)
        self.wake_write.send(b"x")

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        def stop() -> None:
            self.stopped = True

        self.call_soon_threadsafe(stop)
        self.thread.join(10)

    def run(self) -> None:
        started = time.monotonic()
        while not self.stopped:
            if self.hang_after is not None and time.monotonic() - started > self.hang_after:
                while True:  # the test hook: a loop that hangs for good
                    time.sleep(3600)
            with self.lock:
                due = self.timers[0][0] - time.monotonic() if self.timers else 1.0
            for key, _events in self.selector.select(max(0.0, min(due, 1.0))):
                key.data()
            now = time.monotonic()
            while True:
                with self.lock:
                    if not self.timers or self.timers[0][0] > now:
                        break
                    _, _, handle = heapq.heappop(self.timers)
                if not handle.cancelled:
                    handle.callback()
            with self.lock:
                soon, self.soon = self.soon, []
            for callback in soon:
                callback()
            self.turned = time.monotonic()

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self.wake_read.recv(4096)
