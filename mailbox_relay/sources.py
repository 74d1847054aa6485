"""Where messages come from: mbox files (optionally .gz), Maildirs and trees of .eml files.

Every source yields `(key, raw bytes)` with a key that is stable across runs (an mbox offset, a
Maildir unique name, a relative path), so the resume journal can recognise a message again. The
inputs are only ever opened for reading.
"""

from __future__ import annotations

import gzip
import os
import re
from dataclasses import dataclass
from typing import BinaryIO, Iterator, List, Optional, Protocol, Tuple

from mailbox_relay.message import is_envelope_line, starts_with_field

CHUNK = 8 * 1024 * 1024
# A From_ separator line: "From <sender> <date with a time>", e.g. Gmail Takeout's
# "From 1669160939957813740@xxx Thu Jun 11 00:38:38 +0000 2020". Requiring the time keeps an
# unquoted "From here on..." body line (a broken mboxo file) from splitting a message.
_FROM_LINE = re.compile(rb"From \S+ +.*\d{1,2}:\d{2}")
_MBOXRD_QUOTED = re.compile(rb"^>(>*From )", re.M)


class Source(Protocol):
    """What the importer needs from any kind of input."""

    kind: str
    path: str

    def messages(self) -> Iterator[Tuple[str, bytes]]: ...

    def size(self) -> int: ...

    def position(self) -> int: ...


class NotASource(Exception):
    pass


def _open(path: str) -> BinaryIO:
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    raw.seek(0)
    return raw


@dataclass
class Mbox:
    """An mbox file, split by scanning for From_ lines in large chunks (never line by line)."""

    path: str
    mboxrd: bool = False
    kind: str = "mbox"

    def __post_init__(self) -> None:
        self._raw: Optional[BinaryIO] = None

    def size(self) -> int:
        return os.path.getsize(self.path)

    def position(self) -> int:
        """Bytes of the file (compressed, for .gz) consumed so far, for progress."""
        raw = self._raw
        if raw is None:
            return 0
        inner = getattr(raw, "fileobj", None) or raw
        try:
            return int(inner.tell())
        except (OSError, ValueError):
            return 0

    def messages(self) -> Iterator[Tuple[str, bytes]]:
        with _open(self.path) as stream:
            self._raw = stream
            for offset, raw in split_mbox(stream):
                yield str(offset), unescape_mboxrd(raw) if self.mboxrd else raw
        self._raw = None


def split_mbox(stream: BinaryIO, chunk: int = CHUNK) -> Iterator[Tuple[int, bytes]]:
    """(offset of the From_ line, message with its From_ line, minus the separating blank line)."""
    buffer = bytearray()
    base = 0  # file offset of buffer[0]
    search = 1
    eof = False
    while True:
        found = buffer.find(b"\nFrom ", search - 1) if len(buffer) > search else -1
        if found >= 0:
            start = found + 1
            line_end = buffer.find(b"\n", start)
            if line_end < 0 and not eof:
                eof = _fill(stream, buffer, chunk)
                continue
            line = bytes(buffer[start : line_end if line_end >= 0 else len(buffer)])
            if not _FROM_LINE.match(line):
                search = start + 1
                continue
            yield base, _take(buffer, start)
            del buffer[:start]
            base += start
            search = 1
            continue
        if eof:
            if buffer.strip():
                yield base, _take(buffer, len(buffer))
            return
        search = max(1, len(buffer) - 5)
        eof = _fill(stream, buffer, chunk)


def _fill(stream: BinaryIO, buffer: bytearray, chunk: int) -> bool:
    data = stream.read(chunk)
    buffer += data
    return not data


def _take(buffer: bytearray, end: int) -> bytes:
    """One copy of buffer[:end], minus the empty line an mbox writer puts before a From_ line."""
    if buffer.endswith(b"\r\n\r\n", 0, end):
        end -= 2
    elif buffer.endswith(b"\n\n", 0, end):
        end -= 1
    with memoryview(buffer) as view:
        return bytes(view[:end])


def unescape_mboxrd(raw: bytes) -> bytes:
    """mboxrd quotes `>*From ` lines by adding one `>`; readers take one away."""
    return _MBOXRD_QUOTED.sub(rb"\1", raw)


def _strip_flags(name: str) -> str:
    return name.split(":", 1)[0]


class _FileSource:
    """A source of one message per file; subclasses say which files and their keys."""

    path: str
    kind: str

    def __post_init__(self) -> None:
        self._done = 0

    def _files(self) -> List[Tuple[str, str]]:
        """(key, full path) of each message file, in a stable order."""
        raise NotImplementedError

    def size(self) -> int:
        return sum(os.path.getsize(full) for _, full in self._files())

    def position(self) -> int:
        return self._done

    def messages(self) -> Iterator[Tuple[str, bytes]]:
        for key, full in self._files():
            with open(full, "rb") as handle:
                raw = handle.read()
            self._done += len(raw)
            yield key, raw


@dataclass
class Maildir(_FileSource):
    """A Maildir's new/ and cur/ (flags ignored), in name order; keys are the unique names."""

    path: str
    kind: str = "Maildir"

    def _files(self) -> List[Tuple[str, str]]:
        files = []
        for sub in ("new", "cur"):
            directory = os.path.join(self.path, sub)
            for name in os.listdir(directory):
                full = os.path.join(directory, name)
                if not name.startswith(".") and os.path.isfile(full):
                    files.append((_strip_flags(name), full))
        return sorted(files)


@dataclass
class EmlTree(_FileSource):
    """Every *.eml file under a directory (or one .eml file); keys are relative paths."""

    path: str
    kind: str = ".eml files"

    def _files(self) -> List[Tuple[str, str]]:
        if os.path.isfile(self.path):
            return [(os.path.basename(self.path), self.path)]
        found = []
        for directory, subdirs, names in os.walk(self.path):
            subdirs.sort()
            for name in sorted(names):
                if name.lower().endswith(".eml"):
                    full = os.path.join(directory, name)
                    found.append((os.path.relpath(full, self.path), full))
        return found


def detect(path: str, *, mboxrd: bool = False) -> Source:
    """Decide what PATH is: a Maildir, a tree of .eml files, an mbox file, or one message."""
    if os.path.isdir(path):
        if all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new")):
            return Maildir(path)
        return EmlTree(path)
    if not os.path.isfile(path):
        raise NotASource(f"{path}: no such file or directory")
    try:
        with _open(path) as stream:
            head = stream.read(4096)
    except (OSError, EOFError) as error:
        raise NotASource(f"{path}: cannot read it ({error})") from None
    if is_envelope_line(head):
        return Mbox(path, mboxrd=mboxrd)
    if starts_with_field(head):
        return EmlTree(path, kind=".eml message")
    raise NotASource(f"{path}: not an mbox file (no leading From_ line), a Maildir or an .eml message")
