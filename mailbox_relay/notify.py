"""systemd's notify protocol, without a dependency: datagrams to $NOTIFY_SOCKET (sd_notify(3)).

`Type=notify` units learn from it that watch is ready (READY=1, once the first connection
round is done), what it is doing (STATUS=, one line, when it changes, at most every
STATUS_EVERY seconds), that it is alive (WATCHDOG=1 every half of WATCHDOG_USEC), that it
reloads (RELOADING=1 with MONOTONIC_USEC, then READY=1) and that it stops (STOPPING=1).

The watchdog ping is scheduled on watch's event loop (`loop.call_later`), never on a thread of
its own: a hung loop stops the pings, and systemd restarts the service. Without NOTIFY_SOCKET
nothing is sent and nothing is scheduled.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable, Mapping, Optional, Protocol

from mailbox_relay.fetch.events import WatchEvents

STATUS_EVERY = 2.0  # seconds: STATUS= at most this often (a thousand folders reconnecting at once)


class Handle(Protocol):
    def cancel(self) -> None: ...


class Loop(Protocol):
    """What notify.py and fetch/listen.py use of watch's event loop (the issue-20 contract)."""

    turned: float

    def add_reader(self, sock: Any, callback: Callable[[], None]) -> None: ...
    def remove_reader(self, sock: Any) -> None: ...
    def call_later(self, seconds: float, callback: Callable[[], None]) -> Handle: ...
    def call_soon_threadsafe(self, callback: Callable[[], None]) -> None: ...


def socket_address(environ: Mapping[str, str]) -> Optional[str]:
    """$NOTIFY_SOCKET as an AF_UNIX address ("@name": the abstract namespace), or None."""
    address = environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        return "\0" + address[1:]
    return address if address.startswith("/") else None


def watchdog_interval(environ: Mapping[str, str], pid: Optional[int] = None) -> Optional[float]:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None: no watchdog for us."""
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it beside it."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier(WatchEvents):
    """Tells systemd what watch does. Lifecycle messages go out at once (one non-blocking
    datagram); STATUS= and WATCHDOG=1 go out from a timer on the loop."""

    def __init__(
        self,
        address: str,
        status: Callable[[], str],
        *,
        watchdog: Optional[float] = None,
        status_every: float = STATUS_EVERY,
    ) -> None:
        self.address = address
        self.status = status  # the one line for STATUS= (Health.status_line)
        self.watchdog = watchdog
        self.status_every = status_every
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._lock = threading.Lock()
        self._said = ""
        self._loop: Optional[Loop] = None
        self._timer: Optional[Handle] = None
        self._ready = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str], status: Callable[[], str]) -> Optional[Notifier]:
        address = socket_address(environ)
        if address is None:
            return None
        return cls(address, status, watchdog=watchdog_interval(environ))

    def start(self, loop: Loop) -> None:
        """Begin the timer on the loop: the watchdog pings and STATUS= updates."""
        self._loop = loop
        self._tick()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._socket.close()

    def send(self, *fields: str) -> bool:
        """One datagram of KEY=VALUE lines. Never raises, never blocks: a systemd that is gone or
        busy must not stop the watch (it would notice the missing pings itself)."""
        with self._lock:
            try:
                self._socket.sendto("\n".join(fields).encode(), self.address)
            except OSError:
                return False
        return True

    # --- the timer on the loop ----------------------------------------------------------------

    def _tick(self) -> None:
        if self.watchdog is not None:
            self.send("WATCHDOG=1")
        if self._ready:
            self._say_status()
        if self._loop is not None:
            every = self.status_every if self.watchdog is None else min(self.status_every, self.watchdog)
            self._timer = self._loop.call_later(every, self._tick)

    def _say_status(self, force: bool = False) -> None:
        line = self.status().replace("\n", " ")
        if force or line != self._said:
            self._said = line
            self.send(f"STATUS={line}")

    # --- events -------------------------------------------------------------------------------

    def first_round_done(self) -> None:
        self._ready = True
        self._said = self.status().replace("\n", " ")
        self.send("READY=1", f"STATUS={self._said}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading the configuration")

    def reloaded(self) -> None:
        self._said = self.status().replace("\n", " ")
        self.send("READY=1", f"STATUS={self._said}")

    def stopping(self) -> None:
        self._ready = False
        self.send("STOPPING=1", "STATUS=stopping: finishing the deliveries in flight")
