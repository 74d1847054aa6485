"""Signals as an exception: SIGTERM, SIGINT and SIGHUP stop the work cleanly and say so."""

from __future__ import annotations

import signal
from typing import Any, Dict


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
