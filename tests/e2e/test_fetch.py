"""fetch, watch, status and check --account against the real Dovecot, into a 204 ingress, the
real Rails app, and through a TCP proxy that resets, closes or blackholes the IMAP connection."""

from __future__ import annotations

import imaplib
import json
import os
import re
import signal
import sqlite3
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import trustme

from ..helpers import invoke, wait_for
from ..peers import FaultProxy, Ingress204, LocalServe, RawServer
from .world import Dovecot, RailsApp, message


class Account:
    """One Dovecot user and a config file whose [accounts.box] reads it."""

    def __init__(
        self, dovecot: Dovecot, tmp: Path, url: str, ingress_password: str = "pw", **account: Any
    ) -> None:
        self.dovecot = dovecot
        self.user = dovecot.new_user()
        tmp.mkdir(parents=True, exist_ok=True)
        self.tmp = tmp
        self.config = tmp / "config.toml"
        self.state = tmp / "fetch.sqlite3"
        self.write(url, ingress_password, **account)

    def write(
        self, url: str, ingress_password: str = "pw", port: Optional[int] = None, **account: Any
    ) -> None:
        settings: Dict[str, Any] = {
            "host": "127.0.0.1",
            "port": port or self.dovecot.port,
            "tls": "none",
            "username": self.user,
            "password": f"secret-{self.user}",
            "start": "all",
            **account,
        }
        lines = [
            f'url = "{url}"',
            f'password = "{ingress_password}"',
            f'fetch_state = "{self.state}"',
            "retry_for = 0",
        ]
        lines += ["", "[accounts.box]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items() if value is not None]
        self.config.write_text("\n".join(lines) + "\n")

    def env(self) -> Dict[str, str]:
        return {"MAILBOX_RELAY_CONFIG": str(self.config)}

    def imap(self) -> imaplib.IMAP4:
        return self.dovecot.imap(self.user)

    def append(self, *raws: bytes, folder: str = "INBOX", date: Optional[float] = None) -> None:
        client = self.imap()
        for raw in raws:
            when = imaplib.Time2Internaldate(date) if date else None
            assert client.append(folder, None, when, raw)[0] == "OK"
        client.logout()

    def flags(self, folder: str = "INBOX") -> List[str]:
        client = self.imap()
        client.select(folder, readonly=True)
        _, data = client.fetch("1:*", "(FLAGS)")
        client.logout()
        return [item.decode() for item in data if isinstance(item, bytes)]

    def count(self, folder: str = "INBOX") -> int:
        client = self.imap()
        status, data = client.select(folder, readonly=True)
        client.logout()
        assert status == "OK", data
        return int(data[0] or 0)

    def create(self, folder: str) -> None:
        client = self.imap()
        client.create(folder)
        client.logout()

    def fetch(self, *args: str) -> tuple[int, str, str]:
        return invoke(["fetch", *args], env=self.env())

    def make_due(self) -> None:
        """As if the retry delay had passed."""
        with sqlite3.connect(self.state) as db:
            db.execute("UPDATE messages SET next_try = 0")


def messages(count: int, prefix: str = "fetch") -> List[bytes]:
    return [message(f"{prefix} {n}") for n in range(count)]


@pytest.fixture
def ingress() -> Iterator[Ingress204]:
    with Ingress204() as server:
        yield server


# --- fetch ----------------------------------------------------------------------------------


def test_fetch_delivers_each_message_once_byte_exact_and_a_second_fetch_none(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url)
    # IMAP stores CRLF; what it holds is what must arrive, 8-bit bytes included.
    raws = [*messages(5), b"From: a@example.com\r\nSubject: 8-bit\r\n\r\n\xe9\xff body\r\n"]
    box.append(*raws)
    code, out, err = box.fetch()
    assert (code, err) == (0, ""), out
    assert sorted(ingress.bodies) == sorted(raws)
    assert "6 found, 6 delivered" in out
    assert not any("\\Seen" in flags for flags in box.flags())  # BODY.PEEK[]: nothing marked read
    code, out, err = box.fetch("--json")
    assert json.loads(out)["delivered"] == 0 and code == 0
    assert len(ingress.bodies) == 6


def test_a_message_larger_than_a_fetch_piece_arrives_whole(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    line = b"0123456789" * 7 + b"abcdef\r\n"
    big = b"From: a@example.com\r\nSubject: big\r\n\r\n" + line * (9 * 1024 * 1024 // len(line)) + b"end\r\n"
    box = Account(dovecot, tmp_path, ingress.url, after="delete")
    box.append(message("small before"), big, message("small after"))
    code, out, _ = box.fetch()
    assert code == 0, out
    assert [len(body) for body in ingress.bodies] == [
        len(message("small before")),
        len(big),
        len(message("small after")),
    ]
    assert ingress.bodies[1] == big
    assert box.count() == 0


def test_start_new_skips_what_was_there_and_delivers_what_arrives_after(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, start="new")
    box.append(*messages(3, "old"))
    assert box.fetch()[0] == 0
    assert ingress.bodies == []
    box.append(message("new one"))
    assert box.fetch()[0] == 0
    assert ingress.bodies == [message("new one")]


def test_start_date_delivers_mail_since_that_day_then_everything_new(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, start="2024-06-01")
    box.append(message("before"), date=time.mktime((2024, 5, 1, 12, 0, 0, 0, 0, -1)))
    box.append(message("after"), date=time.mktime((2024, 7, 1, 12, 0, 0, 0, 0, -1)))
    assert box.fetch()[0] == 0
    assert ingress.bodies == [message("after")]
    # Once caught up, any new UID counts, whatever its date (mail moved in from an archive).
    box.append(message("moved in, old date"), date=time.mktime((2020, 1, 1, 12, 0, 0, 0, 0, -1)))
    assert box.fetch()[0] == 0
    assert ingress.bodies[-1] == message("moved in, old date")


@pytest.mark.parametrize("after", ["keep", "seen", "delete", "move:Processed"])
def test_after_is_applied_only_after_2xx(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, after: str
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, after=after)
    if after.startswith("move:"):
        box.create("Processed")
    box.append(*messages(3, after))
    # The ingress down, then a wrong password: nothing on the server may change.
    with LocalServe(str(tmp_path / "serve"), password="right") as serve:
        for url, password, line in (
            (ingress.url.replace(str(ingress.port), "9"), "pw", "4.4.1"),
            (serve.url, "wrong", "4.7.0"),
        ):
            box.write(url, password, after=after)
            code, out, _ = box.fetch()
            assert code == 75 and f"paused: {line}" in out, out
            assert box.count() == 3 and not any("\\Seen" in f or "\\Deleted" in f for f in box.flags())
    box.write(ingress.url, after=after)
    assert box.fetch()[0] == 0
    assert len(ingress.bodies) == 3
    if after == "keep":
        assert box.count() == 3 and not any("\\Seen" in flags for flags in box.flags())
    elif after == "seen":
        assert all("\\Seen" in flags for flags in box.flags())
    elif after == "delete":
        assert box.count() == 0
    else:
        assert (box.count(), box.count("Processed")) == (0, 3)


def test_an_invalid_message_is_recorded_left_on_the_server_and_saved(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, after="delete")
    invalid = b"this line is not a header field\r\n\r\nbody\r\n"
    box.append(message("good 1"), invalid, message("good 2"))
    code, out, err = box.fetch("--failed-dir", str(tmp_path / "failed"))
    assert code == 65, out
    assert "UID 2 invalid, left on the server: 5.6.0" in err
    assert ingress.bodies == [message("good 1"), message("good 2")]
    assert box.count() == 1
    saved = list((tmp_path / "failed" / "new").iterdir())
    assert [path.read_bytes() for path in saved] == [invalid]
    assert box.fetch()[0] == 0  # recorded: not tried again
    code, out, _ = invoke(["status", "--json"], env=box.env())
    row = json.loads(out)["folders"][0]
    assert (row["delivered"], row["invalid"], row["failed"]) == (2, 1, 0)


def test_a_poison_message_is_quarantined_while_the_others_flow(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, after="delete")
    box.config.write_text(box.config.read_text().replace("retry_for = 0", "retry_for = 0\nmax_tries = 3"))
    poison = message("poison", extra="X-Poison: yes\r\n")
    box.append(poison, message("fine 1"))
    ingress.poison = b"X-Poison: yes"
    code, out, _ = box.fetch()
    assert code == 75 and "1 failed" in out, out
    assert ingress.bodies == [message("fine 1")]
    for n in range(2, 4):
        box.append(message(f"fine {n}"))
        box.make_due()
        code, out, _ = box.fetch()
        assert code == 75
    assert "1 quarantined" in out, out
    assert ingress.bodies == [message(f"fine {n}") for n in range(1, 4)]
    assert box.count() == 1  # the poison message is still on the server
    box.append(message("fine 4"))
    box.make_due()
    code, out, _ = box.fetch()
    assert code == 0 and ingress.bodies[-1] == message("fine 4"), out  # quarantined: not tried
    _, out, _ = invoke(["status"], env=box.env())
    assert "quarantined UID 1 after 3 tries: 4.3.0" in out, out
    ingress.poison = b""  # the app fixed: --retry-quarantined gives it a fresh set of tries
    assert box.fetch()[0] == 0 and box.count() == 1  # not without the option
    code, out, err = box.fetch("--retry-quarantined")
    assert code == 0 and "1 quarantined messages get a fresh set of tries" in err, out
    assert ingress.bodies[-1] == poison and box.count() == 0


def test_the_same_500_for_everyone_quarantines_nothing(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url)
    box.config.write_text(box.config.read_text().replace("retry_for = 0", "retry_for = 0\nmax_tries = 2"))
    box.append(*messages(4, "broken app"))
    ingress.status = 500
    for _ in range(4):
        code, out, _ = box.fetch()
        assert code == 75 and "quarantined" not in out, out
        box.make_due()
    ingress.status = 204
    assert box.fetch()[0] == 0
    assert sorted(ingress.bodies) == sorted(messages(4, "broken app"))


def test_a_new_uidvalidity_loses_nothing(tmp_path: Path, dovecot: Dovecot, ingress: Ingress204) -> None:
    box = Account(dovecot, tmp_path, ingress.url, folders=["Work"], start="new")
    box.create("Work")
    assert box.fetch()[0] == 0
    box.append(message("work 1"), folder="Work")
    assert box.fetch()[0] == 0
    client = box.imap()  # the folder recreated: a new UIDVALIDITY, UIDs from 1 again
    client.delete("Work")
    client.create("Work")
    client.logout()
    box.append(message("work 1"), message("work 2"), folder="Work")
    code, _, err = box.fetch()
    assert code == 0 and "UIDVALIDITY changed" in err
    assert message("work 2") in ingress.bodies  # with UID 2, not above the old watermark of 1


def test_a_wrong_imap_password_and_a_missing_folder_fail_the_run_with_their_line(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, password="wrong", folders=["INBOX", "Nope"])
    code, out, _ = box.fetch()
    assert code == 75 and "IMAP login of" in out and "was rejected" in out, out
    box.write(ingress.url, folders=["Nope", "INBOX"])
    box.append(message("still fetched"))
    code, out, _ = box.fetch()
    assert code == 75 and "folder 'Nope' of account box cannot be opened" in out, out
    assert ingress.bodies == [message("still fetched")]


def test_an_account_whose_password_command_fails_does_not_stop_the_others(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url)
    box.append(message("other account still fetched"))
    broken = (
        f'[accounts.broken]\nhost = "127.0.0.1"\nport = {dovecot.port}\ntls = "none"\nusername = "x"\n'
        'password_command = "false"\n'
    )
    box.config.write_text(box.config.read_text().replace("[accounts.box]", broken + "\n[accounts.box]"))
    code, out, _ = box.fetch()
    assert code == 75 and "broken: password_command of account broken exited 1" in out, out
    assert ingress.bodies == [message("other account still fetched")]


def test_a_missing_move_target_is_said_before_anything_is_posted(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, after="move:Done")
    box.append(message("waits for its folder"))
    code, out, _ = box.fetch()
    assert code == 75 and "after = move:Done of account box, but there is no folder 'Done'" in out, out
    assert ingress.bodies == [] and box.count() == 1
    code, out, _ = invoke(["check", "--account", "box"], env=box.env())
    assert code == 78 and "✗ after: move:Done: there is no folder 'Done'" in out, out
    box.create("Done")
    assert box.fetch()[0] == 0
    assert (ingress.bodies, box.count(), box.count("Done")) == ([message("waits for its folder")], 0, 1)


# --- check --account -----------------------------------------------------------------------


def test_check_account_tells_password_folder_and_tls_apart(tmp_path: Path, dovecot: Dovecot) -> None:
    with LocalServe(str(tmp_path / "serve")) as serve:
        box = Account(dovecot, tmp_path, serve.url, folders=["INBOX"])
        box.append(*messages(2, "check"))
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 0, out
        assert "INBOX: 2 messages" in out and "IDLE yes" in out and "ready" in out
        assert serve.maildir.count() == 0  # created nothing
        box.write(serve.url, password="wrong")
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 77 and "✗ imap login" in out and "was rejected" in out, out
        box.write(serve.url, folders=["Nope"])
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 78 and "✗ folder Nope" in out, out
        box.write(serve.url, tls="implicit")
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 69 and "✗ imap tls" in out, out


def test_implicit_tls_is_verified_against_the_ca_bundle(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with FaultProxy(dovecot.port, tls=server) as proxy:
        box = Account(dovecot, tmp_path, ingress.url, port=proxy.port)
        box.write(ingress.url, port=proxy.port, tls="implicit")
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert code == 69 and "✗ imap tls: TLS with 127.0.0.1:" in out and "issuer certificate" in out, out
        assert "a private CA goes in ca_bundle of account box" in out
        box.write(ingress.url, port=proxy.port, tls="implicit", ca_bundle=str(bundle))
        code, out, _ = invoke(["check", "--account", "box"], env=box.env())
        assert "✓ imap tls: TLSv1." in out and "(implicit), certificate verified" in out, out
        box.append(message("over tls"))
        code, out, _ = box.fetch()
        assert code == 0 and ingress.bodies[-1:] == [message("over tls")], out  # (after check's probe)


# --- watch ---------------------------------------------------------------------------------


class Watch:
    def __init__(self, box: Account, *args: str) -> None:
        self.log = box.tmp / f"watch-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mailbox_relay", "watch", *args],
            env={**os.environ, **box.env()},
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )
        self.wait_for(lambda: "waiting for new mail" in self.text(), 20)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition: Callable[[], object], seconds: float) -> None:
        try:
            wait_for(condition, seconds)
        except AssertionError:
            raise AssertionError(f"timed out; watch said:\n{self.text()}") from None

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(30)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def test_watch_delivers_each_arrival_within_seconds_and_stops_cleanly_on_sigterm(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, start="new")
    watches.append(Watch(box))
    for n in range(3):
        sent = time.monotonic()
        box.append(message(f"live {n}"))
        wait_for(lambda n=n: len(ingress.bodies) > n, 5)  # type: ignore[misc]
        assert time.monotonic() - sent < 3
    _, out, _ = invoke(["status", "--json"], env=box.env())
    assert json.loads(out)["folders"][0]["watching"] is True
    assert watches[0].stop() == 0
    assert "stopped" in watches[0].text()
    _, out, _ = invoke(["status", "--json"], env=box.env())
    assert json.loads(out)["folders"][0]["watching"] is False


@pytest.mark.parametrize("fault", ["rst", "fin", "blackhole"])
def test_watch_survives_a_broken_connection(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch], fault: str
) -> None:
    with FaultProxy(dovecot.port) as proxy:
        box = Account(dovecot, tmp_path, ingress.url, start="new", port=proxy.port, idle_refresh=2, timeout=2)
        watches.append(Watch(box))
        getattr(proxy, fault)()
        box.append(message(f"after {fault}"))
        watches[0].wait_for(lambda: message(f"after {fault}") in ingress.bodies, 20)
        assert proxy.connections >= 2, watches[0].text()


