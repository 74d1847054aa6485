"""Every Action Mailbox ingress against the real Rails app, started once per ingress with
`config.action_mailbox.ingress` set and its secret in the environment: deliver and import store
the exact bytes and route on envelope recipients, a wrong secret is one line and exit 75, bytes
an ingress cannot carry are refused (and Rails shown to refuse them), check is ready and stores
nothing, and check on the wrong ingress names the right one.

The ingress x feature table in docs/compatibility.md is generated here."""

from __future__ import annotations

import mailbox
import subprocess
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest
import requests

from mailbox_relay.ingress.formats import INGRESSES
from mailbox_relay.message import prepare

from ..helpers import invoke
from .world import RailsApp, check_doc_section, message, rails_version

CELLS: Dict[Tuple[str, str], str] = {}  # (ingress, feature) -> what happened, for the table
FEATURES = (
    "deliver, byte-exact (UTF-8 8-bit too)",
    "import, byte-exact",
    "routes on envelope recipients",
    "bytes that are not UTF-8",
    "wrong secret",
    "check",
    "check on the wrong ingress",
)
LATIN1 = b"From: a@example.com\r\nTo: support@example.com\r\nSubject: latin-1\r\n\r\ncaf\xe9\r\n"


class OnIngress:
    def __init__(self, name: str, url: str, rails: RailsApp) -> None:
        self.name = name
        self.url = url
        self.rails = rails

    def env(self, **extra: str) -> Dict[str, str]:
        return {
            "MAILBOX_RELAY_URL": self.url,
            "MAILBOX_RELAY_PASSWORD": self.rails.password,
            "MAILBOX_RELAY_INGRESS": self.name,
            "MAILBOX_RELAY_RETRY_FOR": "0",
            **extra,
        }

    def deliver(self, raw: bytes, *args: str, **env: str) -> Tuple[int, str]:
        code, out, err = invoke(["deliver", *args], stdin=raw, env=self.env(**env))
        return code, out + err


@pytest.fixture(scope="module", params=list(INGRESSES))
def app_on(request: pytest.FixtureRequest, rails_app: RailsApp) -> Iterator[OnIngress]:
    """The app with one ingress configured (relay: the session's server)."""
    name = str(request.param)
    if name == "relay":
        yield OnIngress(name, rails_app.url, rails_app)
        return
    url = rails_app.serve(ingress=name)
    server = rails_app.servers[-1]
    yield OnIngress(name, url, rails_app)
    server.terminate()
    try:
        server.wait(15)
    except subprocess.TimeoutExpired:
        server.kill()


@pytest.fixture
def on(app_on: OnIngress, rails: RailsApp) -> OnIngress:
    return app_on  # `rails` has emptied the app's tables for this test


def test_deliver_stores_the_exact_bytes_and_routes_on_envelope_recipients(on: OnIngress) -> None:
    raws = [
        message(f"{on.name} ascii"),
        "From: a@example.com\r\nTo: support@example.com\r\nSubject: 8-bit\r\nMessage-ID: "
        f"<{on.name}-utf8@e2e.example>\r\n\r\ncafé 日本 ✓\r\n".encode(),
        f"From: a@example.com\nTo: b@example.com\nSubject: LF\nMessage-ID: <{on.name}-lf@x>\n\nhi\n".encode(),
    ]
    for raw in raws:
        assert on.deliver(raw) == (0, "")
    bcc = message(f"{on.name} bcc")
    assert on.deliver(bcc, "--envelope-recipient", "hidden@example.com") == (0, "")
    sent = [*raws, prepare(bcc, recipients=("hidden@example.com",)).to_bytes()]
    assert on.rails.sources() == sent
    CELLS[on.name, FEATURES[0]] = "yes"
    routed = on.rails.routed(expected=len(sent))
    assert "hidden@example.com" in routed[-1]["recipients"]  # type: ignore[operator]
    CELLS[on.name, FEATURES[2]] = "yes (X-Original-To in the message)"


def test_import_stores_the_exact_bytes(on: OnIngress, tmp_path: Path) -> None:
    box = mailbox.Maildir(str(tmp_path / "Maildir"))
    raws = [message(f"{on.name} import {n}") for n in range(5)]
    for raw in raws:
        box.add(raw)
    code, out, err = invoke(
        ["import", "--jobs", "1", "--no-state", str(tmp_path / "Maildir")],
        env=on.env(),
    )
    assert code == 0, out + err
    assert sorted(on.rails.sources()) == sorted(raws)
    CELLS[on.name, FEATURES[1]] = "yes"


