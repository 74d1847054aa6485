"""Bytes in, bytes out: what a message must look like, and what we add to it. Pure, no I/O.

"RFC 822 in practice": a header section of `name: value` fields (or folded continuations) with a
From: field. Everything real mail does is accepted: LF or CRLF, 8-bit headers (RFC 6532), no
body, no Message-ID, long lines. The bytes are never rewritten: Rails deduplicates on the SHA1 of
the raw message, so what we send is what was read, minus a leading mbox `From ` line, plus
deterministic `X-Original-To:` lines.
"""

from __future__ import annotations

import re
from typing import Iterable, List, Optional, Sequence, Tuple

from mailbox_relay.outcome import InvalidMessage, Reason

# A header line is a field (RFC 5322 name: printable US-ASCII except the colon; obsolete syntax
# allows blanks before the colon) or a folded continuation. _BAD_LINE finds the first line that
# is neither.
_FIELD_NAME = rb"[!-9;-~]+[ \t]*:"
_FIELD = re.compile(_FIELD_NAME)
_BAD_LINE = re.compile(rb"^(?!" + _FIELD_NAME + rb"|[ \t])", re.M)
_FROM_FIELD = re.compile(rb"^from[ \t]*:", re.M | re.I)
_NOT_BLANK = re.compile(rb"[^ \t\r\n]")


class Prepared:
    """A validated message as the parts to send: `prefix` then `raw[start:]`, never copied.

    `header` is the header section, for import's filters. (A plain class: see Outcome.)
    """

    __slots__ = ("header", "prefix", "raw", "start")

    def __init__(self, raw: bytes, start: int, prefix: bytes, header: bytes = b"") -> None:
        self.raw = raw
        self.start = start
        self.prefix = prefix
        self.header = header

    @property
    def size(self) -> int:
        return len(self.prefix) + len(self.raw) - self.start

    def parts(self) -> Tuple[bytes, memoryview]:
        return self.prefix, memoryview(self.raw)[self.start :]

    def to_bytes(self) -> bytes:
        """The exact bytes posted (a copy unless nothing is added or stripped)."""
        if not self.prefix and not self.start:
            return self.raw
        return self.prefix + self.raw[self.start :]


def is_envelope_line(data: bytes) -> bool:
    """Does `data` start with an mbox `From sender ...` line? `From : alice@x` is not one: it is
    a From: header field in obsolete syntax (blanks before the colon)."""
    return data.startswith(b"From ") and _FIELD.match(data) is None


def body_start(raw: bytes) -> int:
    """Offset after one leading mbox `From ` envelope line, if there is one."""
    if not is_envelope_line(raw):
        return 0
    newline = raw.find(b"\n")
    return len(raw) if newline < 0 else newline + 1


def header_end(raw: bytes, start: int) -> int:
    """Offset of the empty line that ends the header section (or the end of the message)."""
    if raw.startswith((b"\n", b"\r\n"), start):
        return start
    lf = raw.find(b"\n\n", start)
    # Look for a CRLF empty line only before the LF one: never scan a whole body twice.
    crlf = raw.find(b"\n\r\n", start, len(raw) if lf < 0 else lf + 2)
    ends = [pos + 1 for pos in (lf, crlf) if pos >= 0]
    return min(ends) if ends else len(raw)


def header_lines(header: bytes) -> List[bytes]:
    """The lines of a header section (as `Prepared.header` holds it), without line endings."""
    lines = header.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def validate(raw: bytes) -> Tuple[int, bytes]:
    """Check `raw` is a message; return where it starts and its header section, or raise."""
    start = body_start(raw)
    if _NOT_BLANK.search(raw, start) is None:  # a search, not raw[start:].strip(): no copy
        raise InvalidMessage("not an RFC 822 message: the input is empty")
    header = raw[start : header_end(raw, start)]
    _check_header(header, first_line=2 if start else 1)
    return start, header


def _check_header(header: bytes, first_line: int) -> None:
    """One regex pass over the header section (this runs once per message of an import).

    Line numbers count as in the input, so `sed -n Np` finds the line.
    """
    block = header[:-1] if header.endswith(b"\n") else header

    def line_of(offset: int) -> int:
        return first_line + block.count(b"\n", 0, offset)

    if _FIELD.match(block) is None:
        raise InvalidMessage(
            f"not an RFC 822 message: line {first_line} is not a header field (no header section)"
        )
    bad = _BAD_LINE.search(block)
    nul = block.find(b"\0")
    if nul >= 0 and (bad is None or line_of(nul) <= line_of(bad.start())):
        raise InvalidMessage(f"not an RFC 822 message: NUL byte in header line {line_of(nul)}")
    if bad is not None:
        raise InvalidMessage(f"not an RFC 822 message: line {line_of(bad.start())} is not a header field")
    if _FROM_FIELD.search(block) is None:
        raise InvalidMessage("not an RFC 822 message: it has no From: header field")


def starts_with_field(data: bytes) -> bool:
    """Does `data` begin with a header field (`Name: ...`), as a message does?"""
    return _FIELD.match(data) is not None


def field_name(line: bytes) -> bytes:
    return line.partition(b":")[0].rstrip(b" \t").lower()


def field_values(lines: Sequence[bytes], name: bytes) -> Iterable[bytes]:
    """Unfolded, stripped values of every field called `name` (lower case), in order."""
    value: Optional[bytes] = None
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if value is not None:
                value += b" " + line.strip()
            continue
        if value is not None:
            yield value
        value = line.partition(b":")[2].strip() if field_name(line) == name else None
    if value is not None:
        yield value


def _address_key(address: bytes) -> bytes:
    return address.strip().strip(b"<>").strip().lower()


def original_to_prefix(lines: Sequence[bytes], recipients: Sequence[str], newline: bytes) -> bytes:
    """`X-Original-To:` lines for each recipient the message does not already name there.

    Deterministic: the same input always gives the same bytes, so Rails' dedup still works.
    """
    present = {
        _address_key(address)
        for value in field_values(lines, b"x-original-to")
        for address in value.split(b",")
    }
    prefix = b""
    for recipient in recipients:
        encoded = recipient.encode("utf-8")
        if _address_key(encoded) in present:
            continue
        present.add(_address_key(encoded))
        prefix += b"X-Original-To: " + encoded + newline
    return prefix


def line_ending(raw: bytes, start: int) -> bytes:
    newline = raw.find(b"\n", start)
    return b"\r\n" if newline > start and raw[newline - 1 : newline] == b"\r" else b"\n"


def prepare(raw: bytes, *, recipients: Sequence[str] = (), max_size: Optional[int] = None) -> Prepared:
    """Validate `raw` and work out the exact bytes to send (raises InvalidMessage)."""
    start, header = validate(raw)
    prefix = b""
    if recipients:
        prefix = original_to_prefix(header_lines(header), recipients, line_ending(raw, start))
    prepared = Prepared(raw, start, prefix, header)
    if max_size is not None and prepared.size > max_size:  # what is sent, not what was read
        raise InvalidMessage(
            f"message of {prepared.size} bytes is over the --max-size limit of {max_size} bytes",
            Reason.TOO_BIG,
        )
    return prepared
