"""The four ingresses beside relay, without Rails: `serve --ingress` takes what `deliver` and
`import` send (byte-exact), each request is signed or authenticated as its ingress wants, a
retry of a Mailgun post is signed afresh, and the settings catch a URL of the wrong ingress.
The real app's verdicts are in tests/e2e/test_ingresses.py."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from mailbox_relay.ingress.formats import INGRESSES, _form, encode, mandrill_signature, rails_url

from .helpers import invoke
from .peers import LocalServe

WRAPPING = [name for name in INGRESSES if name != "relay"]
UTF8 = "From: a@example.com\r\nTo: b@example.com\r\nSubject: café\r\n\r\n日本 ✓\r\n".encode()
LATIN1 = b"From: a@example.com\r\nSubject: x\r\n\r\ncaf\xe9\r\n"


def env(url: str, ingress: str, **extra: str) -> Dict[str, str]:
    return {
        "MAILBOX_RELAY_URL": url,
        "MAILBOX_RELAY_PASSWORD": "s3cret",
        "MAILBOX_RELAY_INGRESS": ingress,
        "MAILBOX_RELAY_RETRY_FOR": "0",
        **extra,
    }


def stored(maildir: Path) -> List[bytes]:
    return sorted(path.read_bytes() for path in (maildir / "new").iterdir())


@pytest.mark.parametrize("ingress", WRAPPING)
def test_serve_takes_each_ingress_byte_exact_from_deliver_and_import(ingress: str, tmp_path: Path) -> None:
    with LocalServe(str(tmp_path / "serve"), password="s3cret", ingress=ingress) as serve:
        assert invoke(["deliver"], stdin=UTF8, env=env(serve.base, ingress)) == (0, "", "")
        mbox = tmp_path / "in.mbox"
        mbox.write_bytes(b"From x\n" + b"From: c@example.com\nSubject: two\n\nsecond\n")
        code, out, err = invoke(["import", "--no-state", str(mbox)], env=env(serve.base, ingress))
        assert code == 0, out + err
        assert stored(tmp_path / "serve") == sorted([UTF8, b"From: c@example.com\nSubject: two\n\nsecond\n"])


@pytest.mark.parametrize("ingress", WRAPPING)
def test_a_wrong_secret_is_refused_by_serve_and_said_in_one_line(ingress: str, tmp_path: Path) -> None:
    with LocalServe(str(tmp_path / "serve"), password="s3cret", ingress=ingress) as serve:
        code, _, err = invoke(
            ["deliver"], stdin=UTF8, env={**env(serve.base, ingress), "MAILBOX_RELAY_PASSWORD": "no"}
        )
        assert code == 75 and err.startswith("4.7.0 ingress rejected the") and err.count("\n") == 1
        assert INGRESSES[ingress].app_secret.split()[0] in err
        assert serve.maildir.count() == 0


@pytest.mark.parametrize("ingress", WRAPPING)
def test_bytes_that_are_not_utf8_are_refused_before_sending(ingress: str, httpserver: HTTPServer) -> None:
    code, _, err = invoke(["deliver"], stdin=LATIN1, env=env(httpserver.url_for("/"), ingress))
    assert code == 75
    assert (
        err.startswith(f"4.6.3 the {ingress} ingress cannot carry this message unchanged") and "relay" in err
    )
    assert httpserver.log == []  # nothing was posted, so nothing was altered


def test_relay_still_carries_any_bytes(tmp_path: Path) -> None:
    with LocalServe(str(tmp_path / "serve"), password="s3cret") as serve:
        assert invoke(["deliver"], stdin=LATIN1, env=env(serve.base, "relay")) == (0, "", "")
        assert stored(tmp_path / "serve") == [LATIN1]


def test_a_mailgun_retry_is_signed_afresh_around_the_same_message(httpserver: HTTPServer) -> None:
    forms: List[Dict[str, str]] = []

    def answer(request: Request) -> Response:
        forms.append(dict(request.form))
        return Response("", status=503 if len(forms) == 1 else 200)

    path = INGRESSES["mailgun"].path
    httpserver.expect_request(path, method="POST").respond_with_handler(answer)
    code, _, err = invoke(
        ["deliver"], stdin=UTF8, env=env(httpserver.url_for("/"), "mailgun", MAILBOX_RELAY_RETRY_FOR="30")
    )
    assert code == 0, err
    first, second = forms
    assert first["body-mime"] == second["body-mime"] == UTF8.decode()  # the same bytes each time
    assert first["token"] != second["token"]  # a new signature for the new attempt
    for form in forms:
        expected = hmac.new(
            b"s3cret", (form["timestamp"] + form["token"]).encode(), hashlib.sha256
        ).hexdigest()
        assert form["signature"] == expected and abs(int(form["timestamp"]) - time.time()) < 60
    assert "Authorization" not in httpserver.log[0][0].headers  # the key is never sent itself


def test_mandrill_signs_the_url_rails_sees_and_the_sorted_params(httpserver: HTTPServer) -> None:
    seen: List[Any] = []
    httpserver.expect_request(INGRESSES["mandrill"].path, method="POST").respond_with_handler(
        lambda request: seen.append((request.headers, dict(request.form))) or Response("", status=200)
    )
    url = httpserver.url_for("/")
    assert invoke(["deliver"], stdin=UTF8, env=env(url, "mandrill"))[0] == 0
    headers, form = seen[0]
    signed = f"{url.rstrip('/')}{INGRESSES['mandrill'].path}mandrill_events{form['mandrill_events']}"
    expected = base64.b64encode(hmac.new(b"s3cret", signed.encode(), hashlib.sha1).digest()).decode()
    assert headers["X-Mandrill-Signature"] == expected
    events = json.loads(form["mandrill_events"])
    assert events == [{"event": "inbound", "msg": {"raw_msg": UTF8.decode()}}]


def test_rails_url_drops_only_a_default_port() -> None:
    assert rails_url("https://app.example:443/p?q=1") == "https://app.example/p?q=1"
    assert rails_url("http://app.example:80/p") == "http://app.example/p"
    assert rails_url("http://app.example:3000/p") == "http://app.example:3000/p"
    assert rails_url("http://[::1]:3000/p") == "http://[::1]:3000/p"
    assert mandrill_signature("k", "http://h:80/p", {"b": "2", "a": "1"}) == mandrill_signature(
        "k", "http://h/p", {"a": "1", "b": "2"}
    )


def test_postmark_and_sendgrid_carry_the_message_in_their_own_fields() -> None:
    body, headers = encode(INGRESSES["postmark"], UTF8, "s", "http://h/")
    assert headers == {"Content-Type": "application/json"} and json.loads(body) == {"RawEmail": UTF8.decode()}
    body, headers = encode(INGRESSES["sendgrid"], UTF8, "s", "http://h/")
    assert headers["Content-Type"].startswith("multipart/form-data; boundary=mailbox-relay-")
    assert b'name="email"\r\n\r\n' + UTF8 + b"\r\n--" in body


def test_a_form_boundary_never_occurs_in_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = iter(["a" * 32, "b" * 32])
    monkeypatch.setattr("secrets.token_hex", lambda n: next(tokens))
    _, headers = _form([("email", "text with mailbox-relay-" + "a" * 32 + " inside")])
    assert headers["Content-Type"].endswith("b" * 32)


@pytest.mark.parametrize("ingress", WRAPPING)
def test_a_bare_host_gets_the_ingress_path_and_another_ingress_path_is_refused(ingress: str) -> None:
    code, out, _ = invoke(["check", "-v"], env=env("http://127.0.0.1:9", ingress))
    assert f"http://127.0.0.1:9{INGRESSES[ingress].path}" in out
    code, _, err = invoke(
        ["deliver"], stdin=UTF8, env=env("http://127.0.0.1:9" + INGRESSES["relay"].path, ingress)
    )
    assert code == 75
    assert f"the URL ends in the relay ingress's path, but the ingress is {ingress}" in err
    assert f"give the URL {INGRESSES[ingress].path}" in err


def test_check_on_a_404_names_the_ingress_serve_answers_as(tmp_path: Path) -> None:
    with LocalServe(str(tmp_path / "serve"), password="s3cret", ingress="mailgun") as serve:
        code, out, _ = invoke(["check"], env=env(serve.base, "relay"))
        assert (
            code == 78
            and "but the app answers on the mailgun ingress" in out
            and "set ingress = mailgun" in out
        )
        code, out, _ = invoke(["check"], env=env(serve.base, "mailgun"))
        assert code == 0 and "HTTP 400 to a signed request without body-mime" in out
        assert (
            "its signing key set (env MAILBOX_RELAY_PASSWORD), to match the app's MAILGUN_INGRESS_SIGNING_KEY"
            in out
        )
        assert serve.maildir.count() == 0


def test_check_on_a_404_everywhere_says_no_ingress_answers(httpserver: HTTPServer) -> None:
    httpserver.expect_request(re.compile(".*")).respond_with_data("Not Found", 404)
    code, out, _ = invoke(["check"], env=env(httpserver.url_for("/"), "postmark"))
    assert code == 78 and "no other Action Mailbox ingress answers under" in out
    assert len(httpserver.log) == len(INGRESSES)  # the probe, then each other ingress's path once


def test_serve_refuses_a_stale_mailgun_signature_and_answers_mandrills_health_check(tmp_path: Path) -> None:
    with LocalServe(str(tmp_path / "mg"), password="s3cret", ingress="mailgun") as serve:
        stale = str(int(time.time()) - 600)
        signature = hmac.new(b"s3cret", (stale + "t").encode(), hashlib.sha256).hexdigest()
        fields = {"timestamp": stale, "token": "t", "signature": signature, "body-mime": UTF8.decode()}
        assert requests.post(serve.url, data=fields, timeout=10).status_code == 401
        assert serve.maildir.count() == 0
    with LocalServe(str(tmp_path / "md"), password="s3cret", ingress="mandrill") as serve:
        assert requests.get(serve.url, timeout=10).status_code == 200
        assert requests.post(serve.url, data={"mandrill_events": "[]"}, timeout=10).status_code == 401


def test_settings_offers_exactly_the_ingresses_there_are() -> None:
    from mailbox_relay.settings import INGRESS_NAMES

    assert tuple(INGRESSES) == INGRESS_NAMES
