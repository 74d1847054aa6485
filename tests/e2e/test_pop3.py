"""POP3 accounts (source = "pop3") against the real Dovecot's POP3 (dovecot-pop3d), into a 204
ingress, `mailbox-relay serve` with a wrong password, and through a proxy that cuts the
connection just before QUIT."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, List

from ..helpers import invoke
from ..peers import FaultProxy, Ingress204, LocalServe
from .test_fetch import Account, Watch, ingress, messages
from .world import Dovecot, message

__all__ = ["ingress"]  # the fixture, shared with test_fetch


class Pop3Account(Account):
    """A Dovecot user read over POP3 (its IMAP side is how the tests add and count mail)."""

    def write(self, url: str, ingress_password: str = "pw", port: Any = None, **account: Any) -> None:
        super().write(url, ingress_password, port or self.dovecot.pop3_port, source="pop3", **account)


# Byte-exactness: 8-bit bytes, lines that start with "." (dot-stuffed on the wire), a lone "."
# inside the body, and a line far longer than poplib's 2048-byte line limit.
TRICKY = (
    b"From: a@example.com\r\nSubject: tricky\r\nMessage-ID: <tricky@e2e.example>\r\n\r\n"
    b"\xe9t\xe9 \xff\xfe 8-bit\r\n.starts with a dot\r\n..two dots\r\n.\r\nafter a lone dot\r\n"
    + b"x" * 5000
    + b"\r\n.\r\nend\r\n"
)


def test_pop3_delivers_each_message_once_byte_exact_and_keeps_it(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Pop3Account(dovecot, tmp_path, ingress.url)
    raws = [*messages(3, "pop3"), TRICKY]
    box.append(*raws)
    code, out, err = box.fetch()
    assert (code, err) == (0, ""), out
    assert sorted(ingress.bodies) == sorted(raws)  # the very bytes Dovecot holds
    assert "INBOX: 4 found, 4 delivered" in out
    assert box.fetch()[0] == 0
    box.append(message("pop3 later"))
    code, out, _ = box.fetch("--json")
    assert code == 0 and json.loads(out)["delivered"] == 1, out
    assert len(ingress.bodies) == 5 and box.count() == 5  # after = keep


def test_pop3_deletes_only_after_a_2xx(tmp_path: Path, dovecot: Dovecot, ingress: Ingress204) -> None:
    box = Pop3Account(dovecot, tmp_path, ingress.url, after="delete")
    box.append(*messages(3, "pop3 delete"))
    with LocalServe(str(tmp_path / "serve"), password="right") as serve:
        box.write(serve.url, "wrong", after="delete")
        code, out, _ = box.fetch()
        assert code == 75 and "paused: 4.7.0" in out, out
        assert box.count() == 3
    box.write(ingress.url, after="delete")
    code, out, _ = box.fetch()
    assert code == 0, out
    assert len(ingress.bodies) == 3 and box.count() == 0


def test_a_connection_lost_before_quit_deletes_nothing_and_the_next_pass_deletes_without_posting(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    with FaultProxy(dovecot.pop3_port) as proxy:
        proxy.cut_before = b"QUIT"
        box = Pop3Account(dovecot, tmp_path, ingress.url, after="delete", port=proxy.port)
        box.append(*messages(2, "lost quit"))
        code, out, _ = box.fetch()
        assert proxy.cuts == 1, out
        assert code == 0 and len(ingress.bodies) == 2, out
        assert box.count() == 2  # the DELEs died with the connection
        proxy.cut_before = None
        code, out, _ = box.fetch()
        assert code == 0, out
        assert "2 delivered earlier deleted from the server" in out
        assert len(ingress.bodies) == 2 and box.count() == 0  # deleted, not posted again


def test_delete_after_keeps_mail_until_it_is_old_enough(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Pop3Account(dovecot, tmp_path, ingress.url, delete_after="2d")
    box.append(*messages(2, "aging"))
    assert box.fetch()[0] == 0 and len(ingress.bodies) == 2
    assert box.fetch()[0] == 0 and box.count() == 2  # delivered a moment ago: kept
    with sqlite3.connect(box.state) as db:  # as if delivered three days ago
        db.execute("UPDATE messages SET first_failed = first_failed - 3 * 86400")
    box.append(message("aging new"))
    code, out, _ = box.fetch()
    assert code == 0, out
    assert len(ingress.bodies) == 3 and box.count() == 1  # the new one stays: it is fresh


def test_a_message_over_max_size_is_recorded_as_failed_and_left_on_the_server(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Pop3Account(dovecot, tmp_path, ingress.url, after="delete")
    with box.config.open("r+") as config:
        text = config.read()
        config.seek(0)
        config.write(text.replace("retry_for = 0", "retry_for = 0\nmax_size = 2000"))
    big = b"From: a@example.com\r\nSubject: big\r\n\r\n" + b"y" * 5000 + b"\r\n"
    box.append(message("small"), big)
    code, out, err = box.fetch()
    assert code == 65, out  # only an invalid message is left
    assert "1 invalid" in out
    assert "invalid, left on the server: 5.3.4 message is" in err and "over max_size 2000" in err, err
    assert ingress.bodies == [message("small")] and box.count() == 1
    assert box.fetch()[0] == 0 and len(ingress.bodies) == 1 and box.count() == 1  # recorded: not again


def test_start_new_leaves_what_was_there_alone(tmp_path: Path, dovecot: Dovecot, ingress: Ingress204) -> None:
    box = Pop3Account(dovecot, tmp_path, ingress.url, start="new")
    box.append(*messages(2, "there before"))
    code, out, _ = invoke(["check", "--account", "box"], env=box.env())
    assert "2 existing messages left alone" in out and "UIDL" in out, out
    ingress.bodies.clear()  # check's probe
    code, out, _ = box.fetch()
    assert code == 0 and ingress.bodies == [] and "2 existing messages left alone" in out, out
    box.append(message("arrived after"))
    assert box.fetch()[0] == 0
    assert ingress.bodies == [message("arrived after")]


def test_check_account_says_what_pop3_offers_and_a_wrong_password_is_77(
    tmp_path: Path, dovecot: Dovecot
) -> None:
    with LocalServe(str(tmp_path / "serve")) as serve:
        box = Pop3Account(dovecot, tmp_path, serve.url)
        box.append(message("counted"))
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 0, out
        for line in ("pop3 dns", "pop3 tcp", "pop3 tls", "(USER/PASS)", "told apart by UIDL", "1 messages"):
            assert line in out, out
        box.write(serve.url, password="wrong")
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 77 and "check the password of account box" in out, out


def test_watch_polls_pop3_and_delivers_a_new_message_within_the_interval(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    box = Pop3Account(dovecot, tmp_path, ingress.url, start="new", poll_interval=1, after="delete")
    watches.append(Watch(box))
    assert "a new POP3 session each time" in watches[0].text()
    sent = time.monotonic()
    box.append(message("polled over pop3"))
    watches[0].wait_for(lambda: message("polled over pop3") in ingress.bodies, 1 + 10)
    assert time.monotonic() - sent < 1 + 10
    watches[0].wait_for(lambda: box.count() == 0, 10)  # the QUIT before the next wait applied DELE
    assert watches[0].stop() == 0
