"""Posting and retrying against a real HTTP server (pytest-httpserver): every status row."""

from __future__ import annotations

from typing import Any, Dict, List

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from mailbox_relay.ingress.answers import parse_retry_after
from mailbox_relay.ingress.client import Backoff, make_session, post_with_retry
from mailbox_relay.message import prepare
from mailbox_relay.outcome import Reason
from mailbox_relay.settings import Settings

from .helpers import RELAY_PATH as PATH
from .helpers import FakeClock, make_settings

MESSAGE = b"From x@y Mon Jan  1 00:00:00 2024\nFrom: a@example.com\nSubject: t\n\nbody\n"


def settings_for(server: HTTPServer, **overrides: Any) -> Settings:
    values: Dict[str, Any] = {"url": server.url_for(PATH), "password": "s3cret", "timeout": 5.0}
    values.update(overrides)
    return make_settings(**values)


def post(server: HTTPServer, clock: FakeClock, **overrides: Any) -> Any:
    settings = settings_for(server, **overrides)
    prepared = prepare(MESSAGE, recipients=settings.envelope_recipient)
    with make_session(settings) as session:
        return post_with_retry(session, settings, prepared, clock=clock, backoff=Backoff(random=lambda: 1.0))


def test_2xx_posts_the_exact_bytes_with_auth_type_and_agent(httpserver: HTTPServer) -> None:
    seen: List[Request] = []

    def handler(request: Request) -> Response:
        seen.append(request)
        return Response(status=204)

    httpserver.expect_request(PATH, method="POST").respond_with_handler(handler)
    outcome = post(httpserver, FakeClock(), envelope_recipient=("to@example.com",))
    assert outcome.delivered
    (request,) = seen
    assert request.get_data() == b"X-Original-To: to@example.com\nFrom: a@example.com\nSubject: t\n\nbody\n"
    assert request.headers["Content-Type"] == "message/rfc822"
    assert request.authorization is not None
    assert (request.authorization.username, request.authorization.password) == ("actionmailbox", "s3cret")
    assert request.headers["User-Agent"].startswith("mailbox-relay/")
    assert request.headers["Content-Length"] == str(len(request.get_data()))


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (401, Reason.AUTH),
        (403, Reason.FORBIDDEN),
        (404, Reason.NOT_FOUND),
        (413, Reason.INGRESS_LIMIT),
        (415, Reason.WRONG_MEDIA_TYPE),
        (422, Reason.CLIENT_ERROR),
    ],
)
def test_final_answers_are_not_retried(httpserver: HTTPServer, status: int, reason: Reason) -> None:
    httpserver.expect_request(PATH).respond_with_data("no", status=status)
    clock = FakeClock()
    outcome = post(httpserver, clock)
    assert outcome.reason is reason
    assert len(httpserver.log) == 1 and clock.slept == []


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_answers_are_retried_until_delivered(httpserver: HTTPServer, status: int) -> None:
    httpserver.expect_ordered_request(PATH).respond_with_data("busy", status=status)
    httpserver.expect_ordered_request(PATH).respond_with_data("busy", status=status)
    httpserver.expect_ordered_request(PATH).respond_with_data("", status=204)
    clock = FakeClock()
    outcome = post(httpserver, clock)
    assert outcome.delivered
    assert len(httpserver.log) == 3
    assert clock.slept == [1.0, 2.0]  # exponential backoff (jitter pinned to its maximum)
    bodies = {request.get_data() for request, _ in httpserver.log}
    assert len(bodies) == 1  # the same bytes on every attempt, so Rails deduplicates


def test_retry_after_is_honoured(httpserver: HTTPServer) -> None:
    httpserver.expect_ordered_request(PATH).respond_with_data("", status=503, headers={"Retry-After": "7"})
    httpserver.expect_ordered_request(PATH).respond_with_data("", status=204)
    clock = FakeClock()
    assert post(httpserver, clock).delivered
    assert clock.slept == [7.0]


def test_retry_after_beyond_the_budget_stops_at_once(httpserver: HTTPServer) -> None:
    httpserver.expect_request(PATH).respond_with_data("", status=429, headers={"Retry-After": "600"})
    clock = FakeClock()
    outcome = post(httpserver, clock, retry_for=60.0)
    assert outcome.reason is Reason.BUSY
    assert outcome.line().endswith("(it asked to wait 600s, past --retry-for)")
    assert clock.slept == [] and len(httpserver.log) == 1


def test_budget_bounds_the_retries(httpserver: HTTPServer) -> None:
    httpserver.expect_request(PATH).respond_with_data("", status=500)
    clock = FakeClock()
    outcome = post(httpserver, clock, retry_for=20.0)
    assert outcome.reason is Reason.SERVER_ERROR
    assert sum(clock.slept) <= 20.0
    assert clock.slept == [1.0, 2.0, 4.0, 8.0]
    assert "[5 attempts over 15s]" in outcome.line()


def test_zero_budget_means_one_attempt(httpserver: HTTPServer) -> None:
    httpserver.expect_request(PATH).respond_with_data("", status=500)
    assert post(httpserver, FakeClock(), retry_for=0.0).reason is Reason.SERVER_ERROR
    assert len(httpserver.log) == 1


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_redirects_are_never_followed(httpserver: HTTPServer, status: int) -> None:
    target = httpserver.url_for("/landing")
    httpserver.expect_request(PATH).respond_with_data("", status=status, headers={"Location": target})
    httpserver.expect_request("/landing").respond_with_data("OK", status=200)
    outcome = post(httpserver, FakeClock())
    assert outcome.reason is Reason.REDIRECT
    assert target in outcome.line()
    assert [request.path for request, _ in httpserver.log] == [PATH]


def test_404_on_postfix_path_against_a_server(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/rails/action_mailbox/postfix/inbound_emails").respond_with_data(
        "", status=404
    )
    outcome = post(
        httpserver, FakeClock(), url=httpserver.url_for("/rails/action_mailbox/postfix/inbound_emails")
    )
    assert outcome.reason is Reason.NOT_FOUND
    assert PATH in outcome.line()


def test_large_message_streams_without_a_copy(httpserver: HTTPServer) -> None:
    big = b"From: a@example.com\n\n" + b"x" * (3 * 1024 * 1024) + b"\n"
    received: List[bytes] = []

    def handler(request: Request) -> Response:
        received.append(request.get_data())
        return Response(status=204)

    httpserver.expect_request(PATH).respond_with_handler(handler)
    settings = settings_for(httpserver, envelope_recipient=("r@example.com",))
    prepared = prepare(b"From x Mon\n" + big, recipients=settings.envelope_recipient)
    with make_session(settings) as session:
        assert post_with_retry(session, settings, prepared, clock=FakeClock()).delivered
    assert received == [b"X-Original-To: r@example.com\n" + big]


def test_parse_retry_after() -> None:
    assert parse_retry_after("12") == 12.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=lambda: 2e9) == 0.0


def test_session_factory_sets_what_every_post_needs() -> None:
    settings = make_settings(url="https://x.example.com" + PATH, password="p", ca_bundle=__file__)
    session = make_session(settings)
    assert isinstance(session.auth, requests.auth.HTTPBasicAuth)
    assert (session.auth.username, session.auth.password) == (b"actionmailbox", b"p")
    assert session.verify == __file__
    assert session.headers["Content-Type"] == "message/rfc822"
    assert make_session(make_settings(url="https://x.example.com", insecure=True)).verify is False
    assert isinstance(session, requests.Session)
