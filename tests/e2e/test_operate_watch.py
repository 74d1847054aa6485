"""Operating the real watch (issue 21) on issue 20's event loop, against the real Dovecot:
systemd notify in order, a hung loop stops the watchdog pings and /healthz, /readyz catches a
blackholed connection and recovers, metrics count what was delivered, JSON logs parse."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from ..helpers import wait_for
from ..peers import FaultProxy, Ingress204, free_port
from .world import Dovecot, message


@pytest.fixture
def ingress() -> Iterator[Ingress204]:
    with Ingress204() as server:
        yield server


def config(tmp: Path, dovecot: Dovecot, url: str, port: int, **account: Any) -> Tuple[Dict[str, str], str]:
    """A config whose [accounts.box] reads a new Dovecot user through `port`; (env, user)."""
    user = dovecot.new_user()
    settings = {"host": "127.0.0.1", "port": port, "tls": "none", "username": user}
    settings.update({"password": f"secret-{user}", "start": "new", **account})
    lines = [
        f'url = "{url}"',
        'password = "pw"',
        f'fetch_state = "{tmp / "fetch.sqlite3"}"',
        "",
        "[accounts.box]",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    (tmp / "config.toml").write_text("\n".join(lines) + "\n")
    return {**os.environ, "MAILBOX_RELAY_CONFIG": str(tmp / "config.toml")}, user


def start(env: Dict[str, str], log: Path, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mailbox_relay", "watch", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def get(port: int, path: str, timeout: float = 10) -> Tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def notify_socket(tmp: Path) -> socket.socket:
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listening.bind(str(tmp / "notify"))
    listening.settimeout(30)
    return listening


def test_systemd_hears_ready_status_watchdog_and_stopping_in_order(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    env, _user = config(tmp_path, dovecot, ingress.url, dovecot.port)
    with notify_socket(tmp_path) as systemd:
        env.update({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"})
        watch = start(env, tmp_path / "watch.log")
        kinds: List[str] = []
        try:
            while "STOPPING" not in kinds:
                kinds += [line.split("=")[0] for line in systemd.recv(4096).decode().splitlines()]
                if "READY" in kinds and kinds.count("WATCHDOG") >= 2 and watch.poll() is None:
                    watch.terminate()
            assert watch.wait(30) == 0
        finally:
            watch.kill()
    first = {kind: kinds.index(kind) for kind in ("READY", "STATUS", "WATCHDOG", "STOPPING")}
    assert first["READY"] < first["STOPPING"] and kinds[first["READY"] + 1] == "STATUS", kinds
    assert kinds.index("WATCHDOG", first["READY"]) < first["STOPPING"], kinds


def test_a_hung_loop_stops_the_watchdog_pings_and_healthz(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    env, _user = config(tmp_path, dovecot, ingress.url, dovecot.port)
    port = free_port()
    with notify_socket(tmp_path) as systemd:
        env.update({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"})
        env.update({"MAILBOX_RELAY_LISTEN": str(port), "MAILBOX_RELAY_TEST_HANG_LOOP_AFTER": "8"})
        watch = start(env, tmp_path / "watch.log")
        try:
            while b"READY=1" not in systemd.recv(4096):
                pass
            assert get(port, "/healthz") == (200, b"ok\n")
            time.sleep(10)  # the hook hangs the loop 8 s after it started
            systemd.setblocking(False)
            while True:  # what was sent before the hang
                try:
                    systemd.recv(4096)
                except BlockingIOError:
                    break
            systemd.settimeout(3.0)  # 15 watchdog intervals
            with pytest.raises(socket.timeout):
                systemd.recv(4096)
            with pytest.raises(socket.timeout):
                get(port, "/healthz", timeout=3.0)
        finally:
            watch.kill()
            watch.wait(30)


def test_a_blackholed_folder_is_found_and_replaced_within_the_readiness_bound_and_metrics_count(
    tmp_path: Path, dovecot: Dovecot, ingress: Ingress204
) -> None:
    port = free_port()
    with FaultProxy(dovecot.port) as proxy:
        # 2 x idle_refresh (2) + timeout (2) = 6 s: /readyz must say 503 within that of the blackhole
        env, user = config(
            tmp_path, dovecot, ingress.url, proxy.port, idle_refresh=2, poll_interval=2, timeout=2
        )
        env.update({"MAILBOX_RELAY_LISTEN": str(port), "MAILBOX_RELAY_LOG_FORMAT": "json"})
        log = tmp_path / "watch.log"
        watch = start(env, log)
        try:
            wait_for(lambda: _ready(port) == 200, 20)
            wait_for(lambda: b"waiting for new mail" in log.read_bytes(), 20)  # past the first pass
            client = dovecot.imap(user)
            for n in range(3):
                assert client.append("INBOX", None, None, message(f"counted {n}"))[0] == "OK"
            client.logout()
            wait_for(lambda: len(ingress.bodies) == 3, 20)
            # the ingress has the bytes before watch has its answer: the count follows at once
            delivered = 'mailbox_relay_delivered_total{account="box",folder="INBOX"} 3.0'
            wait_for(lambda: delivered in get(port, "/metrics")[1].decode(), 10)
            # A blackhole: watch's own IDLE re-issue (every idle_refresh, bounded by timeout) finds
            # it in 2 + 2 s and replaces the connection, inside /readyz's bound (2 x 2 + 2 s), so
            # the folder is never stale: 503 is for a silent death, which tests/test_health.py and
            # the hung-loop test above cover. Here: found, counted, replaced, ready throughout.
            proxy.blackhole()
            blackholed = time.monotonic()
            wait_for(lambda: b"no answer to" in log.read_bytes(), 10)
            assert time.monotonic() - blackholed <= 2 + 2 + 2  # idle_refresh + timeout, and a margin
            wait_for(lambda: "mailbox_relay_reconnects_total" in get(port, "/metrics")[1].decode(), 10)
            assert _ready(port) == 200  # a known backoff, with its reason, until the reconnect
            wait_for(lambda: proxy.connections >= 2, 10)
            assert _ready(port) == 200
        finally:
            watch.terminate()
            watch.wait(30)
    records = [json.loads(line) for line in log.read_text().splitlines()]  # every line parses
    about_folders = [record for record in records if record["folder"] is not None]
    assert about_folders and all(record["account"] == "box" for record in about_folders)


def _ready(port: int) -> int:
    try:
        return get(port, "/readyz", timeout=2)[0]
    except OSError:
        return 0
