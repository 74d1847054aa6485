"""`check`: each diagnosis row against pytest-httpserver, TLS, and against `serve` itself."""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
import trustme
from pytest_httpserver import HTTPServer

from .helpers import RELAY_PATH as PATH
from .helpers import invoke
from .peers import Ingress204, LocalServe, free_port


def check(args: List[str], env: Dict[str, str]) -> tuple[int, Dict[str, object]]:
    code, out, _ = invoke(["check", "--json", *args], env=env)
    return code, json.loads(out)


def steps(report: Dict[str, object]) -> Dict[str, object]:
    return {step["step"]: step for step in report["steps"]}  # type: ignore[attr-defined,index]


@pytest.mark.parametrize(
    ("status", "code", "words"),
    [
        (415, 0, "the URL, the relay ingress and the password are right"),
        (204, 78, "not an Action Mailbox relay ingress"),
        (401, 77, "4.7.0 ingress rejected the password"),
        (403, 77, "HTTP 403"),
        (404, 78, "config.action_mailbox.ingress = :relay"),
        (301, 78, "https://app.example.com/login"),
        (500, 69, "HTTP 500"),
        (503, 69, "HTTP 503"),
    ],
)
def test_each_answer_has_its_exit_code(
    httpserver: HTTPServer, clean_env: Dict[str, str], status: int, code: int, words: str
) -> None:
    seen: List[bytes] = []

    def handler(request):  # type: ignore[no-untyped-def]
        from werkzeug import Response

        seen.append(request.headers["Content-Type"])
        return Response(status=status, headers={"Location": "https://app.example.com/login"})

    httpserver.expect_request(PATH, method="POST").respond_with_handler(handler)
    exit_code, report = check(["--url", httpserver.url_for(PATH)], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert exit_code == code == report["exit_code"]
    assert report["ready"] is (code == 0)
    http = steps(report)["http"]
    assert words in http["detail"]  # type: ignore[index]
    assert seen == ["text/plain"]  # never message/rfc822: the probe must not create anything
    assert list(steps(report))[:3] == ["settings", "dns", "tcp"]


def test_postfix_path_is_named(httpserver: HTTPServer, clean_env: Dict[str, str]) -> None:
    url = httpserver.url_for("/rails/action_mailbox/postfix/inbound_emails")
    httpserver.expect_request("/rails/action_mailbox/postfix/inbound_emails").respond_with_data(
        "", status=404
    )
    code, report = check(["--url", url], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 78
    assert httpserver.url_for(PATH) in steps(report)["http"]["detail"]  # type: ignore[index]


def test_missing_settings_are_configuration(clean_env: Dict[str, str]) -> None:
    code, report = check([], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 78 and "no ingress URL" in steps(report)["settings"]["detail"]  # type: ignore[index]
    code, report = check(["--url", "https://x.example.com"], {})
    assert code == 78 and "no ingress password" in steps(report)["settings"]["detail"]  # type: ignore[index]
    code, _ = check(["--url", "http://app.example.com"], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 78


def test_unreachable_is_69_and_names_the_port(clean_env: Dict[str, str]) -> None:
    port = free_port()
    code, report = check(["--url", f"http://127.0.0.1:{port}"], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 69
    assert f"cannot connect to 127.0.0.1:{port}" in steps(report)["tcp"]["detail"]  # type: ignore[index]


def test_unresolvable_is_69(clean_env: Dict[str, str]) -> None:
    code, report = check(["--url", "https://no-such-host.invalid"], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 69 and not steps(report)["dns"]["ok"]  # type: ignore[index]


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[Ingress204, str]]:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    with Ingress204(context) as server:
        yield server, str(bundle)


def test_tls_is_reported_with_version_and_expiry(
    tls_server: tuple[Ingress204, str], clean_env: Dict[str, str]
) -> None:
    server, bundle = tls_server
    url = f"https://localhost:{server.port}"
    code, report = check(["--url", url], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 69 and "--ca-bundle" in steps(report)["tls"]["detail"]  # type: ignore[index]
    code, report = check(["--url", url, "--ca-bundle", bundle], {"MAILBOX_RELAY_PASSWORD": "pw"})
    tls = steps(report)["tls"]
    assert tls["ok"] and "TLSv1" in tls["detail"] and "expires" in tls["detail"]  # type: ignore[index]
    assert code == 78  # this test server answers 204 to anything: not Action Mailbox


def test_against_serve_ready_wrong_password_wrong_path_and_nothing_stored(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    with LocalServe(str(tmp_path / "inbox"), password="right") as serve:
        assert check(["--url", serve.base], {"MAILBOX_RELAY_PASSWORD": "right"})[0] == 0
        assert check(["--url", serve.base], {"MAILBOX_RELAY_PASSWORD": "wrong"})[0] == 77
        postfix = serve.base + "/rails/action_mailbox/postfix/inbound_emails"
        assert check(["--url", postfix], {"MAILBOX_RELAY_PASSWORD": "right"})[0] == 78
        assert serve.maildir.count() == 0


def test_plain_output_has_marks_and_a_verdict(tmp_path: Path, clean_env: Dict[str, str]) -> None:
    with LocalServe(str(tmp_path / "inbox")) as serve:
        code, out, err = invoke(["check", "--url", serve.base], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("✓ settings: url http://127.0.0.1:")
    assert "(option --url); password set (env MAILBOX_RELAY_PASSWORD)" in lines[0]
    assert lines[-1] == "ready: mailbox-relay deliver would deliver to this ingress"


def test_check_usage_error_is_64(clean_env: Dict[str, str]) -> None:
    assert invoke(["check", "--bogus"])[0] == 64


def test_insecure_skips_verification_and_says_so(
    tls_server: tuple[Ingress204, str], clean_env: Dict[str, str]
) -> None:
    server, _ = tls_server
    code, report = check(
        ["--url", f"https://localhost:{server.port}", "--insecure"], {"MAILBOX_RELAY_PASSWORD": "pw"}
    )
    tls = steps(report)["tls"]
    assert tls["ok"] and "NOT verified (--insecure)" in tls["detail"]  # type: ignore[index]
    assert code == 78  # the probe reached the server, which is not Action Mailbox


def test_verbose_lists_every_setting_and_its_source_on_stderr(
    tmp_path: Path, clean_env: Dict[str, str]
) -> None:
    with LocalServe(str(tmp_path / "inbox")) as serve:
        code, out, err = invoke(
            ["check", "-v", "--url", serve.base, "--timeout", "7"], env={"MAILBOX_RELAY_PASSWORD": "pw"}
        )
        quiet = invoke(["check", "--url", serve.base], env={"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 0
    assert "mailbox-relay: timeout = 7.0 (option --timeout)" in err
    assert "mailbox-relay: password = <set> (env MAILBOX_RELAY_PASSWORD)" in err
    assert "timeout" not in out
    assert quiet[0] == 0 and quiet[2] == ""  # without -v, nothing on stderr


def test_check_trusts_requests_ca_bundle_as_deliver_does(
    tls_server: tuple[Ingress204, str], clean_env: Dict[str, str]
) -> None:
    """One TLS policy: a private CA in REQUESTS_CA_BUNDLE passes check's handshake and deliver's post."""
    server, bundle = tls_server
    env = {"MAILBOX_RELAY_PASSWORD": "pw", "REQUESTS_CA_BUNDLE": bundle, "MAILBOX_RELAY_RETRY_FOR": "0"}
    url = f"https://localhost:{server.port}"
    code, report = check(["--url", url], env)
    tls = steps(report)["tls"]
    assert tls["ok"] and "verified" in tls["detail"], tls  # type: ignore[index]
    assert code == 78  # past TLS: the probe reached this 204 server, which is not Action Mailbox
    message = b"From: a@example.com\n\nbody\n"
    assert invoke(["deliver", "--url", url], stdin=message, env=env)[0] == 0
    assert server.bodies[-1] == message


def test_a_missing_ca_bundle_is_a_settings_failure(clean_env: Dict[str, str], tmp_path: Path) -> None:
    env = {"MAILBOX_RELAY_PASSWORD": "pw"}
    code, report = check(["--url", "https://x.example.com", "--ca-bundle", str(tmp_path / "nope.pem")], env)
    assert code == 78
    assert "nope.pem" in steps(report)["settings"]["detail"]  # type: ignore[index]


def test_an_https_url_at_a_plain_http_port_asks_whether_it_is_an_http_port(
    httpserver: HTTPServer, clean_env: Dict[str, str], sample: bytes
) -> None:
    url = httpserver.url_for(PATH).replace("http://", "https://")
    code, report = check(["--url", url], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 69
    tls = str(steps(report)["tls"]["detail"])  # type: ignore[index]
    assert "is this an http port?" in tls and "fix the certificate" not in tls, tls
    code, _, err = invoke(
        ["deliver", "--url", url, "--retry-for", "0"], sample, {"MAILBOX_RELAY_PASSWORD": "pw"}
    )
    assert code == 75 and "is this an http port?" in err, err


def test_a_refused_connection_asks_whether_the_app_is_running(clean_env: Dict[str, str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    code, report = check(["--url", url], {"MAILBOX_RELAY_PASSWORD": "pw"})
    assert code == 69
    tcp = str(steps(report)["tcp"]["detail"])  # type: ignore[index]
    assert "is the app running, and is the port in the URL right?" in tcp, tcp
