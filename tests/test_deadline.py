"""deadline.py: a whole-operation bound in any thread, against real sockets that trickle or stall."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List

import pytest

from mailbox_relay import deadline
from mailbox_relay.ingress.client import make_session, post_with_retry
from mailbox_relay.message import prepare
from mailbox_relay.outcome import Reason
from mailbox_relay.signals import DeadlinePassed
from mailbox_relay.signals import deadline as signal_deadline

from .helpers import make_settings
from .peers import Ingress204, RawServer

RAW = b"From: a@example.com\r\nSubject: bounded\r\n\r\nbody\r\n"


def in_thread(work: Callable[[], Any], seconds: float = 30) -> Dict[str, Any]:
    """Run `work` in a worker thread; its result or error, and how long it took."""
    result: Dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            result["value"] = work()
        except BaseException as error:
            result["error"] = error
        result["took"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "the worker is still blocked"
    return result


def read_all(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(1024)
        except OSError:
            return data
        if not chunk:
            return data
        data += chunk


def connect_to(server: RawServer) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=5)  # per read: never fires
    sock.sendall(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    return sock


def test_a_bounded_recv_from_a_trickling_server_ends_at_the_deadline_in_any_thread() -> None:
    with RawServer(["trickle"]) as server:  # a byte every 0.5 s: a 5 s read timeout never fires

        def work() -> Any:
            with connect_to(server) as sock, deadline.bounded(1.5, "recv") as guard:
                guard.watch(sock)
                got = read_all(sock)
            return guard, got

        result = in_thread(work)
    guard, got = result["value"]
    assert guard.expired and guard.reason == "deadline" and guard.what == "recv"
    assert 1.4 < result["took"] < 2.5
    assert 0 < len(got) < len(b"HTTP/1.1 204 No Content\r\n")  # cut off mid-answer


def test_cancel_all_wakes_a_blocked_recv_at_once() -> None:
    with RawServer(["stall"]) as server:
        entered = threading.Event()

        def work() -> Any:
            with connect_to(server) as sock, deadline.bounded(60, "stalled") as guard:
                guard.watch(sock)
                entered.set()
                read_all(sock)
            return guard

        def cancel() -> None:
            entered.wait(10)
            time.sleep(0.2)  # let the worker block in recv
            deadline.cancel_all("stopping")

        threading.Thread(target=cancel, daemon=True).start()
        result = in_thread(work)
    assert result["value"].expired and result["value"].reason == "stopping"
    assert result["took"] < 3


def test_a_socket_watched_after_expiry_is_shut_down_at_once_and_guards_nest() -> None:
    with RawServer(["stall"]) as server, connect_to(server) as sock:
        assert deadline.current() is None
        with deadline.bounded(30, "outer") as outer:
            with deadline.bounded(0.05, "inner") as inner:
                assert deadline.current() is inner
                until = time.monotonic() + 5
                while not inner.expired and time.monotonic() < until:
                    time.sleep(0.01)
                inner.watch(sock)
                assert sock.recv(10) == b""  # shut down: EOF instead of a 5 s wait
            assert deadline.current() is outer and not outer.expired
        assert deadline.current() is None


def test_signals_deadline_off_the_main_thread_raises_after_the_block() -> None:
    def work() -> None:
        with signal_deadline(0.2) as bound:
            assert not bound.armed  # no SIGALRM here
            time.sleep(0.5)  # nothing watched: the block runs to its end, then it counts

    assert isinstance(in_thread(work)["error"], DeadlinePassed)
    assert "error" not in in_thread(lambda: signal_deadline(5).__enter__().__exit__(None, None, None))


@pytest.mark.parametrize("behaviours", [["trickle"], ["keepalive-trickle"]])
def test_a_post_from_a_worker_thread_to_a_trickling_ingress_is_a_timeout_within_its_bound(
    behaviours: List[str],
) -> None:
    """A new connection, and a kept-alive one taken from the pool, are both cut off."""
    with RawServer(behaviours) as server:
        settings = make_settings(url=server.url, timeout=1, retry_for=0)
        session = make_session(settings, threaded=True)
        prepared = prepare(RAW)
        if behaviours == ["keepalive-trickle"]:
            assert in_thread(lambda: post_with_retry(session, settings, prepared))["value"].delivered
        result = in_thread(lambda: post_with_retry(session, settings, prepared))
        session.close()
    outcome = result["value"]
    assert outcome.reason is Reason.TIMEOUT and "did not answer within 1s" in outcome.detail
    assert result["took"] < 2.0
    assert server.connections == 1  # the second post went over the kept-alive connection


def test_a_threaded_session_delivers_as_usual() -> None:
    with Ingress204() as ingress:
        settings = make_settings(url=ingress.url, timeout=5, retry_for=0)
        session = make_session(settings, threaded=True)
        outcomes = [in_thread(lambda: post_with_retry(session, settings, prepare(RAW))) for _ in range(2)]
        session.close()
    assert all(result["value"].delivered for result in outcomes)
    assert ingress.bodies == [RAW, RAW]


def test_deliver_starts_no_thread_and_never_imports_the_watchdog(tmp_path: Any) -> None:
    with Ingress204() as ingress:
        script = (
            "import sys, threading\n"
            "from mailbox_relay.cli import run\n"
            f"code = run(['deliver', '--url', {ingress.url!r}])\n"
            "print(code, 'mailbox_relay.deadline' in sys.modules, threading.active_count())\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            input=RAW,
            capture_output=True,
            timeout=60,
            check=True,
            env={**os.environ, "MAILBOX_RELAY_PASSWORD": "pw"},
        )
    assert result.stdout.decode().split() == ["0", "False", "1"], result.stderr
    assert ingress.bodies == [RAW]
