"""`serve` against real HTTP clients: every status, dedup, concurrency, Maildir atomicity."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import requests

from .helpers import RELAY_PATH as PATH
from .peers import LocalServe, free_port

MESSAGE = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\nbody \xff\r\n"
AUTH = ("actionmailbox", "pw")
RFC822 = {"Content-Type": "message/rfc822"}


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[LocalServe]:
    with LocalServe(str(tmp_path / "inbox")) as server:
        yield server


def serve_process(args: List[str], env: Dict[str, str]) -> subprocess.Popen[bytes]:
    """`mailbox-relay serve ARGS` as a real process, its log on a pipe (password: pw unless env says)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "serve", *args],
        env={"MAILBOX_RELAY_PASSWORD": "pw", **env} if "--password-file" not in args else env,
        stderr=subprocess.PIPE,
    )


def stored(server: LocalServe) -> List[bytes]:
    new = Path(server.maildir.path) / "new"
    return sorted(path.read_bytes() for path in new.iterdir())


def test_accepts_and_stores_the_exact_bytes(serve: LocalServe) -> None:
    response = requests.post(serve.url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10)
    assert response.status_code == 204
    assert stored(serve) == [MESSAGE]
    assert os.listdir(Path(serve.maildir.path) / "tmp") == []
    (name,) = os.listdir(Path(serve.maildir.path) / "new")
    assert serve.lines == [f"127.0.0.1 POST {PATH} 204 {len(MESSAGE)} bytes new/{name}"]


def test_byte_identical_repost_is_a_204_that_stores_nothing(serve: LocalServe) -> None:
    for _ in range(3):
        assert (
            requests.post(serve.url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10).status_code == 204
        )
    different = MESSAGE.replace(b"body", b"Body")
    assert requests.post(serve.url, data=different, auth=AUTH, headers=RFC822, timeout=10).status_code == 204
    assert stored(serve) == sorted([MESSAGE, different])
    assert "duplicate, not stored" in serve.lines[1]


def test_dedup_survives_a_restart(tmp_path: Path) -> None:
    for _ in range(2):
        with LocalServe(str(tmp_path / "inbox")) as server:
            requests.post(server.url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10)
    assert len(os.listdir(tmp_path / "inbox" / "new")) == 1


@pytest.mark.parametrize(
    ("path", "auth", "content_type", "body", "status"),
    [
        ("/rails/action_mailbox/postfix/inbound_emails", AUTH, "message/rfc822", MESSAGE, 404),
        ("/", AUTH, "message/rfc822", MESSAGE, 404),
        (PATH, None, "message/rfc822", MESSAGE, 401),
        (
            PATH,
            ("actionmailbox", "no"),
            "message/rfc822",
            MESSAGE,
            401,
        ),
        (PATH, ("someone", "pw"), "message/rfc822", MESSAGE, 401),
        (PATH, AUTH, "text/plain", MESSAGE, 415),
        (PATH, AUTH, "message/rfc822; charset=utf-8", MESSAGE, 204),
        (PATH, AUTH, "MESSAGE/RFC822", MESSAGE, 204),
        (PATH, AUTH, "message/rfc822", b"", 422),
    ],
)
def test_answers_like_action_mailbox(
    serve: LocalServe, path: str, auth: object, content_type: str, body: bytes, status: int
) -> None:
    response = requests.post(
        serve.base + path,
        data=body,
        auth=auth,
        headers={"Content-Type": content_type},
        timeout=10,  # type: ignore[arg-type]
    )
    assert response.status_code == status
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Basic realm="Action Mailbox"'
    assert len(stored(serve)) == (1 if status == 204 else 0)


def test_get_is_not_routed(serve: LocalServe) -> None:
    assert requests.get(serve.url, auth=AUTH, timeout=10).status_code == 404


def test_auth_is_checked_before_the_media_type(serve: LocalServe) -> None:
    response = requests.post(serve.url, data=MESSAGE, auth=("actionmailbox", "no"), timeout=10)
    assert response.status_code == 401  # as in Rails: configuration, password, then type


def test_chunked_upload(serve: LocalServe) -> None:
    response = requests.post(
        serve.url, data=iter([MESSAGE[:10], MESSAGE[10:]]), auth=AUTH, headers=RFC822, timeout=10
    )
    assert response.status_code == 204
    assert stored(serve) == [MESSAGE]


