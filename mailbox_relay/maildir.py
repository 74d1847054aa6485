"""A Maildir writer that stores each distinct message once (tmp/, fsync, rename into new/).

Used by `serve` (where deduplication mirrors Rails' unique index) and by `failed_dir` (import,
fetch and watch: `open_failed_dir`).
Stored messages are mail: files are 0600 and the directories it creates 0700.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
from typing import List, Optional, Set, Tuple

from mailbox_relay.outcome import ConfigError, UsageError


class MaildirWriter:
    """A Maildir that stores each distinct message once: tmp/, fsync, rename into new/."""

    def __init__(self, path: str) -> None:
        self.path = path
        os.makedirs(path, mode=0o700, exist_ok=True)  # (parents it creates get the usual mode)
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), mode=0o700, exist_ok=True)
        self._lock = threading.Lock()
        self._keys: Set[str] = {self._key_of(name) for sub in ("new", "cur") for name in self._list(sub)}
        self._host = socket.gethostname().replace("/", "\\057").replace(":", "\\072")

    def _list(self, sub: str) -> List[str]:
        return [name for name in os.listdir(os.path.join(self.path, sub)) if not name.startswith(".")]

    @staticmethod
    def _key_of(name: str) -> str:
        parts = name.split(":")[0].split(".")
        return parts[1] if len(parts) > 2 else name

    def store(self, raw: bytes) -> Tuple[bool, str]:
        """(stored?, file name). A duplicate of a stored message is not written again."""
        key = hashlib.sha1(raw).hexdigest()
        with self._lock:
            if key in self._keys:
                return False, key
            name = f"{int(time.time())}.{key}.{self._host}"
            self._write(name, raw)
            self._keys.add(key)
            return True, name

    def _write(self, name: str, raw: bytes) -> None:
        temporary = os.path.join(self.path, "tmp", name)
        with open(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as handle:
            handle.write(raw)
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(temporary, os.path.join(self.path, "new", name))
        directory = os.open(os.path.join(self.path, "new"), os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def count(self) -> int:
        return len(self._list("new")) + len(self._list("cur"))


def open_failed_dir(path: Optional[str], source: str) -> Optional[MaildirWriter]:
    """The `failed_dir` Maildir (settings.FailedSettings), or None when it is not set. One that
    cannot be used is a usage error when typed as --failed-dir, else a setting to fix."""
    if not path:
        return None
    try:
        return MaildirWriter(path)
    except OSError as error:
        why = error.strerror or error
        if source.startswith("option"):
            raise UsageError(f"cannot use --failed-dir {path} as a Maildir ({why})") from None
        raise ConfigError(f"cannot use failed_dir {path} ({source}) as a Maildir ({why})") from None
