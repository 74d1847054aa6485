"""Signals as an exception: SIGTERM, SIGINT and SIGHUP stop the work cleanly and say so."""

from __future__ import annotations

# The C module: `signal` builds three enums at import time, which every delivery would pay for.
import _signal as signal  # type: ignore[import-not-found]
import threading
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Dict, Iterator, Optional

if TYPE_CHECKING:
    from mailbox_relay.deadline import Guard


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived: stop and let the caller retry (exit 75)."""


_NAMES = {getattr(signal, name): name for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)}


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(_NAMES.get(signum, f"signal {signum}"))


class signals_interrupt:
    """Turn SIGTERM/SIGINT/SIGHUP into `Interrupted` while a delivery runs."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")

    def __enter__(self) -> None:
        self.previous: Dict[int, Any] = {}
        for name in self.SIGNALS:
            number = getattr(signal, name, None)
            if number is not None:
                self.previous[number] = signal.signal(number, _interrupt)

    def __exit__(self, *exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


@contextmanager
def stop_signals(handler: Callable[[], None]) -> Iterator[None]:
    """Call `handler` (instead of raising) on SIGTERM/SIGINT/SIGHUP, for long-running work
    that must finish its bookkeeping. Outside the main thread, signals are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: Dict[int, Any] = {}
    for name in signals_interrupt.SIGNALS:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, lambda signum, frame: handler())
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


class DeadlinePassed(BaseException):
    """An attempt ran past its deadline. A BaseException, so no library's `except Exception`
    swallows it on its way out (urllib3 closes the connection it interrupted)."""


def _deadline_passed(signum: int, frame: object) -> None:
    raise DeadlinePassed()


class deadline:
    """Bound the whole of a block in wall-clock time, not each socket read: a server that
    trickles one byte every half second never times out a per-read timeout.

    On the main thread by SIGALRM (`armed` is then True), which interrupts the block wherever it
    is. In any other thread by the watchdog of mailbox_relay.deadline, imported only then: at
    expiry it shuts down the sockets the block registered (a session made with
    `ingress.client.make_session(settings, threaded=True)` registers its connections), and
    DeadlinePassed is raised as the block ends."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = False
        self._bound: Optional[ContextManager[Guard]] = None
        self._guard: Optional[Guard] = None

    def __enter__(self) -> deadline:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            self._previous = signal.signal(signal.SIGALRM, _deadline_passed)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.armed = True
        else:
            from mailbox_relay.deadline import bounded

            self._bound = bounded(self.seconds, "deadline")
            self._guard = self._bound.__enter__()
        return self

    def __exit__(self, kind: Optional[type], error: Optional[BaseException], trace: Any) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self.armed = False
        elif self._bound is not None:
            bound, guard, self._bound, self._guard = self._bound, self._guard, None, None
            bound.__exit__(kind, error, trace)
            if guard is not None and guard.expired and not isinstance(error, DeadlinePassed):
                raise DeadlinePassed()  # whatever the shut-down socket made the block raise
