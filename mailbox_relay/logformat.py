"""How import, fetch and watch write their lines for an operator: `log_format` plain or json.

plain: `2024-05-01T12:00:00+0000 mailbox-relay: box/INBOX: UID 7 ...`, without the timestamp
when stderr is the journal's (systemd sets JOURNAL_STREAM to its device and inode), which
stamps every line itself.
json: one object per line: ts (UTC, ISO 8601), level, event, account, folder, uid, code and
message (the plain line's text); a field nobody named is null, so every line has every key.

Loaded only by those commands: deliver's lines stay exactly as they are (an MTA reads them),
and deliver never pays for json or time formatting.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Dict, Mapping, Tuple

from mailbox_relay.log import Log, fields_of, prefixed, say

KEYS = ("account", "folder", "uid", "code")


def operator_logs(options: Mapping[str, Any], environ: Mapping[str, str]) -> Tuple[str, Log, Log]:
    """The log_format setting, and the (log, error log) it makes. Raises ConfigError."""
    from mailbox_relay.settings import LogSettings, open_layers

    log_format = LogSettings.resolve(open_layers(options, environ)).log_format
    return (log_format, *stderr_logs(log_format, environ))


def stderr_is_journal(environ: Mapping[str, str]) -> bool:
    """JOURNAL_STREAM is "DEVICE:INODE" of the journal's stream; it counts only while stderr is
    still that stream (a redirect in a unit's ExecStart= would inherit the variable)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    try:
        status = os.fstat(sys.stderr.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (AttributeError, OSError, ValueError):
        return False


def as_json(line: str, level: str = "info", now: Callable[[], float] = time.time) -> str:
    fields = fields_of(line)
    record: Dict[str, Any] = {
        "ts": _utc(now()),
        "level": fields.get("level", level),
        "event": fields.get("event", "log"),
    }
    for key in KEYS:
        record[key] = fields.get(key)
    record["message"] = str(line)
    return json.dumps(record, ensure_ascii=False)


def plain(line: str, stamped: bool, now: Callable[[], float] = time.time) -> str:
    text = prefixed(str(line))
    if not stamped:
        return text
    return time.strftime("%Y-%m-%dT%H:%M:%S%z ", time.localtime(now())) + text


def stderr_logs(log_format: str, environ: Mapping[str, str]) -> Tuple[Log, Log]:
    """(log, error log) to stderr in this format: the error log's lines are level "error" and,
    in plain text, say "error: " as cli's other errors do."""
    if log_format == "json":

        def log(line: str) -> None:
            say(as_json(line))

        def error(line: str) -> None:
            say(as_json(line, level="error"))

        return log, error
    stamped = not stderr_is_journal(environ)

    def plain_log(line: str) -> None:
        say(plain(line, stamped))

    def plain_error(line: str) -> None:
        say(plain("error: " + line, stamped))

    return plain_log, plain_error


def _utc(seconds: float) -> str:
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return f"{whole}.{int(seconds % 1 * 1000):03d}Z"
