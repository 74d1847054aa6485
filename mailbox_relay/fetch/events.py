"""What watch reports as it runs, for whoever listens (health, metrics, status, logs)."""

from __future__ import annotations

import threading
from typing import Any, List


class WatchEvents:
    """Every method is a no-op here; an observer overrides what it needs. Called from the event
    loop thread or from worker threads: implementations must be thread-safe and fast (no I/O)."""

    def folder_added(self, account: str, folder: str) -> None: ...
    def folder_removed(self, account: str, folder: str) -> None: ...
    def connecting(self, account: str, folder: str) -> None: ...
    def connected(self, account: str, folder: str) -> None: ...
    # any server answer: a pass, an IDLE (re)issue or its answer, a NOOP
    def round_trip(self, account: str, folder: str) -> None: ...
    # cause: "reset" | "closed" | "timeout" | "error" | "token" | "reload"
    def lost(self, account: str, folder: str, cause: str) -> None: ...
    def backoff(self, account: str, folder: str, reason: str, seconds: float) -> None: ...  # a known wait
    def paused(self, account: str, folder: str, reason: str) -> None: ...  # waiting for a person
    def delivered(self, account: str, folder: str, seconds: float) -> None: ...  # one message, its post
    def failed(self, account: str, folder: str, code: str) -> None: ...  # enhanced status code ("4.3.0")
    def invalid(self, account: str, folder: str) -> None: ...
    def quarantined(self, account: str, folder: str) -> None: ...
    def backlog(self, account: str, folder: str, count: int) -> None: ...  # seen, not yet acknowledged
    def grant(self, account: str, state: str) -> None: ...  # "ok" | "refused" | "renewing"
    def first_round_done(self) -> None: ...  # every folder connected or failed at least once
    def reloading(self) -> None: ...
    def reloaded(self) -> None: ...
    def stopping(self) -> None: ...


class Fanout(WatchEvents):
    """Several observers as one."""

    def __init__(self, *observers: WatchEvents) -> None:
        self._observers: List[WatchEvents] = list(observers)
        self._lock = threading.Lock()

    @property
    def observers(self) -> List[WatchEvents]:
        """Who hears the events, in order."""
        return list(self._observers)

    def add(self, observer: WatchEvents) -> None:
        """Before `Watch.run()`, or at any time: the next event reaches it."""
        with self._lock:
            self._observers = [*self._observers, observer]  # a new list: callers iterate the old

    def _each(self, name: str, *args: Any) -> None:
        for observer in self._observers:
            getattr(observer, name)(*args)

    def folder_added(self, account: str, folder: str) -> None:
        self._each("folder_added", account, folder)

    def folder_removed(self, account: str, folder: str) -> None:
        self._each("folder_removed", account, folder)

    def connecting(self, account: str, folder: str) -> None:
        self._each("connecting", account, folder)

    def connected(self, account: str, folder: str) -> None:
        self._each("connected", account, folder)

    def round_trip(self, account: str, folder: str) -> None:
        self._each("round_trip", account, folder)

    def lost(self, account: str, folder: str, cause: str) -> None:
        self._each("lost", account, folder, cause)

    def backoff(self, account: str, folder: str, reason: str, seconds: float) -> None:
        self._each("backoff", account, folder, reason, seconds)

    def paused(self, account: str, folder: str, reason: str) -> None:
        self._each("paused", account, folder, reason)

    def delivered(self, account: str, folder: str, seconds: float) -> None:
        self._each("delivered", account, folder, seconds)

    def failed(self, account: str, folder: str, code: str) -> None:
        self._each("failed", account, folder, code)

    def invalid(self, account: str, folder: str) -> None:
        self._each("invalid", account, folder)

    def quarantined(self, account: str, folder: str) -> None:
        self._each("quarantined", account, folder)

    def backlog(self, account: str, folder: str, count: int) -> None:
        self._each("backlog", account, folder, count)

    def grant(self, account: str, state: str) -> None:
        self._each("grant", account, state)

    def first_round_done(self) -> None:
        self._each("first_round_done")

    def reloading(self) -> None:
        self._each("reloading")

    def reloaded(self) -> None:
        self._each("reloaded")

    def stopping(self) -> None:
        self._each("stopping")
