"""The POP3 source against a scripted POP3 server (raw sockets): servers without UIDL or with
broken UIDLs, a trickled answer, XOAUTH2, and what POP3 accounts refuse in the config. The real
Dovecot's POP3 is in tests/e2e/test_pop3.py."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
from pathlib import Path
from typing import Dict, Iterator, List

import pytest

from mailbox_relay.accounts import parse_account
from mailbox_relay.outcome import ConfigError
from mailbox_relay.sources.pop3 import header_keys, read_multiline, uidl_trouble

from .helpers import invoke
from .peers import FaultProxy, Ingress204


class ScriptedPop3(threading.Thread):
    """A tiny POP3 server: USER/PASS (any password) or AUTH XOAUTH2, STAT, LIST, UIDL (`uidl`:
    "ok", "none" answers -ERR, "dup" gives every message the same UIDL), TOP n 0, RETR (dot-
    stuffed), DELE, QUIT (applies DELE). `said` records every command line but PASS's secret."""

    def __init__(self, messages: List[bytes], uidl: str = "ok") -> None:
        super().__init__(daemon=True)
        self.messages = list(messages)
        self.uidl = uidl
        self.said: List[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])

    def run(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _multi(self, connection: socket.socket, lines: List[bytes]) -> None:
        body = b"".join((b"." + line if line.startswith(b".") else line) for line in lines)
        connection.sendall(b"+OK\r\n" + body + b".\r\n")

    def _serve(self, connection: socket.socket) -> None:
        deleted = set()
        with connection, contextlib.suppress(OSError):
            lines = connection.makefile("rb")
            connection.sendall(b"+OK scripted POP3 ready\r\n")
            for line in lines:
                words = line.strip().split(b" ")
                command = words[0].upper()
                self.said.append(b"PASS ***" if command == b"PASS" else line.strip())
                numbers = [n for n in range(1, len(self.messages) + 1)]
                if command in (b"USER", b"PASS", b"NOOP"):
                    connection.sendall(b"+OK\r\n")
                elif command == b"AUTH":
                    connection.sendall(b"+ \r\n")
                    self.said.append(lines.readline().strip())
                    connection.sendall(b"+OK authenticated\r\n")
                elif command == b"STAT":
                    size = sum(len(m) for m in self.messages)
                    connection.sendall(b"+OK %d %d\r\n" % (len(self.messages), size))
                elif command == b"LIST":
                    self._multi(connection, [b"%d %d\r\n" % (n, len(self.messages[n - 1])) for n in numbers])
                elif command == b"UIDL" and self.uidl == "none":
                    connection.sendall(b"-ERR unknown command\r\n")
                elif command == b"UIDL":
                    uidl = (lambda n: b"same") if self.uidl == "dup" else (lambda n: b"uid-%d" % n)
                    self._multi(connection, [b"%d %s\r\n" % (n, uidl(n)) for n in numbers])
                elif command in (b"TOP", b"RETR"):
                    raw = self.messages[int(words[1]) - 1]
                    if command == b"TOP":
                        raw = raw.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
                    self._multi(connection, raw.splitlines(keepends=True))
                elif command == b"DELE":
                    deleted.add(int(words[1]))
                    connection.sendall(b"+OK\r\n")
                elif command == b"QUIT":
                    self.messages = [m for n, m in enumerate(self.messages, 1) if n not in deleted]
                    connection.sendall(b"+OK bye\r\n")
                    return
                else:
                    connection.sendall(b"-ERR not in this script\r\n")

    def __enter__(self) -> ScriptedPop3:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.listener.close()


def raw(n: int) -> bytes:
    return f"From: a@example.com\r\nSubject: scripted {n}\r\n\r\nbody {n}\r\n.dot line\r\n".encode()


def write_config(tmp_path: Path, url: str, port: int, **account: object) -> Dict[str, str]:
    table = {
        "source": "pop3",
        "host": "127.0.0.1",
        "port": port,
        "tls": "none",
        "username": "u",
        "password": "p",
        "start": "all",
        **account,
    }
    lines = [
        f'url = "{url}"',
        'password = "pw"',
        f'fetch_state = "{tmp_path / "state.sqlite3"}"',
        "retry_for = 0",
    ]
    lines += ["[accounts.box]", *(f"{key} = {json.dumps(value)}" for key, value in table.items())]
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    return {"MAILBOX_RELAY_CONFIG": str(config)}


@pytest.fixture
def ingress() -> Iterator[Ingress204]:
    with Ingress204() as server:
        yield server


@pytest.mark.parametrize("uidl", ["none", "dup"])
def test_without_usable_uidls_messages_are_told_apart_by_their_headers(
    tmp_path: Path, ingress: Ingress204, uidl: str
) -> None:
    messages = [raw(1), raw(2), raw(1)]  # the third is a copy of the first: "#2"
    with ScriptedPop3(messages, uidl=uidl) as server:
        env = write_config(tmp_path, ingress.url, server.port, after="delete")
        code, out, err = invoke(["fetch"], env=env)
        assert (code, err) == (0, ""), out
        assert sorted(ingress.bodies) == sorted(messages)  # dot-stuffing undone, the copy too
        assert server.messages == []  # DELE, applied by QUIT
        assert sum(said.startswith(b"TOP ") for said in server.said) == 3
        server.messages.append(raw(3))
        code, out, _ = invoke(["fetch"], env=env)
        assert code == 0 and ingress.bodies[-1] == raw(3) and len(ingress.bodies) == 4, out
        server.messages += [raw(4), raw(5)]
        code, out, _ = invoke(["check", "--account", "box"], env=env)
        assert "told apart by a digest of each message's headers" in out, out
        why = "has no UIDL" if uidl == "none" else "gives two messages the same UIDL"
        assert why in out


def test_a_trickled_answer_is_cut_off_by_the_accounts_timeout(tmp_path: Path, ingress: Ingress204) -> None:
    with ScriptedPop3([raw(1)]) as server, FaultProxy(server.port) as proxy:
        proxy.trickle_after(b"RETR", 0.2)
        env = write_config(tmp_path, ingress.url, proxy.port, timeout=1)
        code, out, _ = invoke(["fetch"], env=env)
        assert code == 75, out
        assert "no answer to RETR within 1s" in out
        assert ingress.bodies == []


def test_xoauth2_logs_in_with_the_token_and_never_sends_it_elsewhere(
    tmp_path: Path, ingress: Ingress204
) -> None:
    with ScriptedPop3([raw(1)]) as server:
        env = write_config(
            tmp_path,
            ingress.url,
            server.port,
            password=None,
            auth="xoauth2",
            oauth2_token_command="echo the-token",
        )
        config = Path(env["MAILBOX_RELAY_CONFIG"])
        config.write_text(config.read_text().replace("password = null\n", ""))
        code, out, _ = invoke(["fetch"], env=env)
        assert code == 0 and ingress.bodies == [raw(1)], out
        sent = base64.b64encode(b"user=u\x01auth=Bearer the-token\x01\x01")
        assert server.said[:2] == [b"AUTH XOAUTH2", sent]
        assert not any(b"USER" in said for said in server.said)


def test_read_multiline_undoes_dot_stuffing_and_keeps_every_byte() -> None:
    wire = b"a\r\n..b\r\n.c\n" + b"x" * 200_000 + b"\r\n..\r\n\xe9\r\n.\r\n"
    assert read_multiline(io.BytesIO(wire)) == b"a\r\n.b\r\nc\n" + b"x" * 200_000 + b"\r\n.\r\n\xe9\r\n"
    with pytest.raises(EOFError):
        read_multiline(io.BytesIO(b"cut short\r\n"))


def test_uidls_must_be_unique_well_formed_and_one_per_message() -> None:
    assert uidl_trouble([(1, b"a"), (2, b"b")], 2) is None
    assert "same UIDL" in str(uidl_trouble([(1, b"a"), (2, b"a")], 2))
    assert "1 of 2" in str(uidl_trouble([(1, b"a")], 2))
    assert "malformed" in str(uidl_trouble([(1, b"a b\x01")], 1))
    assert header_keys([b"h", b"h"])[1].endswith("#2")


@pytest.mark.parametrize(
    "table, words",
    [
        ({"after": "seen"}, 'use "keep" or "delete"'),
        ({"after": "move:Done"}, 'use "keep" or "delete"'),
        ({"folders": ["INBOX", "Sent"]}, "one maildrop and no folders"),
        ({"start": "2024-01-01"}, "cannot search by date"),
        ({"after": "delete", "delete_after": "30d"}, 'set after = "keep" with it'),
        ({"delete_after": "soon"}, 'a duration such as "30d"'),
        ({"source": "imap", "delete_after": "30d"}, "POP3 accounts only"),
    ],
)
def test_what_pop3_cannot_do_is_a_config_error(table: Dict[str, object], words: str) -> None:
    base = {"source": "pop3", "host": "mail.example", "username": "u", "password": "p", **table}
    with pytest.raises(ConfigError) as raised:
        parse_account("box", base, "c")
    assert words in raised.value.outcome.detail


def test_pop3_ports_presets_and_delete_after() -> None:
    account = parse_account("box", {"source": "pop3", "host": "h", "username": "u", "password": "p"}, "c")
    assert (account.port, account.tls, account.folders) == (995, "implicit", ("INBOX",))
    starttls = parse_account(
        "box", {"source": "pop3", "host": "h", "username": "u", "password": "p", "tls": "starttls"}, "c"
    )
    assert starttls.port == 110
    gmail = parse_account(
        "box",
        {"source": "pop3", "provider": "gmail", "username": "u", "password": "p", "delete_after": 30},
        "c",
    )
    assert (gmail.host, gmail.port, gmail.delete_after) == ("pop.gmail.com", 995, 30 * 86400.0)
