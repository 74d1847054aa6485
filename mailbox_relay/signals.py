"""Signals as an exception: SIGTERM, SIGINT and SIGHUP stop the work cleanly and say so."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived: stop and let the caller retry (exit 75)."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


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
