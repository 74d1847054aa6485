"""Log lines: one prefix, one way to write them. Cheap to import (deliver pays for it)."""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional, TextIO

Log = Callable[[str], None]

PREFIX = "mailbox-relay: "


def prefixed(line: str) -> str:
    """Every log line mailbox-relay writes starts the same way, whichever process writes it."""
    return PREFIX + line


def say(text: str, *, err: bool = True) -> None:
    """Write a line to stderr (or stdout). A reader that went away (EPIPE) or a closed stream
    must never change the exit code: the line is dropped, and so is the rest of that stream."""
    stream: Optional[TextIO] = sys.stderr if err else sys.stdout
    if stream is None:  # started with that descriptor closed
        return
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        mute(stream)


def mute(stream: Optional[TextIO]) -> None:
    """Point a broken stream at /dev/null, so no later write or the flush at exit fails."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())  # type: ignore[union-attr]
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no descriptor (tests' streams): nothing to do
        pass


def flush_or_mute() -> None:
    """At exit: flush stdout and stderr, muting whichever has lost its reader."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            mute(stream)


def to_stderr(line: str) -> None:
    say(prefixed(line))


def to_stderr_error(line: str) -> None:
    """The one style of an error that ends a command people run: `mailbox-relay: error: ...`.
    (deliver's lines lead with an enhanced status code instead: an MTA reads them.)"""
    say(prefixed("error: " + line))


def nowhere(line: str) -> None:
    pass
