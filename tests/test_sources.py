"""Splitting and reading sources: mboxo/mboxrd, CRLF, From in bodies, Takeout, Maildir, .eml, .gz."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mailbox_relay.sources.files import (
    EmlTree,
    Maildir,
    Mbox,
    NotASource,
    Source,
    detect,
    split_mbox,
    unescape_mboxrd,
)

from .corpus import TAKEOUT_FROM, mbox_bytes, message, write_eml_tree, write_maildir, write_mbox


def bodies(source: object) -> list[bytes]:
    return [raw for _, raw in source.messages()]  # type: ignore[attr-defined]


def detect_one(path: str) -> Source:
    (source,) = detect(path)
    return source


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
@pytest.mark.parametrize("newline", [b"\n", b"\r\n"])
def test_split_gives_each_message_with_its_from_line_and_exact_bytes(chunk: int, newline: bytes) -> None:
    messages = [message(n, newline=newline) for n in range(5)]
    data = mbox_bytes(messages, newline=newline)
    split = list(split_mbox(io.BytesIO(data), chunk))
    assert [raw.split(newline, 1)[1] for _, raw in split] == messages
    assert [offset for offset, _ in split] == [data.index(raw) for _, raw in split]


def test_from_in_a_body_does_not_split_but_a_real_separator_does() -> None:
    body = b"From here on, a line that starts with From\n>From an mboxo-quoted line\nFrom me to you"
    messages = [message(0, body=body), message(1)]
    split = list(split_mbox(io.BytesIO(mbox_bytes(messages))))
    assert len(split) == 2
    assert split[0][1].endswith(body + b"\n")


def test_takeout_separators(tmp_path: Path) -> None:
    messages = [message(n, labels="Inbox,Category Updates") for n in range(3)]
    path = write_mbox(tmp_path / "All mail.mbox", messages, separator=TAKEOUT_FROM)
    assert [raw.split(b"\n", 1)[1] for raw in bodies(detect_one(str(path)))] == messages


def test_mboxrd_unescapes_one_level_only_when_asked(tmp_path: Path) -> None:
    body = b">From quoted once\n>>From quoted twice\n> From not a quote"
    path = write_mbox(tmp_path / "rd.mbox", [message(0, body=body)])
    (raw_o,) = bodies(Mbox(str(path)))
    (raw_rd,) = bodies(Mbox(str(path), mboxrd=True))
    assert body in raw_o
    assert b"From quoted once\n>From quoted twice\n> From not a quote" in raw_rd
    assert unescape_mboxrd(b">>>From x\n") == b">>From x\n"


def test_huge_message_between_small_ones(tmp_path: Path) -> None:
    huge = message(1, body=b"x" * (20 * 1024 * 1024))
    messages = [message(0), huge, message(2)]
    path = write_mbox(tmp_path / "big.mbox", messages)
    got = [raw.split(b"\n", 1)[1] for raw in bodies(detect_one(str(path)))]
    assert got == messages


def test_gzip_is_read_transparently(tmp_path: Path) -> None:
    messages = [message(n) for n in range(4)]
    path = write_mbox(tmp_path / "archive.mbox.gz", messages, gz=True)
    source = detect_one(str(path))
    assert isinstance(source, Mbox)
    assert [raw.split(b"\n", 1)[1] for raw in bodies(source)] == messages


def test_maildir_new_and_cur_with_flags_ignored(tmp_path: Path) -> None:
    messages = [message(n) for n in range(5)]
    source = detect_one(str(write_maildir(tmp_path / "Maildir", messages)))
    assert isinstance(source, Maildir)
    keyed = list(source.messages())
    assert sorted(raw for _, raw in keyed) == sorted(messages)
    assert all(":" not in key for key, _ in keyed)  # keys survive a flag change
    assert source.size() == sum(len(m) for m in messages)


def test_eml_tree_and_single_eml(tmp_path: Path) -> None:
    messages = [message(n) for n in range(6)]
    source = detect_one(str(write_eml_tree(tmp_path / "export", messages)))
    assert isinstance(source, EmlTree)
    keyed = dict(source.messages())
    assert len(keyed) == 6 and "folder1/1.eml" in keyed
    single = detect_one(str(tmp_path / "export" / "folder0" / "0.eml"))
    assert list(single.messages()) == [("0.eml", messages[0])]


def test_inputs_that_are_none_of_these_are_named(tmp_path: Path) -> None:
    with pytest.raises(NotASource, match="no such file"):
        detect_one(str(tmp_path / "missing"))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x00\x01 not mail")
    with pytest.raises(NotASource, match="not an mbox file"):
        detect_one(str(junk))


def test_reading_never_modifies_the_input(tmp_path: Path) -> None:
    path = write_mbox(tmp_path / "a.mbox", [message(n) for n in range(3)])
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    bodies(detect_one(str(path)))
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_from_line_splits_only_after_a_blank_line() -> None:
    first = b"From: a@example.com\n\nHello\nFrom bob Tue Jan  2 10:00:00 2024 said hi\nbye\n"
    second = b"From: b@example.com\n\nsecond\n"
    data = b"From x Mon Jan  1 00:00:00 2024\n" + first + b"\nFrom y Mon Jan  1 00:00:00 2024\n" + second
    for chunk in (1, 5, 64, 1 << 20):
        got = [raw for _, raw in split_mbox(io.BytesIO(data), chunk=chunk)]
        assert [raw.split(b"\n", 1)[1] for raw in got] == [first, second]
    crlf = data.replace(b"\n", b"\r\n")
    assert len(list(split_mbox(io.BytesIO(crlf)))) == 2


def test_an_obsolete_from_field_is_a_message_not_an_mbox(tmp_path: Path) -> None:
    path = tmp_path / "old.eml"
    path.write_bytes(b"From : alice@example.com\nSubject: old\n\nbody\n")
    assert detect_one(str(path)).kind == ".eml message"


def test_a_gz_of_several_members_is_read_whole(tmp_path: Path) -> None:
    import gzip

    messages = [message(n) for n in range(4)]
    path = tmp_path / "joined.mbox.gz"
    path.write_bytes(gzip.compress(mbox_bytes(messages[:2])) + gzip.compress(mbox_bytes(messages[2:])))
    assert [raw.split(b"\n", 1)[1] for raw in bodies(detect_one(str(path)))] == messages


def test_zero_padding_after_a_gz_is_its_end_not_damage(tmp_path: Path) -> None:
    import gzip

    messages = [message(n) for n in range(3)]
    path = tmp_path / "padded.mbox.gz"
    path.write_bytes(gzip.compress(mbox_bytes(messages)) + b"\0" * 100_000)
    assert [raw.split(b"\n", 1)[1] for raw in bodies(detect_one(str(path)))] == messages
