"""Log lines: one prefix, one way to write them. Cheap to import (deliver pays for it)."""

from __future__ import annotations

import sys
from typing import Callable

Log = Callable[[str], None]

PREFIX = "mailbox-relay: "


def prefixed(line: str) -> str:
    """Every log line mailbox-relay writes starts the same way, whichever process writes it."""
    return PREFIX + line


def to_stderr(line: str) -> None:
    try:
        sys.stderr.write(prefixed(line) + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a reader that went away must not turn a log line into a crash
        pass


def nowhere(line: str) -> None:
    pass