def test_watch_polls_where_the_server_has_no_idle_and_moves_without_move(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    with FaultProxy(dovecot.port) as proxy:
        proxy.hide = [b" IDLE", b" MOVE"]  # an older server: polling, and COPY + \\Deleted + UID EXPUNGE
        box = Account(dovecot, tmp_path, ingress.url, start="new", port=proxy.port, poll_interval=1)
        box.write(ingress.url, start="new", port=proxy.port, poll_interval=1, after="move:Done")
        box.create("Done")
        watches.append(Watch(box))
        assert "polling every 1s" in watches[0].text()
        box.append(message("polled"))
        watches[0].wait_for(lambda: message("polled") in ingress.bodies, 10)
        watches[0].wait_for(lambda: (box.count(), box.count("Done")) == (0, 1), 10)


def test_a_non_ascii_imap_password_logs_in(tmp_path: Path, dovecot: Dovecot, ingress: Ingress204) -> None:
    password = "pässwörd-€"
    with dovecot.passwd.open("a", encoding="utf-8") as passwd:
        passwd.write(f"unicode:{{PLAIN}}{password}\n")
    time.sleep(1.1)  # Dovecot rereads passwd-file when its mtime (seconds) changes
    box = Account(dovecot, tmp_path, ingress.url)
    box.user = "unicode"
    box.write(ingress.url, password=password)
    client = imaplib.IMAP4("127.0.0.1", dovecot.port)
    client.authenticate("PLAIN", lambda _: f"\0unicode\0{password}".encode())
    client.append("INBOX", None, None, message("for unicode"))
    client.logout()
    code, out, _ = box.fetch()
    assert code == 0, out
    assert ingress.bodies == [message("for unicode")]


def test_watch_bounds_each_whole_post_by_timeout_and_goes_on(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    with RawServer(["trickle"]) as slow:  # a 204 status line, one byte every half second
        box = Account(dovecot, tmp_path, slow.url, start="new")
        box.config.write_text(box.config.read_text().replace("retry_for = 0", "retry_for = 0\ntimeout = 1"))
        watches.append(Watch(box))
        box.append(message("trickled"))
        watches[0].wait_for(lambda: "did not answer within 1s" in watches[0].text(), 6)
    box.write(ingress.url, start="new")  # the state knows the message: it is tried again
    assert watches[0].stop() == 0
    watches.append(Watch(box))
    box.make_due()
    box.append(message("next"))
    watches[1].wait_for(lambda: sorted(ingress.bodies) == sorted([message("trickled"), message("next")]), 15)


def test_watch_survives_a_dovecot_restart(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, start="new")
    watches.append(Watch(box))
    dovecot.stop()
    time.sleep(1)
    dovecot.start()
    box.append(message("after restart"))
    wait_for(lambda: message("after restart") in ingress.bodies, 30)


def test_watch_exits_78_when_the_imap_login_is_rejected(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, password="wrong")
    result = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "watch"],
        env={**os.environ, **box.env()},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 78, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("(rejected 3 times; stopping)")


def test_kill_9_mid_delivery_then_a_restart_loses_nothing(
    tmp_path: Path, dovecot: Dovecot, watches: List[Watch]
) -> None:
    with Ingress204(delay=1.0) as slow:
        box = Account(dovecot, tmp_path, slow.url, start="new", after="delete")
        watches.append(Watch(box))
        box.append(*messages(3, "killed"))
        wait_for(lambda: slow.requests >= 1, 10)
        watches[0].kill()
    with Ingress204() as fast:
        box.write(fast.url, start="new", after="delete")
        watches.append(Watch(box))
        wait_for(lambda: box.count() == 0, 20)
        assert set(messages(3, "killed")) <= set(fast.bodies) | set(slow.bodies)


def test_two_watchers_on_one_mailbox_store_each_message_once_in_rails(
    tmp_path: Path, dovecot: Dovecot, rails: RailsApp, watches: List[Watch]
) -> None:
    first = Account(
        dovecot, tmp_path / "a", rails.url, ingress_password=rails.password, start="new", after="delete"
    )
    second = Account(
        dovecot, tmp_path / "b", rails.url, ingress_password=rails.password, start="new", after="delete"
    )
    second.user = first.user
    second.write(rails.url, rails.password, start="new", after="delete")
    for box in (first, second):  # the SQLite test app answers 500 to concurrent posts: retry them
        box.config.write_text(box.config.read_text().replace("retry_for = 0", "retry_for = 30"))
    watches += [Watch(first), Watch(second)]
    raws = messages(6, "twice watched")
    first.append(*raws)
    try:
        wait_for(lambda: first.count() == 0, 60)
    except AssertionError:
        raise AssertionError("\n".join(watch.text() for watch in watches)) from None
    # What Rails stored, not what it routed: two watchers post at once, and the SQLite test app
    # sometimes stores a message but fails its routing job ("database is locked"; see #15).
    expected = sorted(f"twice-watched-{n}@e2e.example" for n in range(6))
    assert sorted(rails.stored_message_ids()) == expected


# --- under attack (issue 25): epochs, races, dropped connections, stops, secrets, status -------


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_a_new_uidvalidity_delivers_back_dated_messages_in_the_same_run(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    """The attack's steps: m1 delivered; the folder deleted and re-created; m3 (three days old),
    m4 (2020-01-01) and m2 (now) appended. One fetch posts all three, and says all is done."""
    box = Account(dovecot, tmp_path, ingress.url, folders=["Work"], start="new")
    box.create("Work")
    assert box.fetch()[0] == 0
    box.append(message("m1"), folder="Work")
    assert box.fetch()[0] == 0
    client = box.imap()
    client.delete("Work")
    client.create("Work")
    client.logout()
    box.append(message("m3"), folder="Work", date=time.time() - 3 * 86400)
    box.append(message("m4"), folder="Work", date=time.mktime((2020, 1, 1, 12, 0, 0, 0, 0, -1)))
    box.append(message("m2"), folder="Work")
    code, out, err = box.fetch()
    assert code == 0 and "UIDVALIDITY changed" in err, (out, err)
    assert sorted(ingress.bodies[1:]) == sorted(message(m) for m in ("m2", "m3", "m4"))
    assert box.fetch()[0] == 0 and len(ingress.bodies) == 4  # nothing later, nothing twice


def test_the_first_fetch_says_what_start_new_left_alone(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, start="new")
    box.append(*messages(5, "old"))
    code, out, _ = box.fetch()
    assert code == 0 and ingress.bodies == [], out
    assert '5 existing messages left alone (start = "new"); set start = "all" or a date' in out, out


def test_two_fetches_on_one_state_post_each_message_once(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, after="delete")
    raws = messages(300, "raced")
    box.append(*raws)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "mailbox_relay", "fetch"],
            env={**os.environ, **box.env()},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for _ in range(2)
    ]
    results = [(run.wait(60), *(stream.decode() for stream in run.communicate())) for run in runs]
    assert sorted(ingress.bodies) == sorted(raws), results  # each once
    assert all(code in (0, 75) for code, _, _ in results), results
    assert not any("EXPUNGEISSUED" in out + err or "internal error" in out + err for _, out, err in results)
    assert box.count() == 0


