"""operate.attach: what watch plugs in, on the stand-in loop (tests/standin_loop.py), and the
same against the real watch in tests/e2e/test_operate_watch.py once issue 20's loop is merged."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Dict, List, Tuple

from mailbox_relay.accounts import Account, parse_account
from mailbox_relay.fetch.events import Fanout
from mailbox_relay.fetch.operate import attach

from .peers import free_port
from .standin_loop import StandInLoop


class FakeWatch:
    """The part of issue 20's Watch that operate uses: events, loop, account(name)."""

    def __init__(self, loop: StandInLoop) -> None:
        self.events = Fanout()
        self.loop = loop
        self.accounts = {
            "box": parse_account(
                "box",
                {
                    "host": "h",
                    "username": "u",
                    "password": "p",
                    "idle_refresh": 10,
                    "poll_interval": 10,
                    "timeout": 5,
                },
                "c",
            )
        }

    def account(self, name: str) -> Account:
        return self.accounts[name]

    def folders(self) -> List[Tuple[str, str]]:
        return [("box", "INBOX")]


def http_get(port: int, path: str) -> Tuple[int, Dict[str, object]]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body) if path == "/readyz" else {}


def test_attach_serves_readiness_metrics_and_tells_systemd(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(10)
        loop = StandInLoop()
        watch = FakeWatch(loop)
        port = free_port()
        operations = attach(watch, ("127.0.0.1", port), {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
        loop.start()
        try:
            status, body = http_get(port, "/readyz")  # INBOX is known before any event about it
            assert (status, body["not_ready"]) == (
                503,
                [{"account": "box", "folder": "INBOX", "why": "not connected yet"}],
            )
            watch.events.connected("box", "INBOX")
            watch.events.first_round_done()
            status, body = http_get(port, "/readyz")
            assert (status, body["status"]) == (200, "1 folder: 1 idle")
            got: List[bytes] = []
            while b"READY=1\nSTATUS=1 folder: 1 idle" not in got:
                got.append(systemd.recv(4096))
            assert http_get(port, "/metrics")[0] == 200
            # the account's bound: 2 x idle_refresh (10) + timeout (5)
            assert operations.health.fresh("box") == 25
        finally:
            loop.call_soon_threadsafe(operations.close)
            loop.stop()


def test_without_listen_or_systemd_only_health_is_attached() -> None:
    watch = FakeWatch(StandInLoop())
    operations = attach(watch, None, {})
    assert (operations.listener, operations.notifier) == (None, None)
    assert watch.events.observers == [operations.health]
