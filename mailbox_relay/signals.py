"""Signals as an exception: SIGTERM, SIGINT and SIGHUP stop the work cleanly and say so."""

from __future__ import annotations

# The C module: `signal` builds three enums at import time, which every delivery would pay for.
import _signal as signal  # type: ignore[import-not-found]
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator


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
    """Bound the whole of a block in wall-clock time (SIGALRM), not each socket read: a server
    that trickles one byte every half second never times out a per-read timeout.

    Only the main thread can take signals; elsewhere the block runs with its per-read
    timeouts alone (`armed` is then False)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = False

    def __enter__(self) -> deadline:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer"):
            self._previous = signal.signal(signal.SIGALRM, _deadline_passed)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
            self.armed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
            self.armed = False