@pytest.mark.parametrize("fault", ["rst", "fin"])
def test_watch_notices_a_dropped_idle_connection_at_once_without_spinning(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch], fault: str
) -> None:
    with FaultProxy(dovecot.port) as proxy:
        box = Account(dovecot, tmp_path, ingress.url, start="new", port=proxy.port)  # idle_refresh 90 s
        watch = Watch(box)
        watches.append(watch)
        time.sleep(0.5)  # into IDLE
        before = cpu_seconds(watch.process.pid)
        getattr(proxy, fault)()
        box.append(message(f"after {fault}"))
        watch.wait_for(lambda: message(f"after {fault}") in ingress.bodies, 5)  # not idle_refresh later
        time.sleep(3)
        used = cpu_seconds(watch.process.pid) - before
        assert used < 1.0, f"{used:.2f}s of CPU in ~4s after {fault}\n{watch.text()}"
        assert "connection lost" in watch.text() or "closed the connection" in watch.text()


@pytest.mark.parametrize("fault", ["blackhole", "trickling ingress"])
def test_sigterm_ends_watch_within_5s_whatever_a_connection_is_doing(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, fault: str
) -> None:
    with FaultProxy(dovecot.port) as proxy, RawServer(["trickle"] * 5) as slow:
        url = slow.url if fault == "trickling ingress" else ingress.url
        box = Account(dovecot, tmp_path, url, start="new", port=proxy.port)
        box.config.write_text(box.config.read_text().replace("retry_for = 0", "retry_for = 60\ntimeout = 30"))
        watch = Watch(box)
        try:
            if fault == "blackhole":
                proxy.blackhole()
                box.append(message("into the hole"))  # the IDLE answer never comes
            else:
                box.append(message("trickled"))
                wait_for(lambda: slow.connections >= 1, 10)
            time.sleep(1)
            started = time.monotonic()
            code = watch.stop()
            assert time.monotonic() - started < 5, watch.text()
            assert code == 0 and "stopped" in watch.text(), watch.text()
        finally:
            watch.kill()