def test_bytes_an_ingress_cannot_carry_are_refused_with_75_never_altered(
    on: OnIngress, tmp_path: Path
) -> None:
    code, said = on.deliver(LATIN1)
    if INGRESSES[on.name].carries_any_bytes:
        assert code == 0 and on.rails.sources() == [LATIN1]
        CELLS[on.name, FEATURES[3]] = "carried as they are"
        return
    assert code == 75 and said.startswith(f"4.6.3 the {on.name} ingress cannot carry this message unchanged")
    assert "use the relay ingress" in said and on.rails.stored() == 0
    box = mailbox.Maildir(str(tmp_path / "Maildir"))
    box.add(LATIN1)
    box.add(message(f"{on.name} fine"))
    code, out, err = invoke(["import", "--no-state", "--jobs", "1", str(tmp_path / "Maildir")], env=on.env())
    assert code == 75 and "1 delivered" in out + err and "cannot carry this message unchanged" in out + err
    assert on.rails.stored() == 1
    CELLS[on.name, FEATURES[3]] = f"refused (75): {_rails_on_latin1(on)}"


def _rails_on_latin1(on: OnIngress) -> str:
    """What the app itself does with such bytes, posted as this ingress would without our check."""
    if on.name in ("postmark", "mandrill"):
        return "JSON cannot hold them"
    fields = [("email", LATIN1)]
    if on.name == "mailgun":
        from mailbox_relay.ingress.formats import _mailgun_signature

        fields = [("body-mime", LATIN1), *((k, v.encode()) for k, v in _mailgun_signature(on.rails.password))]
    body = b"".join(
        b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v) for k, v in fields
    )
    answer = requests.post(
        on.url + INGRESSES[on.name].path,
        data=body + b"--B--\r\n",
        headers={"Content-Type": "multipart/form-data; boundary=B"},
        auth=("actionmailbox", on.rails.password),
        timeout=30,
    )
    assert answer.status_code == 400 and on.rails.stored() == 1  # nothing more was stored
    return f"Rails {rails_version()} answers 400 to a form field that is not UTF-8"


def test_a_wrong_secret_is_one_line_and_75(on: OnIngress) -> None:
    code, said = on.deliver(message("wrong secret"), MAILBOX_RELAY_PASSWORD="not-the-secret")
    assert code == 75 and said.count("\n") == 1 and said.startswith("4.7.0 ingress rejected the")
    assert INGRESSES[on.name].app_secret.split()[0] in said
    assert on.rails.stored() == 0
    CELLS[on.name, FEATURES[4]] = f"75: {said.split(' (HTTP 401)')[0][6:]}"


def test_check_is_ready_and_stores_nothing(on: OnIngress) -> None:
    code, out, _ = invoke(["check"], env=on.env())
    assert code == 0 and out.rstrip().endswith(
        "ready: mailbox-relay deliver would deliver to this ingress"
    ), out
    assert on.rails.stored() == 0
    probe = INGRESSES[on.name].probe
    CELLS[on.name, FEATURES[5]] = f"ready, nothing stored (HTTP {INGRESSES[on.name].probe_status} to {probe})"


def test_check_on_the_wrong_ingress_names_the_right_one(on: OnIngress) -> None:
    wrong = "postmark" if on.name == "relay" else "relay"
    code, out, _ = invoke(["check"], env=on.env(MAILBOX_RELAY_INGRESS=wrong))
    assert code == 78, out
    assert f"but the app answers on the {on.name} ingress" in out and f"set ingress = {on.name}" in out
    assert on.rails.stored() == 0
    CELLS[on.name, FEATURES[6]] = f"78, names {on.name}"


def test_the_compatibility_table_shows_every_ingress() -> None:
    if len(CELLS) < len(INGRESSES) * len(FEATURES):
        pytest.skip("the table needs every test of this module, for every ingress, in the same run")
    rows = [
        f"| {feature} | " + " | ".join(CELLS[name, feature] for name in INGRESSES) + " |"
        for feature in FEATURES
    ]
    table = "\n".join(
        [
            "| | " + " | ".join(INGRESSES) + " |",
            "|---" * (len(INGRESSES) + 1) + "|",
            *rows,
        ]
    )
    check_doc_section("ingresses", INGRESS_HEAD.format(version=rails_version()) + table + "\n")


INGRESS_HEAD = """## Ingresses

Generated by `tests/e2e/test_ingresses.py` against a real Rails {version} Action Mailbox app,
started once per ingress with `config.action_mailbox.ingress` set and its secret
(`RAILS_INBOUND_EMAIL_PASSWORD`, `MAILGUN_INGRESS_SIGNING_KEY`, `MANDRILL_INGRESS_API_KEY`) in
its environment; mailbox-relay runs with `--ingress` and the same secret. "byte-exact" means the
Active Storage blob Rails keeps is the bytes sent.

"""
