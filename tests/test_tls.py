"""TLS against a local CA made with trustme: verified by default, --ca-bundle, --insecure."""

from __future__ import annotations

import ssl
import warnings
from pathlib import Path
from typing import Iterator

import pytest
import trustme

from mailbox_relay.ingress.client import make_session, post_with_retry
from mailbox_relay.message import prepare
from mailbox_relay.outcome import Outcome, Reason

from .helpers import RELAY_PATH, make_settings
from .peers import Ingress204

MESSAGE = b"From: a@example.com\n\nbody\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_ingress(ca: trustme.CA) -> Iterator[Ingress204]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    with Ingress204(context) as server:
        yield server


def post(server: Ingress204, **options: object) -> Outcome:
    url = f"https://localhost:{server.port}{RELAY_PATH}"
    settings = make_settings(url=url, retry_for=0.0, timeout=5.0, **options)
    with make_session(settings) as session:
        return post_with_retry(session, settings, prepare(MESSAGE))


def test_unknown_ca_fails_verification_and_says_how_to_fix(
    tls_ingress: Ingress204, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REQUESTS_CA_BUNDLE", raising=False)
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    outcome = post(tls_ingress)
    assert outcome.reason is Reason.TLS
    assert outcome.line().startswith("4.7.5 TLS with localhost:")
    assert "--ca-bundle" in outcome.line()
    assert tls_ingress.bodies == []


def test_ca_bundle_verifies(tls_ingress: Ingress204, ca: trustme.CA, tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    assert post(tls_ingress, ca_bundle=str(bundle)).delivered
    assert tls_ingress.bodies == [MESSAGE]


def test_insecure_delivers_without_a_warning(tls_ingress: Ingress204) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        assert post(tls_ingress, insecure=True).delivered
    assert [str(w.message) for w in caught if "Unverified HTTPS" in str(w.message)] == []