def test_a_failing_password_command_is_retried_and_watch_goes_on(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    """The secret store is locked for a while: watch says so, records it, and carries on."""
    box = Account(dovecot, tmp_path, ingress.url, start="new")
    unlocked = tmp_path / "unlocked"
    script = tmp_path / "secret.sh"
    script.write_text(f'#!/bin/sh\ntest -e {unlocked} || exit 3\necho "secret-{box.user}"\n')
    script.chmod(0o700)
    box.write(ingress.url, start="new", password=None, password_command=str(script))
    log = tmp_path / "watch.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "watch"],
        env={**os.environ, **box.env()},
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )
    try:
        wait_for(lambda: "exited 3; run it by hand to see why; trying again" in log.read_text(), 10)
        time.sleep(2)
        assert process.poll() is None, log.read_text()  # not 78: a command that fails is temporary
        _, out, _ = invoke(["status", "--json"], env=box.env())
        (row,) = json.loads(out)["folders"]
        assert "password_command of account box exited 3" in row["last_error"], row
        unlocked.touch()
        wait_for(lambda: "waiting for new mail" in log.read_text(), 30)
        box.append(message("after the vault opened"))
        wait_for(lambda: message("after the vault opened") in ingress.bodies, 10)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(10)
    assert code == 0, log.read_text()


