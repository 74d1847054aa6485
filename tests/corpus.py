"""Generated mail corpora for import tests: mbox variants, Takeout style, Maildir, .eml trees."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import List, Sequence

TAKEOUT_FROM = b"From 1669160939957813740@xxx Thu Jun 11 00:38:38 +0000 2020"


def message(
    n: int, *, newline: bytes = b"\n", labels: str = "Inbox", date: str = "", body: bytes = b""
) -> bytes:
    date = date or f"Thu, {1 + n % 28:02d} Jun 2020 00:38:38 +0000"
    lines = [
        b"From: Sender %d <sender%d@example.com>" % (n, n),
        b"To: support@example.com",
        b"Subject: message %d" % n,
        b"Message-ID: <m%d@example.com>" % n,
        b"Date: " + date.encode(),
        b"X-Gmail-Labels: " + labels.encode(),
        b"",
        body or b"body of message %d" % n,
        b"",
    ]
    return newline.join(lines)


def mbox_bytes(messages: Sequence[bytes], *, newline: bytes = b"\n", separator: bytes = b"") -> bytes:
    """An mbox: each message after a From_ line and followed by one empty line."""
    out = bytearray()
    for n, raw in enumerate(messages):
        out += (separator or b"From sender%d@example.com Thu Jun 11 00:38:38 2020" % n) + newline
        out += raw + newline
    return bytes(out)


def write_mbox(path: Path, messages: Sequence[bytes], *, gz: bool = False, **kw: bytes) -> Path:
    data = mbox_bytes(messages, **kw)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_maildir(path: Path, messages: Sequence[bytes]) -> Path:
    for sub in ("tmp", "new", "cur"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    for n, raw in enumerate(messages):
        if n % 2:
            (path / "cur" / f"{1600000000 + n}.M{n}P1.host:2,{'S' if n % 3 else 'RS'}").write_bytes(raw)
        else:
            (path / "new" / f"{1600000000 + n}.M{n}P1.host").write_bytes(raw)
    return path


def write_eml_tree(path: Path, messages: Sequence[bytes]) -> Path:
    for n, raw in enumerate(messages):
        folder = path / f"folder{n % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{n}.eml").write_bytes(raw)
    (path / "notes.txt").write_bytes(b"not a message, not an .eml")
    return path


def stored(maildir: str) -> List[bytes]:
    new = os.path.join(maildir, "new")
    return sorted(Path(new, name).read_bytes() for name in os.listdir(new))
