"""Where messages come from: mbox files (optionally .gz), Maildirs and trees of .eml files.

Every source yields `(key, raw bytes)` with a key that is stable across runs (an mbox offset, a
Maildir unique name, a relative path), so the resume journal can recognise a message again. The
inputs are only ever opened for reading.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import BinaryIO, Iterator, List, Optional, Protocol, Set, Tuple, Union

from mailbox_relay.message import is_envelope_line, starts_with_field

CHUNK = 8 * 1024 * 1024
# A From_ separator line: "From <sender> <date with a time>", e.g. Gmail Takeout's
# "From 1669160939957813740@xxx Thu Jun 11 00:38:38 +0000 2020". Requiring the time keeps an
# unquoted "From here on..." body line (a broken mboxo file) from splitting a message.
_FROM_LINE = re.compile(rb"From \S+ +.*\d{1,2}:\d{2}")
_MBOXRD_QUOTED = re.compile(rb"^>(>*From )", re.M)


class Unreadable:
    """One message that could not be read (moved or expunged mid-run, no permission, a broken
    link): the importer counts it, names it, and goes on with the rest."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


Message = Tuple[str, Union[bytes, Unreadable]]  # (stable key, raw bytes or why not)


class Source(Protocol):
    """What the importer needs from any kind of input."""

    kind: str
    path: str

    def messages(self) -> Iterator[Message]: ...

    def size(self) -> int: ...

    def position(self) -> int: ...


class NotASource(Exception):
    """A PATH that is no input at all (missing, unreadable, of no known kind)."""


class DamagedInput(Exception):
    """An input that ends in the middle (a cut-off .gz download): the messages before the cut
    were yielded; `offset` is how many bytes of its content could be read."""

    def __init__(self, offset: int, error: BaseException) -> None:
        super().__init__(f"damaged after {offset} bytes of content ({type(error).__name__}: {error})")
        self.offset = offset


