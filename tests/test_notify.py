"""systemd notify (notify.py) against a real AF_UNIX datagram socket, as systemd listens."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest

from mailbox_relay.notify import Notifier, socket_address, watchdog_interval

from .standin_loop import StandInLoop


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Tuple[str, socket.socket]]:
    """A NOTIFY_SOCKET, as systemd makes one."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind(path)
        listening.settimeout(10)
        yield path, listening


def received(listening: socket.socket, until: str) -> List[str]:
    """Datagrams (each its KEY=VALUE lines joined by |) up to and including the first with `until`."""
    got: List[str] = []
    while not got or until not in got[-1]:
        got.append(listening.recv(4096).decode().replace("\n", "|"))
    return got


def test_ready_status_watchdog_and_stopping_arrive_in_order(systemd: Tuple[str, socket.socket]) -> None:
    path, listening = systemd
    status = ["2 folders: 1 idle, 1 connecting"]
    notifier = Notifier(path, lambda: status[0], watchdog=0.05, status_every=0.05)
    loop = StandInLoop()
    notifier.start(loop)
    loop.start()
    try:
        assert received(listening, "WATCHDOG=1")[-1] == "WATCHDOG=1"  # before READY too: alive
        notifier.first_round_done()
        got = received(listening, "READY=1")
        assert got[-1] == "READY=1|STATUS=2 folders: 1 idle, 1 connecting"
        status[0] = "2 folders: 2 idle"
        got = received(listening, "STATUS=2 folders: 2 idle")
        assert set(got[:-1]) <= {"WATCHDOG=1"}
        assert "WATCHDOG=1" in received(listening, "WATCHDOG=1")  # the status said once, pings go on
        notifier.reloading()
        got = received(listening, "RELOADING=1")[-1].split("|")
        assert got[0] == "RELOADING=1" and got[1].startswith("MONOTONIC_USEC=")
        assert abs(int(got[1].split("=")[1]) / 1e6 - time.monotonic()) < 60
        notifier.reloaded()
        assert received(listening, "READY=1")[-1].startswith("READY=1|STATUS=")
        notifier.stopping()
        assert received(listening, "STOPPING=1")[-1].startswith("STOPPING=1|STATUS=stopping")
    finally:
        loop.stop()
        notifier.close()


def test_a_hung_loop_stops_the_watchdog_pings(systemd: Tuple[str, socket.socket]) -> None:
    path, listening = systemd
    notifier = Notifier(path, lambda: "1 folder: 1 idle", watchdog=0.05)
    loop = StandInLoop(hang_after=0.5)
    notifier.start(loop)
    loop.start()
    try:
        assert received(listening, "WATCHDOG=1")
        time.sleep(1.0)  # the loop hung at 0.5 s
        listening.settimeout(0)
        while True:  # what was sent before the hang
            try:
                listening.recv(4096)
            except BlockingIOError:
                break
        listening.settimeout(1.0)  # 20 watchdog intervals
        with pytest.raises(socket.timeout):
            listening.recv(4096)
    finally:
        notifier.close()


def test_the_abstract_namespace(tmp_path: Path) -> None:
    name = f"mailbox-relay-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listening:
        listening.bind("\0" + name)
        listening.settimeout(10)
        address = socket_address({"NOTIFY_SOCKET": "@" + name})
        assert address == "\0" + name
        notifier = Notifier(address, lambda: "x")
        notifier.first_round_done()
        assert listening.recv(4096) == b"READY=1\nSTATUS=x"
        notifier.close()


def test_without_systemd_nothing_is_sent() -> None:
    assert socket_address({}) is None
    assert socket_address({"NOTIFY_SOCKET": "relative/path"}) is None
    assert Notifier.from_environ({}, lambda: "x") is None


def test_a_gone_systemd_does_not_stop_the_watch(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "nobody"), lambda: "x")
    assert notifier.send("READY=1") is False
    notifier.close()


@pytest.mark.parametrize(
    "environ, seconds",
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "123"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's watchdog
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "x"}, None),
        ({}, None),
    ],
)
def test_the_watchdog_interval(environ: dict, seconds: object) -> None:  # type: ignore[type-arg]
    assert watchdog_interval(environ, pid=123) == seconds