def test_status_stops_calling_a_renamed_folder_watched(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, folders=["Work"], start="new", idle_refresh=1, timeout=2)
    box.create("Work")
    watches.append(Watch(box))
    _, out, _ = invoke(["status", "--json"], env=box.env())
    assert json.loads(out)["folders"][0]["watching"] is True
    client = box.imap()
    assert client.rename("Work", "Elsewhere")[0] == "OK"
    client.logout()

    def not_watched() -> bool:
        _, out, _ = invoke(["status", "--json"], env=box.env())
        row = json.loads(out)["folders"][0]
        return row["watching"] is False and "Work" in (row["last_error"] or "")

    watches[0].wait_for(not_watched, 15)
    assert watches[0].process.poll() is None  # it keeps trying: the folder may come back


def test_one_folders_retries_never_delay_another_folders_first_attempt(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    """Folder A's message gets 500 after 500 (retried for 20 s); folder B's arrives meanwhile
    and is posted at once, not after A's retries (each folder posts on its own)."""
    ingress.poison = b"Subject: stuck in A"
    box = Account(dovecot, tmp_path, ingress.url, folders=["INBOX", "B"], start="new")
    box.config.write_text(box.config.read_text().replace("retry_for = 0", "retry_for = 20"))
    box.create("B")
    watches.append(Watch(box))
    watches[0].wait_for(lambda: watches[0].text().count("waiting for new mail") == 2, 20)
    box.append(message("stuck in A"))
    watches[0].wait_for(lambda: ingress.requests >= 2, 10)  # A is retrying now
    sent = time.monotonic()
    box.append(message("free in B"), folder="B")
    watches[0].wait_for(lambda: message("free in B") in ingress.bodies, 10)
    assert time.monotonic() - sent < 3, watches[0].text()
    # retry lines name the account, the folder and the message
    assert re.search(r"box/INBOX: UID \d+: attempt \d", watches[0].text()), watches[0].text()


def test_check_account_says_what_the_first_pass_will_leave_alone(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    box = Account(dovecot, tmp_path, ingress.url, start="new")  # (the 204 stub fails check's probe)
    box.append(*messages(3, "already there"))
    _, out, _ = invoke(["check", "--account", "box"], env=box.env())
    assert "✓ folder INBOX: 3 messages" in out, out
    assert '3 existing messages left alone (start = "new"); set start = "all" or a date' in out, out
    assert box.fetch()[0] == 0
    _, out, _ = invoke(["check", "--account", "box"], env=box.env())
    assert "✓ folder INBOX: 3 messages" in out and "left alone" not in out, out  # synced now


def test_a_notification_the_server_never_sends_delays_a_message_at_most_idle_refresh(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204, watches: List[Watch]
) -> None:
    """IDLE's "* N EXISTS" lost (as with a hibernated connection, seen in bench/watch_scale.py):
    the pass that follows every IDLE re-issue catches up by UID, so the message waits at most
    idle_refresh, never until the next one happens to arrive."""
    with FaultProxy(dovecot.port) as proxy:
        box = Account(dovecot, tmp_path, ingress.url, start="new", port=proxy.port, idle_refresh=3)
        watches.append(Watch(box))
        proxy.drop_lines = [b"EXISTS", b"RECENT"]
        sent = time.monotonic()
        box.append(message("never announced"))
        watches[0].wait_for(lambda: message("never announced") in ingress.bodies, 3 + 5)
        assert time.monotonic() - sent >= 0.5  # it came with the re-issue, not a notification
