"""Resets, stalls, refusals and silent closes, from a raw socket server (no HTTP library)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mailbox_relay.ingress.client import Backoff, make_session, post_with_retry
from mailbox_relay.message import prepare
from mailbox_relay.outcome import Kind, Outcome, Reason

from .helpers import RELAY_PATH, FakeClock, make_settings
from .peers import RawServer, free_port

MESSAGE = b"From: a@example.com\nSubject: t\n\nbody\n"


def post(url: str, **overrides: float) -> Outcome:
    settings = make_settings(url=url, **{"timeout": 2.0, "retry_for": 30.0, **overrides})
    with make_session(settings) as session:
        return post_with_retry(session, settings, prepare(MESSAGE), clock=FakeClock(), backoff=Backoff())


@pytest.mark.parametrize("failure", ["reset", "close"])
def test_a_dropped_connection_is_retried_and_then_delivered(failure: str) -> None:
    with RawServer([failure, failure, "204"]) as server:
        outcome = post(server.url)
        assert outcome.delivered
        assert server.connections == 3
        bodies = {request.partition(b"\r\n\r\n")[2] for request in server.requests}
        assert bodies == {MESSAGE}


def test_reset_every_time_is_temporary_and_says_so() -> None:
    with RawServer(["reset"]) as server:
        outcome = post(server.url, retry_for=3.0)
    assert outcome.reason is Reason.NETWORK
    assert outcome.kind is Kind.TEMPORARY
    assert f"127.0.0.1:{server.port}" in outcome.line()


def test_a_stalled_ingress_times_out_and_is_retried() -> None:
    with RawServer(["stall", "204"]) as server:
        outcome = post(server.url, timeout=0.5)
        assert outcome.delivered
        assert server.connections == 2


def test_a_stall_that_never_ends_names_the_timeout() -> None:
    with RawServer(["stall"]) as server:
        outcome = post(server.url, timeout=0.3, retry_for=0.0)
    assert outcome.reason is Reason.TIMEOUT
    assert "did not answer within 0.3s" in outcome.line()


def test_connection_refused_names_host_and_port() -> None:
    port = free_port()
    outcome = post(f"http://127.0.0.1:{port}{RELAY_PATH}", retry_for=0.0)
    assert outcome.reason is Reason.UNREACHABLE
    assert outcome.line() == (
        f"4.4.1 connection refused by 127.0.0.1:{port}: is the app running, and is the port in the URL right?"
    )


def test_unresolvable_host_is_named() -> None:
    outcome = post("https://no-such-host.invalid/x", retry_for=0.0)
    assert outcome.reason is Reason.UNREACHABLE
    assert "cannot resolve no-such-host.invalid" in outcome.line()


# --- every attempt is bounded in time and memory ------------------------------------------------


# Runs mailbox-relay as its only child, then prints that child's peak RSS in KiB on stderr.
MEASURED = (
    "import resource, subprocess, sys\n"
    "code = subprocess.call([sys.executable, '-m', 'mailbox_relay', *sys.argv[1:]])\n"
    "sys.stderr.write(f'\\nRSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}')\n"
    "sys.exit(code)\n"
)


def deliver_process(url: str, *args: str, command: str = "deliver") -> subprocess.CompletedProcess[bytes]:
    """mailbox-relay in a process of its own; its peak RSS (MB) is in `.peak_mb`."""
    env = {**os.environ, "MAILBOX_RELAY_URL": url, "MAILBOX_RELAY_PASSWORD": "pw"}
    result = subprocess.run(
        [sys.executable, "-c", MEASURED, command, *args],
        input=MESSAGE,
        env=env,
        capture_output=True,
        timeout=60,
    )
    result.stderr, _, rss = result.stderr.rpartition(b"\nRSS ")
    result.peak_mb = int(rss) / 1024  # type: ignore[attr-defined]
    return result


def test_a_2xx_with_an_endless_body_is_delivered_quickly_in_little_memory() -> None:
    with RawServer(["endless"]) as server:
        started = time.monotonic()
        result = deliver_process(server.url, "--timeout", "2", "--retry-for", "0")
        seconds = time.monotonic() - started
    assert (result.returncode, result.stderr) == (0, b"")
    assert seconds < 10
    assert result.peak_mb < 200  # type: ignore[attr-defined]


def test_check_does_not_hang_on_an_endless_body() -> None:
    with RawServer(["endless"]) as server:
        result = deliver_process(server.url, "--timeout", "2", "--json", command="check")
    assert result.returncode == 78  # a 200 to the probe: not Action Mailbox, and said so
    assert b"not an Action Mailbox relay ingress" in result.stdout


def test_a_2xx_is_delivered_whatever_its_body_is() -> None:
    with RawServer(["bad-gzip"]) as server:
        outcome = post(server.url, retry_for=0.0)
    assert outcome.delivered, outcome


def test_timeout_bounds_the_whole_attempt_not_each_read() -> None:
    with RawServer(["trickle"]) as server:
        started = time.monotonic()
        outcome = post(server.url, timeout=1.0, retry_for=0.0)
        seconds = time.monotonic() - started
    assert outcome.reason is Reason.TIMEOUT
    assert "did not answer within 1s" in outcome.line()
    assert seconds < 3


@pytest.mark.parametrize("answer", ["503-retry-now", "503-retry-past"])
def test_retry_after_now_or_in_the_past_never_floods_the_ingress(answer: str) -> None:
    with RawServer([answer]) as server:
        started = time.monotonic()
        result = deliver_process(server.url, "--retry-for", "3", "--timeout", "2")
        seconds = time.monotonic() - started
    assert result.returncode == 75 and result.stderr.startswith(b"4.3.0 ingress failed with HTTP 503")
    assert server.connections <= 5, f"{server.connections} posts in {seconds:.1f}s"


def test_a_retry_after_that_is_not_ascii_is_ignored_not_a_crash() -> None:
    with RawServer(["retry-after-junk"]) as server:
        outcome = post(server.url, retry_for=0.0)
    assert outcome.reason is Reason.SERVER_ERROR and outcome.retry_after is None


def test_check_bounds_a_tls_handshake_that_crawls() -> None:
    with RawServer(["tls-trickle"]) as server:
        started = time.monotonic()
        url = f"https://127.0.0.1:{server.port}"
        result = deliver_process(url, "--timeout", "1", "--json", command="check")
        seconds = time.monotonic() - started
    assert result.returncode == 69
    assert b"did not finish within 1s" in result.stdout
    assert seconds < 10
