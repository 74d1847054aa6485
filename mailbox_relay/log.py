"""Log lines: one prefix, one way to write them. Cheap to import (deliver pays for it).

A line about a message or a folder is a `Line`: to every writer it is the same text, and it also
carries what it is about (account, folder, uid, code, event, level), which the JSON writer
(logformat.py, loaded only by import, fetch and watch) puts in fields of their own.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Dict, Optional, TextIO

Log = Callable[[str], None]

PREFIX = "mailbox-relay: "


class Line(str):
    """A log line that knows what it is about; everywhere else it is just its text."""

    fields: Dict[str, Any]

    def __new__(cls, text: str, **fields: Any) -> Line:
        line = super().__new__(cls, text)
        line.fields = {name: value for name, value in fields.items() if value is not None}
        return line


def about(
    text: str,
    event: str,
    *,
    account: Optional[str] = None,
    folder: Optional[str] = None,
    uid: Optional[str] = None,
    code: Optional[str] = None,
    level: str = "info",
) -> Line:
    """`text`, named as `event` and with what it concerns, for --log-format json."""
    return Line(text, event=event, account=account, folder=folder, uid=uid, code=code, level=level)


def fields_of(line: str) -> Dict[str, Any]:
    return dict(line.fields) if isinstance(line, Line) else {}


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
