"""The validator and what we add to a message: pure bytes in, bytes out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbox_relay.message import (
    body_start,
    field_values,
    header_end,
    header_lines,
    original_to_prefix,
    prepare,
)
from mailbox_relay.outcome import InvalidMessage, Kind, Reason


def rejected(raw: bytes, **kw: object) -> str:
    with pytest.raises(InvalidMessage) as info:
        prepare(raw, **kw)  # type: ignore[arg-type]
    assert info.value.outcome.kind is Kind.PERMANENT
    return info.value.outcome.line()


@pytest.mark.parametrize(
    "raw",
    [
        b"From: a@example.com\n\nbody\n",
        b"From: a@example.com\r\nTo: b@example.com\r\n\r\nbody\r\n",
        b"From: a@example.com\nSubject: only headers\n",  # header-only
        b"From: a@example.com",  # no newline at all
        b"Subject: caf\xc3\xa9\nFrom: \xc3\xa9@example.com\n\n",  # RFC 6532 8-bit headers
        b"From: a@example.com\nSubject: folded\n  continued\n\tand again\n\nbody",
        b"From: a@example.com\nX-Long: " + b"x" * 5000 + b"\n\n" + b"y" * 20000,
        b"FROM : a@example.com\n\n",  # obsolete syntax: space before the colon, any case
        b"From: a@example.com\n\n\x00 NUL in the body is fine\n",
    ],
)
def test_accepts_what_real_mail_does_and_sends_it_unchanged(raw: bytes) -> None:
    prepared = prepare(raw)
    assert prepared.to_bytes() == raw
    assert prepared.size == len(raw)


def test_strips_one_leading_mbox_from_line_only() -> None:
    raw = b"From alice@example.com Thu Jun 11 00:38:38 2020\nFrom: a@example.com\n\nFrom the body\n"
    assert prepare(raw).to_bytes() == b"From: a@example.com\n\nFrom the body\n"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"", "the input is empty"),
        (b"\n\n  \r\n", "the input is empty"),
        (b"From someone Thu Jun 11 2020\n", "the input is empty"),
        (b"hello world\nFrom: a@example.com\n\n", "line 1 is not a header field (no header section)"),
        (b"\nFrom: a@example.com\n", "line 1 is not a header field"),
        (b" folded: first\nFrom: a@example.com\n\n", "line 1 is not a header field"),
        (b"From: a@example.com\nTo: b\nthis is not a field\n\n", "line 3 is not a header field"),
        (b"From x Mon\nFrom: a@example.com\nbad line\n\n", "line 3 is not a header field"),
        (b"From: a@example.com\nX\x00Bad: v\n\n", "NUL byte in header line 2"),
        (b"From: a@example.com\nX-Bad: v\x00\n\n", "NUL byte in header line 2"),
        (b"To: b@example.com\nSubject: no sender\n\nbody", "no From: header field"),
        (b": empty name\nFrom: a@example.com\n\n", "line 1 is not a header field"),
        (b"Bad Name: v\nFrom: a@example.com\n\n", "line 1 is not a header field"),
    ],
)
def test_rejects_what_is_not_a_message_with_the_line_to_look_at(raw: bytes, expected: str) -> None:
    line = rejected(raw)
    assert line.startswith("5.6.0 not an RFC 822 message: ")
    assert expected in line


def test_max_size_is_permanent_and_names_both_sizes() -> None:
    line = rejected(b"From: a@example.com\n\n" + b"x" * 100, max_size=50)
    assert line.startswith(Reason.TOO_BIG.code)
    assert "121 bytes" in line and "50 bytes" in line
    assert prepare(b"From: a@example.com\n\n", max_size=21).size == 21


def test_original_to_is_prepended_per_missing_recipient_with_the_message_line_ending() -> None:
    raw = b"From: a@example.com\r\nX-Original-To: <Bob@Example.com>\r\nTo: x@example.com\r\n\r\nhi\r\n"
    prepared = prepare(raw, recipients=["bob@example.com", "carol@example.com", "dave@example.com"])
    assert prepared.prefix == b"X-Original-To: carol@example.com\r\nX-Original-To: dave@example.com\r\n"
    assert prepared.to_bytes() == prepared.prefix + raw


def test_original_to_is_deterministic_and_deduplicated() -> None:
    raw = b"From x Mon Jan  1 00:00:00 2024\nFrom: a@example.com\n\nbody\n"
    first = prepare(raw, recipients=["b@example.com", "B@example.com"]).to_bytes()
    again = prepare(raw, recipients=["b@example.com"]).to_bytes()
    assert first == again == b"X-Original-To: b@example.com\nFrom: a@example.com\n\nbody\n"


def test_original_to_reads_folded_and_listed_values() -> None:
    lines = [b"From: a@example.com", b"X-Original-To: one@example.com,", b"  two@example.com"]
    assert original_to_prefix(lines, ["two@example.com", "three@example.com"], b"\n") == (
        b"X-Original-To: three@example.com\n"
    )


def test_field_values_unfold() -> None:
    lines = [b"Subject: a", b" b", b"X-Gmail-Labels: Inbox,Spam", b"subject: c"]
    assert list(field_values(lines, b"subject")) == [b"a b", b"c"]
    assert list(field_values(lines, b"x-gmail-labels")) == [b"Inbox,Spam"]


def test_header_end_finds_the_first_empty_line_in_either_line_ending() -> None:
    assert header_end(b"A: b\r\n\r\nbody\n\nmore", 0) == 6
    assert header_end(b"A: b\n\nbody", 0) == 5
    assert header_end(b"A: b\n", 0) == 5
    assert header_lines(b"A: b\r\nC: d\r\n") == [b"A: b", b"C: d"]
    assert body_start(b"From x\nA: b\n") == 7


# --- properties ----------------------------------------------------------------------------

names = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126, blacklist_characters=":"),
    min_size=1,
    max_size=20,
)
values = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"").replace(b"\r", b"").replace(b"\0", b""))
fields = st.tuples(names, values).map(lambda nv: nv[0].encode() + b": " + nv[1])


@settings(max_examples=300, deadline=None)
@given(
    st.lists(fields, max_size=10),
    st.binary(max_size=300),
    st.sampled_from([b"\n", b"\r\n"]),
    st.booleans(),
)
def test_generated_valid_messages_are_accepted_byte_exact(
    others: list[bytes], body: bytes, newline: bytes, envelope: bool
) -> None:
    header = newline.join([b"From: a@example.com", *others]) + newline
    raw = header + newline + body
    prefix = b"From sender@example.com Mon Jan  1 00:00:00 2024" + newline if envelope else b""
    assert prepare(prefix + raw).to_bytes() == raw


addresses = st.from_regex(r"\A[a-z0-9.]{1,10}@[a-z0-9]{1,10}\.example\Z")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(addresses, max_size=3))
def test_arbitrary_bytes_never_crash_the_validator(raw: bytes, recipients: list[str]) -> None:
    try:
        prepared = prepare(raw, recipients=recipients)
    except InvalidMessage as error:
        assert error.outcome.reason in (Reason.INVALID_MESSAGE, Reason.TOO_BIG)
    else:
        assert prepared.to_bytes().endswith(raw[body_start(raw) :])