def test_concurrent_posts_each_stored_once(serve: LocalServe) -> None:
    messages = [MESSAGE.replace(b"Subject: s", b"Subject: %d" % n) for n in range(40)]

    def post(body: bytes) -> int:
        return requests.post(serve.url, data=body, auth=AUTH, headers=RFC822, timeout=30).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(post, messages + messages))
    assert statuses == [204] * 80
    assert stored(serve) == sorted(messages)


def test_nothing_is_visible_in_new_until_the_whole_message_arrived(serve: LocalServe) -> None:
    head = (
        b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Basic YWN0aW9ubWFpbGJveDpwdw==\r\nContent-Type: message/rfc822\r\n"
        b"Content-Length: %d\r\n\r\n" % len(MESSAGE)
    )
    with socket.create_connection(("127.0.0.1", serve.port)) as conn:
        conn.sendall(head + MESSAGE[:20])
        time.sleep(0.3)
        assert stored(serve) == []
        assert os.listdir(Path(serve.maildir.path) / "tmp") == []
        conn.sendall(MESSAGE[20:])
        assert conn.recv(100).startswith(b"HTTP/1.1 204")
    assert stored(serve) == [MESSAGE]


def test_a_client_that_goes_away_mid_body_stores_nothing(serve: LocalServe) -> None:
    head = (
        b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Basic YWN0aW9ubWFpbGJveDpwdw==\r\nContent-Type: message/rfc822\r\n"
    )
    with socket.create_connection(("127.0.0.1", serve.port)) as conn:
        conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(MESSAGE) + MESSAGE[:20])
    with socket.create_connection(("127.0.0.1", serve.port)) as conn:
        conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n14\r\n" + MESSAGE[:20] + b"\r\n")
    time.sleep(0.3)
    assert stored(serve) == []
    assert requests.post(serve.url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10).status_code == 204


def test_deliver_command_into_serve(serve: LocalServe, clean_env: Dict[str, str]) -> None:
    env = {**clean_env, "MAILBOX_RELAY_PASSWORD": "pw"}
    result = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "deliver", "--url", serve.base],
        input=b"From x Mon\n" + MESSAGE,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, b"")
    assert stored(serve) == [MESSAGE]
    wrong = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "deliver", "--url", serve.base],
        input=MESSAGE,
        env={**env, "MAILBOX_RELAY_PASSWORD": "bad"},
        capture_output=True,
        timeout=60,
    )
    assert wrong.returncode == 75 and wrong.stderr.startswith(b"4.7.0 ")


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_the_serve_command_starts_logs_and_stops_on_ctrl_c_or_sigterm(
    tmp_path: Path, clean_env: Dict[str, str], stop: signal.Signals
) -> None:
    port = free_port()
    maildir = tmp_path / "inbox"
    process = serve_process(
        ["--port", str(port), "--maildir", str(maildir)], {**clean_env, "MAILBOX_RELAY_PASSWORD": "pw"}
    )
    assert process.stderr is not None
    first = process.stderr.readline().decode()
    assert f"listening on http://127.0.0.1:{port}{PATH}" in first
    url = f"http://127.0.0.1:{port}{PATH}"
    assert requests.post(url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10).status_code == 204
    assert b" 204 " in process.stderr.readline()
    process.send_signal(stop)
    assert process.wait(timeout=10) == 0
    assert process.stderr.read().decode().splitlines() == ["mailbox-relay: stopped"]
    assert [path.read_bytes() for path in (maildir / "new").iterdir()] == [MESSAGE]


def test_serve_refuses_to_start_without_a_password(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "serve", "--maildir", str(tmp_path / "m")],
        env=clean_env,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 78
    assert b"serve needs a password" in result.stderr


def test_serve_says_when_the_port_is_taken(
    serve: LocalServe, tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mailbox_relay",
            "serve",
            "--port",
            str(serve.port),
            "--maildir",
            str(tmp_path / "m"),
        ],
        env={**clean_env, "MAILBOX_RELAY_PASSWORD": "pw"},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 69
    assert f"cannot listen on 127.0.0.1:{serve.port}".encode() in result.stderr
    assert not (tmp_path / "m").exists()
    # Nor the default Maildir, in the current directory.
    default = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "serve", "--port", str(serve.port)],
        env={**clean_env, "MAILBOX_RELAY_PASSWORD": "pw"},
        capture_output=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert default.returncode == 69 and not (tmp_path / "mailbox-relay-inbox").exists()


