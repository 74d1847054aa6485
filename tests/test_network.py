"""Resets, stalls, refusals and silent closes, from a raw socket server (no HTTP library)."""

from __future__ import annotations

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