def printable(name: str) -> str:
    """A file name as text that can be printed and stored: bytes that are not UTF-8 (kept by
    os.listdir as surrogates) become \\xNN escapes, the same way every run."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _open(path: str) -> BinaryIO:
    raw = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if raw.read(2) == b"\x1f\x8b":
        raw.seek(0)
        return Gunzip(raw)  # type: ignore[return-value]
    raw.seek(0)
    return raw


class Gunzip:
    """A .gz file (of one or more members) read in large pieces. Unlike gzip.GzipFile, a read
    that meets the break in a cut-off or corrupt file first returns what came before it; the
    next read raises. A cut-off Takeout download thus loses only the message it cuts."""

    COMPRESSED_READ = 64 * 1024  # small: zlib keeps no output of a read that meets corruption

    def __init__(self, raw: BinaryIO) -> None:
        self.fileobj = raw  # for position(): progress counts compressed bytes
        self._inflate = zlib.decompressobj(wbits=31)
        self._tail = b""  # compressed input not yet inflated (output was capped)
        self._error: Optional[BaseException] = None
        self.inflated = 0  # bytes of content returned so far

    def read(self, size: int) -> bytes:
        if self._error is not None:
            raise self._error
        pieces: List[bytes] = []
        wanted = size
        try:
            while wanted > 0:
                piece = self._inflate_some(wanted)
                if piece is None:
                    break
                pieces.append(piece)
                wanted -= len(piece)
        except (OSError, EOFError, zlib.error) as error:
            if not pieces:
                raise
            self._error = error  # raised by the next read, after this data is used
        self.inflated += size - wanted
        return b"".join(pieces)

    def _inflate_some(self, limit: int) -> Optional[bytes]:
        """Up to `limit` inflated bytes (never more: a small .gz can inflate to gigabytes), or
        None at the clean end of the file."""
        while True:
            if self._inflate.eof:  # a member ended: what follows starts the next one, if any
                self._tail = (self._inflate.unused_data + self._tail).lstrip(b"\0")
                while not self._tail:  # the end, or zero padding after it (gzip ignores it too)
                    more = self.fileobj.read(self.COMPRESSED_READ)
                    if not more:
                        return None
                    self._tail = more.lstrip(b"\0")
                self._inflate = zlib.decompressobj(wbits=31)
            if not self._tail:
                self._tail = self.fileobj.read(self.COMPRESSED_READ)
                if not self._tail:
                    raise EOFError("the compressed file ends before its end-of-stream marker")
            piece = self._inflate.decompress(self._tail, limit)
            self._tail = self._inflate.unconsumed_tail
            if piece:
                return piece

    def close(self) -> None:
        self.fileobj.close()

    def __enter__(self) -> Gunzip:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class Mbox:
    """An mbox file, split by scanning for From_ lines in large chunks (never line by line)."""

    path: str
    mboxrd: bool = False
    kind: str = "mbox"

    def __post_init__(self) -> None:
        self._stream: Optional[BinaryIO] = None
        self._through = 0  # content offset of the end of the last message yielded

    def size(self) -> int:
        return _size(self.path)

    def position(self) -> int:
        """Bytes of the file up to the end of the last message yielded (not of what was read
        ahead, 8 MiB at a time). For a .gz, the compressed bytes in proportion."""
        stream = self._stream
        if not isinstance(stream, Gunzip):
            return self._through
        try:
            return int(stream.fileobj.tell() * self._through / max(1, stream.inflated))
        except (OSError, ValueError):
            return 0

    def messages(self) -> Iterator[Message]:
        with _open(self.path) as stream:
            self._stream = stream
            for offset, raw in split_mbox(stream):
                self._through = offset + len(raw)
                yield str(offset), unescape_mboxrd(raw) if self.mboxrd else raw
        self._stream = None


def split_mbox(stream: BinaryIO, chunk: int = CHUNK) -> Iterator[Tuple[int, bytes]]:
    """(offset of the From_ line, message with its From_ line, minus the separating blank line).

    A From_ line separates messages only after a blank line (or at the start): an mboxo body
    line "From bob ... 10:00" in the middle of a paragraph is text. Raises DamagedInput if the
    stream breaks off; every message before the break has been yielded, the cut one is not.
    """
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
                eof = _fill(stream, buffer, chunk, base)
                continue
            line = bytes(buffer[start : line_end if line_end >= 0 else len(buffer)])
            if not _after_blank_line(buffer, found) or not _FROM_LINE.match(line):
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
        eof = _fill(stream, buffer, chunk, base)


def _after_blank_line(buffer: bytearray, newline: int) -> bool:
    """Is the line ending at buffer[newline] empty (LF or CRLF)?"""
    return buffer[newline - 1 : newline] == b"\n" or buffer[newline - 2 : newline] == b"\n\r"


def _fill(stream: BinaryIO, buffer: bytearray, chunk: int, base: int) -> bool:
    try:
        data = stream.read(chunk)
    except (OSError, EOFError, zlib.error) as error:  # a truncated or corrupt .gz, an I/O error
        raise DamagedInput(base + len(buffer), error) from None
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
        try:
            return sum(_size(full) for _, full in self._files())
        except OSError:  # the directory went away: reading it will say so, as a damaged input
            return 0

    def position(self) -> int:
        return self._done

    def messages(self) -> Iterator[Message]:
        for key, full in self._files():
            try:
                with open(full, "rb") as handle:
                    raw = handle.read()
            except OSError as error:  # moved or expunged since listed, no permission, broken link
                yield key, Unreadable(f"cannot read {printable(full)}: {error.strerror or error}")
                continue
            self._done += len(raw)
            yield key, raw


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:  # gone, or a broken link: it will be reported when it is read
        return 0


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
                if not name.startswith(".") and not os.path.isdir(full):
                    files.append((_strip_flags(name), full))
        return sorted(files)


@dataclass
class EmlTree(_FileSource):
    """Every *.eml file under a directory (or one .eml file); keys are relative paths.

    `skip` holds directories read as inputs of their own (Maildirs in the tree)."""

    path: str
    kind: str = ".eml files"
    skip: Set[str] = field(default_factory=set)

    def _files(self) -> List[Tuple[str, str]]:
        if not os.path.isdir(self.path):
            return [(os.path.basename(self.path), self.path)]
        found = []
        for directory, subdirs, names in os.walk(self.path):
            subdirs[:] = sorted(sub for sub in subdirs if os.path.join(directory, sub) not in self.skip)
            for name in sorted(names):
                if name.lower().endswith(".eml"):
                    full = os.path.join(directory, name)
                    found.append((os.path.relpath(full, self.path), full))
        return found


def detect(path: str, *, mboxrd: bool = False) -> List[Source]:
    """What PATH holds: a Maildir, an mbox file, one .eml message, or a directory tree in which
    every Maildir, mbox file and .eml file is an input. Raises NotASource if it is none."""
    if os.path.isdir(path):
        return [Maildir(path)] if _is_maildir(path) else _walk(path, mboxrd)
    if not os.path.lexists(path):
        raise NotASource(f"{printable(path)}: no such file or directory")
    head = _head(path)
    if not head or is_envelope_line(head):  # an empty file is an mbox with no messages
        return [Mbox(path, mboxrd=mboxrd, kind="mbox" if head else "empty file")]
    if starts_with_field(head):
        return [EmlTree(path, kind=".eml message")]
    raise NotASource(
        f"{printable(path)}: not an mbox file (no leading From_ line), a Maildir or an .eml message"
    )


def _is_maildir(path: str) -> bool:
    return all(os.path.isdir(os.path.join(path, sub)) for sub in ("cur", "new"))


def _head(path: str) -> bytes:
    try:
        with _open(path) as stream:
            return stream.read(4096)
    except (OSError, EOFError, zlib.error) as error:
        raise NotASource(f"{printable(path)}: cannot read it ({error})") from None


def _walk(root: str, mboxrd: bool) -> List[Source]:
    """A directory that is not a Maildir: its Maildirs and mbox files (Takeout folders, an
    archive of several mailboxes), and its .eml files as one tree."""
    maildirs: List[Source] = []
    mboxes: List[Source] = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for sub in [sub for sub in subdirs if _is_maildir(os.path.join(directory, sub))]:
            maildirs.append(Maildir(os.path.join(directory, sub)))
            subdirs.remove(sub)  # its cur/ and new/ are its own
        for name in sorted(names):
            full = os.path.join(directory, name)
            if not name.startswith(".") and not name.lower().endswith(".eml") and _is_mbox(full):
                mboxes.append(Mbox(full, mboxrd=mboxrd))
    emls = EmlTree(root, skip={source.path for source in maildirs})
    if emls._files() or not (maildirs or mboxes):
        return [*maildirs, *mboxes, emls]
    return [*maildirs, *mboxes]


def _is_mbox(path: str) -> bool:
    try:
        return is_envelope_line(_head(path))
    except NotASource:
        return False