def test_serve_reads_its_password_from_a_file(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    secret.chmod(0o600)
    port = free_port()
    args = ["--port", str(port), "--password-file", str(secret), "--maildir", str(tmp_path / "inbox")]
    process = serve_process(args, clean_env)
    try:
        assert process.stderr is not None
        assert b"listening on" in process.stderr.readline()
        url = f"http://127.0.0.1:{port}{PATH}"
        assert (
            requests.post(
                url, data=MESSAGE, auth=("actionmailbox", "from-file"), headers=RFC822, timeout=10
            ).status_code
            == 204
        )
        assert requests.post(url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10).status_code == 401
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)


HEAD = (
    b"POST " + PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Basic YWN0aW9ubWFpbGJveDpwdw==\r\nContent-Type: message/rfc822\r\n"
)


def raw_request(serve: LocalServe, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", serve.port), timeout=10) as conn:
        conn.sendall(request)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer


@pytest.mark.parametrize(
    "lengths",
    [b"Content-Length: 9\r\nContent-Length: %d\r\n", b"Content-Length: 9, %d\r\n"],
    ids=["two headers", "one list"],
)
def test_conflicting_content_lengths_are_refused_and_nothing_is_stored(
    serve: LocalServe, lengths: bytes
) -> None:
    answer = raw_request(serve, HEAD + lengths % len(MESSAGE) + b"\r\n" + MESSAGE)
    assert answer.startswith(b"HTTP/1.1 400")
    assert stored(serve) == []
    assert "conflicting Content-Length" in serve.lines[-1]


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "TRACE", "PROPFIND", "GET", "DELETE"])
def test_every_other_method_gets_404_as_in_rails(serve: LocalServe, method: str) -> None:
    response = requests.request(method, serve.url, auth=AUTH, timeout=10)
    assert response.status_code == 404
    assert stored(serve) == []


def test_a_huge_content_length_or_a_reset_is_one_log_line_and_no_traceback(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    port = free_port()
    process = serve_process(["--port", str(port), "--maildir", str(tmp_path / "in")], clean_env)
    assert process.stderr is not None
    try:
        assert b"listening" in process.stderr.readline()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(HEAD + b"Content-Length: %d\r\n\r\n" % 10**15 + b"x" * 100)
            assert conn.recv(100).startswith(b"HTTP/1.1 413")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            conn.sendall(HEAD + b"Content-Length: 1000\r\n\r\n" + b"x" * 100)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
        time.sleep(0.5)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=10)
    log = process.stderr.read().decode()
    assert "Traceback" not in log
    lines = [line for line in log.splitlines() if line.strip()]
    assert any(" 413 " in line for line in lines)
    assert any("no complete body" in line for line in lines)
    assert all(line.startswith("mailbox-relay: ") for line in lines), lines
    assert not (tmp_path / "in" / "new").exists() or os.listdir(tmp_path / "in" / "new") == []


def test_a_maildir_under_a_regular_file_is_named(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = subprocess.run(
        [sys.executable, "-m", "mailbox_relay", "serve", "--port", "0", "--maildir", str(blocker / "inbox")],
        env={**clean_env, "MAILBOX_RELAY_PASSWORD": "pw"},
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 73
    expected = f"mailbox-relay: error: cannot use {blocker / 'inbox'} as a Maildir"
    assert result.stderr.decode().startswith(expected)
    assert b"listen" not in result.stderr


def test_stored_mail_is_private(serve: LocalServe) -> None:
    assert requests.post(serve.url, data=MESSAGE, auth=AUTH, headers=RFC822, timeout=10).status_code == 204
    root = Path(serve.maildir.path)
    assert {oct(os.stat(root / sub).st_mode & 0o777) for sub in ("", "tmp", "new", "cur")} == {"0o700"}
    (message,) = (root / "new").iterdir()
    assert oct(message.stat().st_mode & 0o777) == "0o600"
