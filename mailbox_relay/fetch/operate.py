"""What an operator gets from a running watch, plugged into it in one call: health (readiness,
STATUS=), Prometheus metrics and the listen endpoint when `listen` is set, systemd notify when
NOTIFY_SOCKET is set. watch.py calls `attach` before its loop runs and `close` after it ends.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, List, Mapping, Optional, Protocol, Tuple

from mailbox_relay.fetch.events import WatchEvents
from mailbox_relay.fetch.health import Health, fresh_for
from mailbox_relay.notify import Loop, Notifier
from mailbox_relay.settings import Address

if TYPE_CHECKING:
    from mailbox_relay.accounts import Account
    from mailbox_relay.fetch.listen import Listener


class Events(Protocol):
    def add(self, observer: WatchEvents) -> None: ...


class Watched(Protocol):
    """What operate needs of watch's `Watch` (the issue-20 contract)."""

    @property
    def events(self) -> Events: ...
    @property
    def loop(self) -> Loop: ...

    def account(self, name: str) -> Account: ...
    def folders(self) -> List[Tuple[str, str]]: ...


class Operations:
    """The observers attached to one watch, and what must be closed when it ends."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.notifier: Optional[Notifier] = None
        self.listener: Optional[Listener] = None
        self.observers: List[WatchEvents] = [health]  # as added to watch.events
        self._closers: List[Callable[[], None]] = []

    def close(self) -> None:
        for closer in reversed(self._closers):
            closer()
        self._closers = []


def attach(watch: Watched, listen: Optional[Address], environ: Mapping[str, str]) -> Operations:
    """Health always (status line, readiness); metrics and the endpoint with `listen`; systemd
    notify with NOTIFY_SOCKET. Raises ListenError (a setting to fix: exit 78) if the address
    cannot be listened on."""
    health = Health(lambda name: fresh_for(watch.account(name)))
    watch.events.add(health)
    operations = Operations(health)
    if listen is not None:
        from mailbox_relay.fetch.listen import Listener
        from mailbox_relay.fetch.metrics import CONTENT_TYPE, Metrics

        metrics = Metrics(ready=health.folders_ready)
        watch.events.add(metrics)
        operations.observers.append(metrics)
        listener = Listener(listen, watch.loop, health, lambda: (CONTENT_TYPE, metrics.exposition()))
        listener.start()
        operations.listener = listener
        operations._closers.append(listener.close)
    notifier = Notifier.from_environ(environ, health.status_line)
    if notifier is not None:
        watch.events.add(notifier)
        operations.observers.append(notifier)
        notifier.start(watch.loop)
        operations.notifier = notifier
        operations._closers.append(notifier.close)
    # Every folder is known from the start (not ready until it connects), whether or not the
    # loop says folder_added for the configured ones: a folder that never connects is named.
    for account, folder in watch.folders():
        for observer in operations.observers:
            observer.folder_added(account, folder)
    return operations
