"""What watch reports as it runs, for whoever listens (health, metrics, status, logs).

STUB from the issue-20/issue-21 contract (/tmp/watch_contract.md): issue 20 owns this file, and
its version replaces this one at the merge. Only Fanout's bodies (and `add`, which the contract
names) are filled in here, so issue 21's observers can be tested before the merge.
"""

from __future__ import annotations

from typing import Any, List, Optional  # noqa: F401  (the contract's imports)


class WatchEvents:
    """Every method is a no-op here; an observer overrides what it needs. Called from the event
    loop thread or from worker threads: implementations must be thread-safe and fast (no I/O)."""

    def folder_added(self, account: str, folder: str) -> None: ...
    def folder_removed(self, account: str, folder: str) -> None: ...
    def connecting(self, account: str, folder: str) -> None: ...
    def connected(self, account: str, folder: str) -> None: ...
    def round_trip(self, account: str, folder: str) -> None: ...  # any server answer
    # cause: "reset" | "closed" | "timeout" | "error" | "token" | "reload"
    def lost(self, account: str, folder: str, cause: str) -> None: ...
    def backoff(self, account: str, folder: str, reason: str, seconds: float) -> None: ...
    def paused(self, account: str, folder: str, reason: str) -> None: ...
    def delivered(self, account: str, folder: str, seconds: float) -> None: ...
    def failed(self, account: str, folder: str, code: str) -> None: ...
    def invalid(self, account: str, folder: str) -> None: ...
    def quarantined(self, account: str, folder: str) -> None: ...
    def backlog(self, account: str, folder: str, count: int) -> None: ...
    def grant(self, account: str, state: str) -> None: ...  # "ok" | "refused" | "renewing"
    def first_round_done(self) -> None: ...
    def reloading(self) -> None: ...
    def reloaded(self) -> None: ...
    def stopping(self) -> None: ...


class Fanout(WatchEvents):
    """Several observers as one."""

    def __init__(self, *observers: WatchEvents) -> None:
        self.observers: List[WatchEvents] = list(observers)

    def add(self, observer: WatchEvents) -> None:
        self.observers.append(observer)

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or name not in vars(WatchEvents):
            return object.__getattribute__(self, name)
        observers = object.__getattribute__(self, "observers")

        def every(*args: Any) -> None:
            for observer in observers:
                getattr(observer, name)(*args)

        return every
